"""`radrl eval` and `radrl ablate` end to end on the shipped tiny models (small runs)."""

import json

import pytest
from typer.testing import CliRunner

from radrl.cli import app
from radrl.config import load_config
from radrl.eval.run import resolve_checkpoint, run_evaluation
from radrl.orchestration.ablate import run_ablation
from radrl.orchestration.run import run_training

pytestmark = pytest.mark.slow

CXRL = {"rollout.num_steps": 2, "rollout.batch_size": 4, "learner.batch_size": 4, "learner.iterations": 2,
        "learner.stat_buffer_size": 4, "learner.stat_min_count": 2, "logging.eval_reports": 4,
        "logging.image_every": 1, "logging.checkpoint_every": 1, "orchestration.local": True,
        "orchestration.dashboard": False, "evaluation.reports": 16, "evaluation.diversity_reports": 2,
        "evaluation.diversity_samples": 2, "evaluation.shown": 3}
RRG = {"task": "rrg", "data.n_train": 16, "models.report_generator.region_grid": 2,
       "models.report_generator.max_new_tokens": 16, "models.report_generator.supervised_decoder": "full",
       "rollout.batch_size": 4, "rollout.samples_per_report": 2, "learner.batch_size": 4,
       "learner.supervised_epochs": 1, "learner.supervised_batch_size": 8, "learner.iterations": 2,
       "learner.stat_buffer_size": 2, "learner.stat_min_count": 2, "learner.clip_range": 0.2, "learner.lr": 3e-3,
       "logging.eval_reports": 4, "logging.checkpoint_every": 1, "orchestration.local": True,
       "orchestration.dashboard": False, "evaluation.reports": 8, "evaluation.shown": 2}


