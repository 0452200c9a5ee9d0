"""LM-RRG end to end: supervised → CQRL in-process, resume, and 2 RL iterations on a local Ray instance."""

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from radrl.config import load_config
from radrl.orchestration.actors import start_roles
from radrl.orchestration.rrg_driver import RRGTrainer


def small_config(run_dir, **overrides):
    settings = {"task": "rrg", "data.n_train": 16, "models.report_generator.region_grid": 2,
                "models.report_generator.max_new_tokens": 16, "models.report_generator.supervised_decoder": "full",
                "rollout.batch_size": 4, "rollout.samples_per_report": 2, "learner.batch_size": 4,
                "learner.supervised_epochs": 1, "learner.supervised_batch_size": 8, "learner.iterations": 2,
                "learner.stat_buffer_size": 2, "learner.stat_min_count": 2, "learner.clip_range": 0.2,
                "logging.eval_reports": 4, "logging.checkpoint_every": 1, "logging.run_dir": str(run_dir),
                "orchestration.local": True, "orchestration.dashboard": False}
    settings.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def train(cfg, resume=False):
    roles = start_roles(cfg)
    try:
        trainer = RRGTrainer(cfg, roles, resume=resume)
        return trainer, trainer.run()
    finally:
        roles.cluster.shutdown()


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_in_process_rrg_run_writes_both_stages_and_the_table(tmp_path):
    _, results = train(small_config(tmp_path, **{"logging.image_every": 1}))
    assert results["supervised_epochs"] == 1 and results["iterations"] == 2 and results["weight_version"] == 2
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    events.Reload()
    assert {"hist/reward", "hist/advantages"} <= set(events.Tags()["histograms"])
    texts = set(events.Tags()["tensors"])  # the config, and sampled / greedy reports next to their references
    assert {"config/text_summary", "reports/sampled/text_summary", "reports/greedy_held_out/text_summary"} <= texts
    shown = events.Tensors("reports/greedy_held_out/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| generated | reference |" in shown and "_hparams_/experiment" in events.PluginTagToContent("hparams")
    supervised = [json.loads(line) for line in (tmp_path / "supervised" / "metrics.jsonl").read_text().splitlines()]
    assert supervised[0]["iteration"] == 1 and np.isfinite(supervised[0]["supervised/val_report"])
    first = history(tmp_path)[0]
    for key in ("reward/radcliq", "radcliq/v1", "radcliq/bertscore", "ppo/kl", "ppo/lambda_kl", "ppo/clipfrac",
                "ppo/entropy", "ppo/kl_threshold", "ppo/steps_done", "throughput/reports_per_s", "timing/sample",
                "timing/update", "timing/reward_radcliq"):
        assert np.isfinite(first[key]), key
    assert np.isfinite(supervised[0]["supervised/val_reliance_gap"])
    table = (tmp_path / "results.md").read_text()
    for label in ("BLEU-4", "METEOR", "ROUGE-L", "CE precision", "CE recall", "CE F1", "RadCliQ v0", "RadCliQ v1",
                  "sampled, T = 1", "always \"normal\"", "most common train report", "labeler agreement",
                  "Offline stand-ins", "paired bootstrap s.e.", "disease head's decisions"):
        assert label in table, label
    results = json.loads((tmp_path / "results.json").read_text())
    head = results["supervised"]["head_per_observation"]  # the head's decisions scored apart from the decoder
    assert set(head) == set(results["supervised"]["ce_per_observation"])
    assert all(np.isnan(v["f1"]) or 0 <= v["f1"] <= 1 for v in head.values())
    assert set(results["ce_f1_change"]) >= {"Pleural Effusion", "Cardiomegaly"}
    assert (tmp_path / "reward_curves.png").is_file() and (tmp_path / "region_attention.png").is_file()
    overlap = results["region_attention_overlap"]  # the region maps compared on the held-out images
    assert 0 <= overlap["between_regions"] <= 1 and 0 <= overlap["in_box"] <= 1 and overlap["images"] >= 2
    assert "Region attention over the patches" in table


def test_evaluation_averages_several_samples_per_image_and_its_first_draw_is_a_one_sample_evaluation(tmp_path):
    cfg = small_config(tmp_path, **{"logging.eval_samples": 3})
    roles = start_roles(cfg)
    try:
        trainer = RRGTrainer(cfg, roles)
        three = trainer.evaluate()
        trainer.cfg = small_config(tmp_path)  # one sample per image, the default
        one = trainer.evaluate()
    finally:
        roles.cluster.shutdown()
    assert three["sampled"]["samples_per_image"] == 3 and one["sampled"]["samples_per_image"] == 1
    per_image, first = three["per_report"]["sampled_radcliq_v1"], three["per_report"]["sampled_first_radcliq_v1"]
    assert first == one["per_report"]["sampled_radcliq_v1"]  # draw 0 has the one-sample evaluation's seeds
    assert len(per_image) == len(first) == cfg.logging.eval_reports
    assert per_image != first  # the other draws differ from it (a random decoder samples different reports)
    assert np.isclose(three["sampled"]["radcliq_v1"], np.mean(per_image))


@pytest.mark.slow
def test_rrg_resume_continues_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(small_config(straight, **{"learner.iterations": 3}))
    train(small_config(interrupted, **{"learner.iterations": 2}))
    _, results = train(small_config(interrupted, **{"learner.iterations": 3}), resume=True)
    assert results["iterations"] == 3 and results["weight_version"] == 3
    assert [h["iteration"] for h in history(interrupted)] == [1, 2, 3]
    assert history(interrupted)[-1]["reward/radcliq"] == pytest.approx(history(straight)[-1]["reward/radcliq"])
    assert history(interrupted)[-1]["ppo/kl"] == pytest.approx(history(straight)[-1]["ppo/kl"], rel=1e-3, abs=1e-7)


@pytest.mark.slow
def test_two_rrg_iterations_on_local_ray_with_two_workers(tmp_path):
    cfg = small_config(tmp_path, **{"orchestration.local": False, "rollout.num_workers": 2,
                                    "rollout.resources": "{num_cpus: 0.5}", "rewards.resources": "{num_cpus: 0.5}",
                                    "learner.resources": "{num_cpus: 0.5}"})
    roles = start_roles(cfg)
    try:
        trainer = RRGTrainer(cfg, roles)
        results = trainer.run()
        get = roles.cluster.get  # ray.get, that reruns the work of an actor that died
        held = get([worker.held_version.remote() for worker in roles.workers])
        assert held == [2, 2] and results["weight_version"] == 2
        trajectories, rollouts = trainer.sample(list(range(8)))
        assert [r.weight_version for r in rollouts] == [2, 2]
        assert [t.weight_version for t in get(trajectories)] == [2, 2]
        assert get(roles.learner.publish.remote()).version == 2
    finally:
        roles.cluster.shutdown()


@pytest.mark.slow
def test_validation_pairs_choose_the_supervised_epoch(tmp_path):
    """learner.supervised_validation: CE F1 on held-back training texts per epoch; the hand-over keeps the best
    epoch's weights, not the last one's."""
    from radrl.checkpoints import load_checkpoint

    cfg = small_config(tmp_path, **{"data.n_train": 24, "learner.supervised_validation": 6,
                                    "learner.supervised_epochs": 2, "learner.iterations": 0})
    roles = start_roles(cfg)
    try:
        trainer = RRGTrainer(cfg, roles)
        assert len(trainer.validation) >= 6 and len(trainer.train) + len(trainer.validation) == 24
        trainer.advance(), trainer.advance()  # two supervised epochs, each scored on the validation pairs
        assert len(trainer.selection) == 2 and all(0 <= f <= 1 for f in trainer.selection)
        trainer.selection = [1.0, 0.0]  # as if epoch 1 had scored best
        trainer.advance()  # hand-over: epoch 1's weights, then the held-out evaluation and its checkpoint
        assert trainer.best_epoch() == 1
    finally:
        roles.cluster.shutdown()
    folder = tmp_path / "checkpoints"
    kept, first, last = (load_checkpoint(folder / f"iter_{k:06d}")[0] for k in (3, 1, 2))
    names = [k for k in first if k.startswith("supervised/")]
    assert names and all(torch.equal(kept[k], first[k]) for k in names)
    assert not all(torch.equal(kept[k], last[k]) for k in names)
    state = json.loads((folder / "iter_000003" / "state.json").read_text())
    assert state["selection"] == [1.0, 0.0]
    supervised = [json.loads(line) for line in (tmp_path / "supervised" / "metrics.jsonl").read_text().splitlines()]
    assert all("supervised/validation_ce_f1" in row and "supervised/validation_bleu4" in row for row in supervised)
    assert not any("supervised/bleu4" in row for row in supervised)  # the test images are not decoded per epoch
    # CQRL from this supervised stage (learner.supervised_checkpoint) reports its choice and does not choose again
    later = small_config(tmp_path / "cqrl", **{"data.n_train": 24, "learner.supervised_validation": 6,
                                               "learner.supervised_epochs": 2, "learner.iterations": 1,
                                               "learner.supervised_checkpoint": str(tmp_path)})
    _, results = train(later)
    assert results["supervised_epoch_kept"] == 1 and results["validation_selection"] == {"metric": "example_f1", "per_epoch": [1.0, 0.0]}


def test_cqrl_draws_images_by_repeat_factor_when_asked(tmp_path):
    """rollout.repeat_factor_threshold t: each training pair weighs max(1, sqrt(t / f)), f the share of training
    pairs with its rarest positive finding (LVIS; "No Finding" is not a finding), by hand from the labels; unset:
    uniform."""
    from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label

    cfg = small_config(tmp_path / "rf", **{"rollout.repeat_factor_threshold": 1.0, "data.n_train": 64})
    roles = start_roles(cfg)
    try:
        trainer = RRGTrainer(cfg, roles)
        positive = trainer.train.labels == Label.POSITIVE
        positive[:, CHEXPERT_OBSERVATIONS.index("No Finding")] = False
        share = positive.mean(axis=0)
        for i, row in enumerate(positive):
            rarest = min((share[c] for c in np.flatnonzero(row)), default=None)
            expected = 1.0 if rarest is None else max(1.0, (1.0 / rarest) ** 0.5)
            assert trainer.image_weights[i] == pytest.approx(expected)
        assert trainer.image_weights.max() > 1  # some pair has a finding rarer than t
    finally:
        roles.cluster.shutdown()
    roles = start_roles(small_config(tmp_path / "uniform"))
    try:
        assert RRGTrainer(small_config(tmp_path / "uniform"), roles).image_weights is None
    finally:
        roles.cluster.shutdown()


class ScriptedValidation(RRGTrainer):
    """Scores each validation as the real one does, then replaces the selection score by a fixed table, so that the
    test knows which iteration must be kept."""

    SCORES = {0: 0.0, 2: 1.0, 3: 0.5}

    def validate_rl(self):
        scalars = super().validate_rl()
        self.rl_selection[-1][1] = self.SCORES[self.iteration]
        return scalars


def test_validated_iteration_kept_skips_those_that_lose_clinical_content():
    """learner.rl_selection_ce_guard: the best reward wins among the iterations whose validation macro CE F1 did not
    fall by more than the guard's number of paired s.e.; the hand-over always competes; unguarded, the best reward
    wins. Rows: [iteration, reward, macro, change from the hand-over, its s.e.]."""
    from radrl.orchestration.rrg_driver import best_validated_iteration, eligible_iterations

    rows = [[0, 1.22, 0.506, 0.0, 0.0], [40, 1.25, 0.484, -0.022, 0.020], [80, 1.30, 0.439, -0.068, 0.022],
            [120, 1.27, 0.449, -0.057, 0.022], [160, 1.25, 0.508, 0.002, 0.019]]
    assert best_validated_iteration(rows) == 80
    assert eligible_iterations(rows, 2.0) == [0, 40, 160]  # 80 and 120 fell 3.1 and 2.6 s.e.
    assert best_validated_iteration(rows, 2.0) == 40
    assert best_validated_iteration(rows, 1.0) == 160  # 40 fell 1.1 s.e.
    assert best_validated_iteration(rows, 3.5) == 80
    assert best_validated_iteration([[0, 1.3, 0.5, 0.0, 0.0], [40, 1.2, 0.6, 0.1, 0.02]], 2.0) == 0  # may stay
    assert best_validated_iteration([[0, 1.0], [40, 1.2]], 2.0) == 40  # rows from before the guard compete
    assert best_validated_iteration([[0, 1.0, 0.5, 0.0, 0.0], [40, 1.2, 0.5, float("nan"), float("nan")]], 2.0) == 40


@pytest.mark.slow
def test_cqrl_ends_with_the_best_validated_iteration(tmp_path):
    """learner.rl_validation_every: the hand-over and every k-th iteration are scored on the validation pairs, their
    checkpoints survive keep_checkpoints, and the run evaluates, reports and resolves to the best one's weights
    (with the self-critical greedy baseline, whose reward is logged)."""
    from radrl.checkpoints import load_checkpoint
    from radrl.eval.run import resolve_checkpoint

    cfg = small_config(tmp_path, **{"data.n_train": 24, "learner.supervised_validation": 6, "learner.iterations": 3,
                                    "learner.rl_validation_every": 2, "logging.checkpoint_every": 10,
                                    "logging.keep_checkpoints": 1, "learner.rrg_advantage": "greedy"})
    roles = start_roles(cfg)
    try:
        trainer = ScriptedValidation(cfg, roles)
        results = trainer.run()
        published = roles.cluster.get(roles.learner.publish.remote())
    finally:
        roles.cluster.shutdown()
    assert [row[0] for row in results["rl_validation"]["scores"]] == [0, 2, 3]  # hand-over, every 2nd, the last
    rows = results["rl_validation"]["scores"]  # [iteration, reward, macro CE F1, its change, the change's s.e.]
    assert all(len(row) == 5 and (0 <= row[2] <= 1 or np.isnan(row[2])) for row in rows) and rows[0][3:] == [0, 0]
    assert results["cqrl_iteration_kept"] == 2 and results["iterations"] == 3
    folder = tmp_path / results["kept_checkpoint"]  # 1 supervised epoch + the hand-over + 2 iterations
    assert results["kept_checkpoint"] == "checkpoints/iter_000004" and (tmp_path / "checkpoints/iter_000005").is_dir()
    kept, last = load_checkpoint(folder)[0], load_checkpoint(tmp_path / "checkpoints/iter_000005")[0]
    names = [k for k in kept if k.startswith("rl/")]
    assert names and all(np.array_equal(published.tensors[k.removeprefix("rl/")], kept[k].numpy()) for k in names)
    assert not all(torch.equal(kept[k], last[k]) for k in names)  # the last iteration's training state is kept too
    assert resolve_checkpoint(tmp_path) == folder  # radrl eval / export of the run folder take the kept weights
    assert all(np.isfinite(row["reward/greedy"]) for row in history(tmp_path))  # the self-critical baseline's reward
    validated = [row for row in history(tmp_path) if "validation/reward_greedy" in row]
    assert [row["iteration"] for row in validated] == [2, 3]
    assert all(np.isfinite(row["validation/reward_greedy"]) and np.isfinite(row["validation/reward_sampled"])
               for row in validated)