def config(base, run_dir, **overrides):
    settings = dict(base, **{"logging.run_dir": str(run_dir)}, **overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def test_cxrl_eval_writes_the_table_and_figures_and_pairs_the_anchor_with_the_policy(tmp_path):
    cfg = config(CXRL, tmp_path / "run")
    run_training(cfg)
    evaluation, table = run_evaluation(cfg, tmp_path / "run")
    out = tmp_path / "run" / "eval" / "iter_000002"
    assert table == out / "metrics.md"
    for name in ("metrics.json", "metrics.csv", "auroc.png", "samples.png", "tensorboard"):
        assert (out / name).exists(), name
    assert list(evaluation["metrics"]) == ["real", "anchor", "policy"]
    for model in ("anchor", "policy"):
        assert set(evaluation["metrics"][model]) == {"r_align", "r_align_std", "auroc", "clip", "fid", "ms_ssim"}
        assert 0 <= evaluation["metrics"][model]["ms_ssim"] <= 1 and evaluation["metrics"][model]["fid"] > 0
    assert "FID (DenseNet features)" in table.read_text()
    # the anchor alone, no checkpoint: same noise, so exactly the anchor's numbers above
    alone, _ = run_evaluation(cfg, None, ("anchor",), tmp_path / "anchor")
    assert alone["metrics"]["anchor"] == evaluation["metrics"]["anchor"]
    with pytest.raises(ValueError, match="needs --checkpoint"):
        run_evaluation(cfg, None, ("policy",), tmp_path / "x")
    with pytest.raises(ValueError, match="trained under a different config"):
        run_evaluation(config(RRG, tmp_path / "run"), tmp_path / "run", ("supervised",), tmp_path / "y")


def test_resolve_checkpoint_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        resolve_checkpoint(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "neither a checkpoint folder" in result.output


def test_cqrl_from_another_runs_supervised_stage_and_rrg_eval(tmp_path):
    supervised_cfg = config(RRG, tmp_path / "sft", **{"learner.iterations": 0})
    supervised = run_training(supervised_cfg)
    assert "after CQRL" in supervised
    sft = json.loads((tmp_path / "sft" / "results.json").read_text())
    assert sft["iterations"] == 0 and sft["cqrl"] == sft["supervised"]

    rl_cfg = config(RRG, tmp_path / "rl", **{"learner.supervised_checkpoint": str(tmp_path / "sft")})
    run_training(rl_cfg)
    rl = json.loads((tmp_path / "rl" / "results.json").read_text())
    assert rl["supervised"] == sft["supervised"] and rl["weight_version"] == 2 and rl["supervised_epochs"] == 1
    assert not (tmp_path / "rl" / "supervised" / "metrics.jsonl").exists()  # no supervised epoch was trained

    evaluation, table = run_evaluation(rl_cfg, tmp_path / "rl", out_dir=tmp_path / "eval")
    assert list(evaluation["metrics"]) == ["supervised", "policy"]
    before, _ = run_evaluation(supervised_cfg, tmp_path / "sft", out_dir=tmp_path / "eval_sft")
    assert before["metrics"]["supervised"] == evaluation["metrics"]["supervised"]  # the same supervised model
    assert {"radcliq_v1", "ce_f1", "bleu4", "bleu2"} <= set(evaluation["metrics"]["policy"])
    assert (tmp_path / "eval" / "samples.png").is_file() and "labels that differ" in (tmp_path / "eval" / "samples.md").read_text()
    # no config given: the checkpoint's own
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "rl"), "--model", "policy",
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"]["policy"] == evaluation["metrics"]["policy"]
    assert "RadCliQ feature: rule entity/relation F1" in table.read_text()

    # a supervised run saved before a models key existed still matches at that key's default
    from radrl.orchestration.rrg_driver import finished_supervised_checkpoint

    for state_file in (tmp_path / "sft" / "checkpoints").glob("*/state.json"):
        state = json.loads(state_file.read_text())
        del state["config"]["models"]["report_generator"]["visual_prompt_dropout"]
        state_file.write_text(json.dumps(state))
    assert finished_supervised_checkpoint(tmp_path / "sft", rl_cfg)[0].parent == tmp_path / "sft" / "checkpoints"
    with pytest.raises(ValueError, match="different models"):
        finished_supervised_checkpoint(tmp_path / "sft", config(RRG, tmp_path / "x", **{
            "models.report_generator.visual_prompt_dropout": 0.3}))
    with pytest.raises(ValueError, match="different learner.supervised_lr"):
        run_training(config(RRG, tmp_path / "other", **{"learner.supervised_checkpoint": str(tmp_path / "sft"),
                                                         "learner.supervised_lr": 1e-3}))
    with pytest.raises(FileNotFoundError, match="no finished supervised stage"):
        run_training(config(RRG, tmp_path / "none", **{"learner.supervised_checkpoint": str(tmp_path / "eval")}))


def test_ablate_in_process_keeps_finished_cells_and_reruns_only_missing_ones(tmp_path):
    grids = {"cxrl": config(CXRL, tmp_path / "unused", **{"learner.iterations": 1})}
    tables = run_ablation(grids, seeds=1, out_dir=tmp_path / "ablate", local=True, only=("anchor", "full"))
    cells = tmp_path / "ablate" / "cxrl" / "cells"
    assert sorted(p.name for p in cells.iterdir()) == ["anchor", "full_seed0"]
    assert "| CXRL (full: LoRA + ACE, RLCF, all rewards) |" in tables and "not run" in tables  # w/o ACE was not asked
    for name in ("ablation.md", "ablation.json", "ablation.csv", "cxrl/ablation.png"):
        assert (tmp_path / "ablate" / name).is_file(), name
    assert "iter    1/1" in (cells / "full_seed0" / "log.txt").read_text()  # the cell's log went to its file
    trained = json.loads((cells / "full_seed0" / "cell.json").read_text())["training"]
    history = json.loads((cells / "full_seed0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert trained["reward/total"] == pytest.approx(history["reward/total"])  # one iteration: its own value
    assert json.loads((cells / "anchor" / "cell.json").read_text())["training"] == {}  # the anchor never trains
    assert "| CXRL (full: LoRA + ACE, RLCF, all rewards) | " in tables.split("### Training logs")[1]

    first = json.loads((cells / "full_seed0" / "cell.json").read_text())
    stamp = (cells / "anchor" / "cell.json").stat().st_mtime_ns
    (cells / "full_seed0" / "cell.json").unlink()  # as if interrupted after training
    again = run_ablation(grids, seeds=1, out_dir=tmp_path / "ablate", local=True, only=("anchor", "full"))
    assert (cells / "anchor" / "cell.json").stat().st_mtime_ns == stamp  # finished: not redone
    redone = json.loads((cells / "full_seed0" / "cell.json").read_text())
    assert redone["metrics"] == first["metrics"] and again == tables  # resumed from its checkpoint, not retrained
    with pytest.raises(ValueError, match="unknown variant"):
        run_ablation(grids, seeds=1, out_dir=tmp_path / "ablate", local=True, only=("bleu4",))
    changed = {"cxrl": config(CXRL, tmp_path / "unused", **{"learner.iterations": 1, "learner.lr": 1e-3})}
    with pytest.raises(RuntimeError, match="holds results of another config"):  # never mixes two configs' cells
        run_ablation(changed, seeds=1, out_dir=tmp_path / "ablate", local=True, only=("full",))


def test_ablate_on_ray_runs_dependent_cells_after_their_supervised_cell(tmp_path):
    grids = {"rrg": config(RRG, tmp_path / "unused", **{"learner.iterations": 1})}
    tables = run_ablation(grids, seeds=1, out_dir=tmp_path / "ablate", only=("full",))
    cells = tmp_path / "ablate" / "rrg" / "cells"
    supervised = json.loads((cells / "supervised_seed0" / "cell.json").read_text())
    full = json.loads((cells / "full_seed0" / "cell.json").read_text())
    assert supervised["model"] == "supervised" and full["model"] == "policy"
    assert "supervised stage taken from" in (cells / "full_seed0" / "log.txt").read_text()
    assert "| w/o CQRL (supervised only) |" in tables
    assert set(full["training"]) >= {"ppo/lambda_kl", "ppo/kl", "ppo/entropy", "reward/radcliq"}
    assert "| LM-RRG (full: RadCliQ reward, adaptive λ_KL) | " in tables.split("### Training logs")[1]
