"""The LM-RRG driver: the supervised stage, then CQRL, on the same roles and broadcast as CXRL.

    supervised:  for each epoch: learner trains on image–report pairs → validation loss + NLG → checkpoint
    hand-over:   learner merges the supervised weights; workers receive them once; RL LoRA version 0
    CQRL:        for each iteration: 1 sample reports → 2 score (RadCliQ) → 3 PPO update → 4 broadcast → log

Evaluation (after the supervised stage and at the end) greedy-decodes the held-out images and
reports BLEU-4, METEOR, ROUGE-L, CE precision/recall/F1 and RadCliQ v0/v1 with backend names.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from radrl.checkpoints import PREFIX, latest_checkpoint, load_checkpoint, save_checkpoint
from radrl.config import ExperimentConfig
from radrl.data.embedded import stable_seed
from radrl.data.labeler import label_reports
from radrl.data.observations import Label
from radrl.data.pairs import image_report_pairs, validation_split
from radrl.data.report_pool import iteration_reports, repeat_factors
from radrl.eval.region_attention import attention_overlaps, write_region_attention
from radrl.eval.rrg_eval import report_summary
from radrl.eval.text_metrics import (MACRO_MIN_POSITIVES, ce_baselines, ce_f1_changes, ce_macro_f1,
                                    ce_macro_f1_change, ce_per_observation, nlg_and_ce, per_observation_scores)
from radrl.orchestration.actors import Roles
from radrl.orchestration.driver import (FaultLog, RunFailed, StageTimer, broadcast_weights, check_staleness,
                                        restore_learner, resume_hint, sampling_calls)
from radrl.orchestration.recovery import RoleLost
from radrl.orchestration.tracking import TIMING_KEY, RunTracker
from radrl.reward_actors.radcliq import FEATURES

log = logging.getLogger("radrl")

REWARD = "reward/{name}"  # the training reward (higher is better)
CURVES = ("reward/radcliq", "reward/bleu4", "reward/greedy", "radcliq/v1", "ppo/kl", "ppo/entropy", "ppo/lambda_kl")
METRICS = ("bleu4", "meteor", "rouge_l", "ce_precision", "ce_recall", "ce_f1", "radcliq_v0", "radcliq_v1", *FEATURES)
SAMPLE_REPORTS = 5  # held-out examples written to samples.md
ATTENTION_IMAGES = 4  # held-out images in region_attention.png
OVERLAP_IMAGES = 64  # held-out images whose region attention maps results.json's region_attention_overlap compares


class RRGTrainer:
    """Owns the two-stage loop and the run folder; the roles own the models."""

    def __init__(self, cfg: ExperimentConfig, roles: Roles, resume: bool = False):
        self.cfg, self.roles = cfg, roles
        self.get, self.put = roles.cluster.get, roles.cluster.put
        self.run_dir = Path(cfg.logging.run_dir)
        self.reward_name = cfg.rewards.rrg_reward
        self.reward_actors = roles.rewards[self.reward_name]
        self.train, self.validation = validation_split(image_report_pairs(cfg.data, "train", cfg.data.n_train),
                                                       cfg.learner.supervised_validation)
        if self.validation is not None and (cfg.learner.supervised_selection == "macro_f1"
                                            or cfg.learner.rl_selection_ce_guard is not None):
            positives = (self.validation.labels == Label.POSITIVE).sum(axis=0)
            if positives.max() < MACRO_MIN_POSITIVES:
                raise ValueError(f"the validation macro CE F1 (learner.supervised_selection 'macro_f1', "
                                 f"learner.rl_selection_ce_guard) needs an observation with {MACRO_MIN_POSITIVES} "
                                 f"positive validation reports; the {len(self.validation)} validation pairs have at "
                                 f"most {positives.max()}: raise learner.supervised_validation, or use 'example_f1' "
                                 f"and leave rl_selection_ce_guard unset")
        self.eval_set = image_report_pairs(cfg.data, "test", cfg.logging.eval_reports)
        self.train_ref = self.put(self.train)  # one copy in the object store for the learner's supervised epochs
        self.per_iteration = cfg.rollout.trajectories_per_iteration
        # CQRL's images drawn uniformly, or by repeat factor (rollout.repeat_factor_threshold) so that images with
        # rare findings weigh more against the mostly normal ones
        self.image_weights = (None if cfg.rollout.repeat_factor_threshold is None else
                              repeat_factors(self.train.labels, cfg.rollout.repeat_factor_threshold))
        self.epochs_done, self.iteration, self.last_checkpoint = 0, 0, (0, 0)
        self.supervised_evaluation = None
        self.selection: list[float] = []  # per supervised epoch: the selection score on the validation pairs
        # every learner.rl_validation_every: [iteration, validation reward, greedy validation macro CE F1, its change
        # from the hand-over's, that change's s.e.]; the hand-over's greedy validation reports, for the changes
        self.rl_selection: list[list] = []
        self.handover_texts: list[str] | None = None
        self.weight_version = -1
        if resume:
            self.restore()
        elif cfg.learner.supervised_checkpoint is not None:
            self.start_from_supervised(cfg.learner.supervised_checkpoint)
        self.tracker = RunTracker(self.run_dir, purge_step=self.iteration + 1 if resume else None)
        self.supervised_tracker = RunTracker(self.run_dir / "supervised",
                                             purge_step=self.epochs_done + 1 if resume else None)
        self.faults = FaultLog(roles.cluster, self.tracker)
        if not resume:
            self.tracker.log_config(cfg.model_dump(mode="json"), CURVES)

    # ------------------------------------------------------------------ the loop

    def supervised_epoch(self) -> dict[str, float]:
        """One supervised epoch on the learner, then losses (and the image-reliance gap) on the held-out test
        images (logged as supervised/val_*, never used to choose), and greedy reports' NLG and CE F1 on the
        held-back training pairs (supervised/validation_*: what chooses the epoch). Without held-back pairs the
        NLG and CE F1 are the held-out images' (supervised/bleu4, ...), logged only."""
        start = time.perf_counter()
        learner = self.roles.learner
        train = self.get(learner.supervised_epoch.remote(self.train_ref, self.epochs_done))
        held_out = self.get(learner.validation_loss.remote(self.eval_set))
        self.epochs_done += 1
        scalars = {f"supervised/train_{k}": v for k, v in train.items()}
        scalars.update({f"supervised/val_{k}": v for k, v in held_out.items()})
        if self.validation is not None:  # what chooses the epoch: never the held-out test images
            chosen, references = self.get(learner.greedy.remote(self.validation.images)), list(self.validation.reports)
            scalars.update({f"supervised/validation_{k}": v for k, v in nlg_and_ce(chosen, references).items()})
            scalars["supervised/validation_macro_f1"] = ce_macro_f1(chosen, references)
            self.selection.append(scalars["supervised/validation_macro_f1" if self.cfg.learner.supervised_selection
                                          == "macro_f1" else "supervised/validation_ce_f1"])
        else:
            texts = self.get(learner.greedy.remote(self.eval_set.images))
            scalars.update({f"supervised/{k}": v for k, v in nlg_and_ce(texts, list(self.eval_set.reports)).items()})
        scalars["timing/epoch"] = time.perf_counter() - start
        return scalars

    def train_step(self) -> dict[str, float]:
        """One CQRL iteration: sample → score → PPO update → broadcast. Returns its scalars."""
        cfg, timer, start = self.cfg, StageTimer(), time.perf_counter()
        index = iteration_reports(list(range(len(self.train))), self.per_iteration, cfg.seed, self.iteration,
                                  cfg.rollout.samples_per_report, self.image_weights)

        with timer("sample"):  # 1. reports with policy and reference token log-probs
            trajectories, rollouts = self.sample(index)
        check_staleness([r.weight_version for r in rollouts], self.weight_version, cfg.orchestration.max_staleness)

        with timer("score"):  # 2. RadCliQ (or BLEU-4) against the ground truth, reward actors in parallel
            scored = self.get([self.reward_actors[k % len(self.reward_actors)].score.remote(r)
                               for k, r in enumerate(rollouts)])
        rewards = np.concatenate([s.rewards for s in scored])
        greedy = None if scored[0].greedy_rewards is None else np.concatenate([s.greedy_rewards for s in scored])

        with timer("update"):  # 3. PPO with the adaptive KL on the learner
            update = self.get(self.roles.learner.update_with.remote(rewards, greedy, *trajectories))
        self.tracker.log_histograms(self.iteration + 1, {"hist/reward": rewards,
                                                         "hist/advantages": update.pop("advantages")})
        if (self.iteration + 1) % cfg.logging.image_every == 0:
            self.log_reports(self.iteration + 1, rollouts)

        with timer("broadcast"):  # 4. the new RL LoRA to every worker
            self.weight_version = self.broadcast()

        self.iteration += 1
        return self.iteration_scalars(rollouts, scored, rewards, update, timer.seconds, time.perf_counter() - start)

    def advance(self) -> None:
        """The next step of the run: a supervised epoch, the hand-over, or a CQRL iteration, logged and checkpointed
        (self.stage names it for a failure's message)."""
        cfg = self.cfg
        if self.epochs_done < cfg.learner.supervised_epochs:
            self.stage = "supervised"
            scalars = self.supervised_epoch()
            scalars.update(self.faults.log(self.epochs_done))
            self.supervised_tracker.log_scalars(self.epochs_done, scalars)
            log.info(format_epoch(self.epochs_done, cfg.learner.supervised_epochs, scalars))
            self.checkpoint()
            return
        self.stage = "hand-over"
        if self.weight_version < 0:
            self.keep_best_epoch()
            self.start_rl()
        if self.supervised_evaluation is None:
            self.supervised_evaluation = self.evaluate()
            log.info("after the supervised stage (held-out, %d images): %s", len(self.eval_set),
                     format_brief(self.supervised_evaluation))
            self.checkpoint()
            return
        self.stage = "train"
        every = cfg.learner.rl_validation_every
        if every and not self.rl_selection:  # the hand-over's score: CQRL may keep the supervised model
            self.validate_rl()
            self.checkpoint()
        scalars = self.train_step()
        if every and (self.iteration % every == 0 or self.iteration == cfg.learner.iterations):
            scalars.update(self.validate_rl())
        scalars.update(self.faults.log(self.iteration))
        self.tracker.log_scalars(self.iteration, scalars)
        self.roles.cluster.record(self.iteration, int(scalars["rollout/reports"]),
                                  scalars[REWARD.format(name=self.reward_name)], scalars)
        log.info(format_progress(self.iteration, cfg.learner.iterations, scalars, self.reward_name))
        if self.iteration % cfg.logging.checkpoint_every == 0 or (
                every and self.rl_selection[-1][0] == self.iteration):  # a validated iteration may be kept
            self.checkpoint()

    def recover_learner(self) -> None:
        """The learner died and a fresh one took its place: load the last checkpoint into it (none yet: the fresh
        learner is the run's seeded start), forget what was logged after it, and go on from there (see
        CXRLTrainer.recover_learner)."""
        failed_at = self.epochs_done + self.iteration
        if latest_checkpoint(self.run_dir) is not None:  # restore() loads the newest whole one
            self.restore()
        else:
            self.epochs_done, self.iteration, self.last_checkpoint = 0, 0, (0, 0)
            self.supervised_evaluation, self.weight_version, self.selection = None, -1, []
            self.rl_selection, self.handover_texts = [], None
        self.tracker.rollback(self.iteration)
        self.supervised_tracker.rollback(self.epochs_done)
        self.faults.learner_recovered(self.iteration, failed_at - self.epochs_done - self.iteration)

    def run(self) -> dict:
        """Supervised epochs, then CQRL iterations (from a resumed checkpoint if any); returns both evaluations."""
        cfg, self.stage = self.cfg, "supervised"
        try:
            while (self.epochs_done < cfg.learner.supervised_epochs or self.supervised_evaluation is None
                   or self.iteration < cfg.learner.iterations):
                try:
                    self.advance()
                except RoleLost:
                    self.recover_learner()
            self.stage = "evaluate"
            if self.last_checkpoint != (self.epochs_done, self.iteration):
                self.checkpoint()  # the last iteration's state, before a validation selection loads another
            kept = self.keep_best_iteration()
            end = self.evaluate() if kept else self.supervised_evaluation  # no CQRL: the same model
        except Exception as error:
            raise RunFailed(self.failure_message(error, self.stage)) from error
        results = {"task": "rrg", "iterations": self.iteration, "supervised_epochs": self.epochs_done,
                   "supervised_epoch_kept": self.best_epoch() or self.epochs_done,
                   "validation_selection": {"metric": self.cfg.learner.supervised_selection,
                                            "per_epoch": self.selection},
                   "cqrl_iteration_kept": kept,
                   "rl_validation": {"every": cfg.learner.rl_validation_every, "metric": f"mean {self.reward_name} "
                                     "reward of greedy and sampled validation reports", "scores": self.rl_selection,
                                     "columns": ["iteration", "reward", "greedy macro CE F1", "its change from the "
                                                 "hand-over", "the change's paired bootstrap s.e."],
                                     "ce_guard": cfg.learner.rl_selection_ce_guard},
                   "kept_checkpoint": str(self.checkpoint_folder(kept).relative_to(self.run_dir)),
                   "weight_version": self.weight_version, "reward": self.reward_name,
                   "backends": self.get(self.reward_actors[0].backend_names.remote()),
                   "supervised": self.supervised_evaluation, "cqrl": end,
                   "baselines": ce_baselines(list(self.train.reports), list(self.eval_set.reports)),
                   "skipped_pairs": {"train": self.train.skipped, "test": self.eval_set.skipped}}
        self.write_results(results)
        return results

    # ------------------------------------------------------------------ stages

    def best_epoch(self) -> int | None:
        """The supervised epoch (1-based) with the best validation score (learner.supervised_selection), the
        earliest of ties; None without validation pairs."""
        return int(np.argmax(self.selection)) + 1 if self.selection else None

    def keep_best_epoch(self) -> None:
        """With validation pairs, the stage ends with its best epoch's weights (its checkpoint is kept for this). A
        supervised stage taken from another run (learner.supervised_checkpoint) arrives already chosen."""
        best = self.best_epoch()
        if best is None or best == self.epochs_done or self.cfg.learner.supervised_checkpoint is not None:
            return
        tensors, _ = load_checkpoint(self.run_dir / "checkpoints" / f"{PREFIX}{best:06d}")
        self.get(self.roles.learner.load_supervised.remote(
            {k.removeprefix("supervised/"): v for k, v in tensors.items() if k.startswith("supervised/")}))
        log.info("supervised stage: epoch %d of %d kept (validation %s %.3f; last epoch %.3f)", best,
                 self.epochs_done, self.cfg.learner.supervised_selection, self.selection[best - 1], self.selection[-1])

    def best_iteration(self) -> int:
        """The validated CQRL iteration to keep (best_validated_iteration), or the last iteration without
        rl_validation_every."""
        if not self.rl_selection:
            return self.iteration
        return best_validated_iteration(self.rl_selection, self.cfg.learner.rl_selection_ce_guard)

    def validate_rl(self) -> dict[str, float]:
        """Score greedy and sampled (temperature 1, fixed seeds) reports of the validation pairs with the training
        reward; their mean is this iteration's selection score. Returns its scalars."""
        images, references = self.validation.images, list(self.validation.reports)
        workers, size = self.roles.workers, self.cfg.rollout.batch_size
        starts = list(range(0, len(images), size))
        greedy = self.get([workers[k % len(workers)].greedy.remote(images[s:s + size]) for k, s in enumerate(starts)])
        sampled = self.get([workers[k % len(workers)].sampled_reports.remote(
            images[s:s + size], stable_seed("validation", self.cfg.logging.eval_seed, k)) for k, s in enumerate(starts)])
        scorer = self.reward_actors[0]
        means = [float(np.nanmean(self.get(scorer.rewards.remote([t for part in texts for t in part], references))))
                 for texts in (greedy, sampled)]
        texts = [t for part in greedy for t in part]
        macro, change, se = ce_macro_f1(texts, references), 0.0, 0.0
        if not self.rl_selection:  # the first validation is the hand-over's
            self.handover_texts = texts
        elif self.handover_texts is None:  # resumed from a checkpoint written before the guard existed
            change, se = float("nan"), float("nan")
        else:
            change, se = ce_macro_f1_change(self.handover_texts, texts, references)
        self.rl_selection.append([self.iteration, float(np.mean(means)), macro, change, se])
        log.info("CQRL validation at iteration %d: %s reward greedy %.4f sampled %.4f, greedy macro CE F1 %.3f "
                 "(%+.3f ± %.3f)", self.iteration, self.reward_name, *means, macro, change, se)
        return {"validation/reward_greedy": means[0], "validation/reward_sampled": means[1],
                "validation/selection": float(np.mean(means)), "validation/ce_macro_f1": macro,
                "validation/ce_macro_f1_change": change, "validation/ce_macro_f1_change_se": se}

    def keep_best_iteration(self) -> int:
        """End CQRL with the best validated iteration's RL LoRA (learner.rl_validation_every; the last iteration's
        checkpoint stays as it was trained); returns the iteration kept."""
        best = self.best_iteration()
        if best != self.iteration:
            tensors, _ = load_checkpoint(self.checkpoint_folder(best))
            self.get(self.roles.learner.load_rl.remote(
                {k.removeprefix("rl/"): v for k, v in tensors.items() if k.startswith("rl/")}))
            self.weight_version = self.broadcast()
            log.info("CQRL: iteration %d of %d kept (validation reward %.4f; last iteration %.4f)", best,
                     self.iteration, {row[0]: row[1] for row in self.rl_selection}[best], self.rl_selection[-1][1])
        guard = self.cfg.learner.rl_selection_ce_guard
        excluded = set(row[0] for row in self.rl_selection) - set(eligible_iterations(self.rl_selection, guard))
        if excluded:
            log.info("CQRL: iterations %s not kept: their validation macro CE F1 fell by more than %g s.e.",
                     sorted(excluded), guard)
        return best

    def checkpoint_folder(self, iteration: int) -> Path:
        """The checkpoint folder of CQRL iteration `iteration` (0: the hand-over)."""
        return self.run_dir / "checkpoints" / f"{PREFIX}{self.cfg.learner.supervised_epochs + 1 + iteration:06d}"

    def start_rl(self) -> None:
        """Hand-over: the learner merges the supervised weights and starts its RL LoRA; every worker gets both."""
        self.get(self.roles.learner.start_rl.remote())
        self.send_supervised()
        self.weight_version = self.broadcast()

    def send_supervised(self) -> None:
        ref = self.put(self.get(self.roles.learner.supervised_weights.remote()))
        stages = self.get([worker.load_supervised.remote(ref) for worker in self.roles.workers])
        if any(stage != "rl" for stage in stages):
            raise RuntimeError(f"workers report stages {stages} after the supervised hand-over")

    def sample(self, index: list[int]):
        """Split the iteration's rows into calls over the workers (sampling_calls) → (trajectory refs, rollouts)."""
        cfg = self.cfg
        calls = []
        spans = sampling_calls(len(index), cfg.rollout.batch_size, len(self.roles.workers),
                               cfg.rollout.samples_per_report)
        for k, (start, end) in enumerate(spans):
            batch = self.train.take(index[start:end])
            worker = self.roles.workers[k % len(self.roles.workers)]
            groups = [int(i) for i in index[start:end]]  # rows of one image form one advantage group
            calls.append(worker.sample.options(num_returns=2).remote(
                batch.images, list(batch.reports), groups, stable_seed("train", cfg.seed, self.iteration, k)))
        return [t for t, _ in calls], self.get([r for _, r in calls])

    def broadcast(self) -> int:
        """Fetch the learner's newest RL LoRA, put it in the object store once, load it on every worker."""
        published, _ = broadcast_weights(self.roles)
        self.broadcast_bytes = published.nbytes
        return published.version

    def evaluate(self) -> dict:
        """The current policy on the held-out images: greedy reports (NLG, CE, per-observation CE, RadCliQ) and
        reports sampled at temperature 1 with fixed seeds (RadCliQ); per-report RadCliQ kept for paired errors."""
        images, references = self.eval_set.images, list(self.eval_set.reports)
        workers, size = self.roles.workers, self.cfg.rollout.batch_size
        starts = list(range(0, len(images), size))
        greedy = self.get([workers[k % len(workers)].greedy.remote(images[s:s + size]) for k, s in enumerate(starts)])
        draws = self.cfg.logging.eval_samples  # draw 0's seeds are those of a one-sample evaluation
        sampled = self.get([workers[k % len(workers)].sampled_reports.remote(
            images[s:s + size], stable_seed("eval", self.cfg.logging.eval_seed, k, *([j] if j else [])))
            for j in range(draws) for k, s in enumerate(starts)])
        texts = [t for part in greedy for t in part]
        samples = [t for part in sampled for t in part]  # draw-major: draws × len(images)
        scorer = self.reward_actors[0]
        summary = report_summary(texts, references, self.get(scorer.evaluate.remote(texts, references)))
        summary["ce_per_observation"] = ce_per_observation(texts, references)
        decisions = np.concatenate(self.get([workers[k % len(workers)].disease_decisions.remote(images[s:s + size])
                                             for k, s in enumerate(starts)]))
        summary["head_per_observation"] = per_observation_scores(
            decisions, label_reports(references) == Label.POSITIVE)
        sampled_scores = self.get(scorer.evaluate.remote(samples, references * draws))
        per_draw = {v: np.asarray(sampled_scores[f"radcliq_{v}"]).reshape(draws, len(images)) for v in ("v0", "v1")}
        summary["sampled"] = {f"radcliq_{v}": float(per_draw[v].mean()) for v in ("v0", "v1")}
        summary["sampled"]["samples_per_image"] = draws
        summary["per_report"].update({f"sampled_radcliq_{v}": per_draw[v].mean(axis=0).tolist() for v in ("v0", "v1")})
        summary["per_report"].update({f"sampled_first_radcliq_{v}": per_draw[v][0].tolist() for v in ("v0", "v1")})
        summary["samples"] = texts[:SAMPLE_REPORTS]
        summary["per_report"]["texts"] = texts  # for paired comparisons of two evaluations (CE per observation)
        return summary

    def log_reports(self, iteration: int, rollouts) -> None:
        """TensorBoard text: this iteration's first sampled reports, and greedy reports of the first held-out images,
        each next to its reference (every logging.image_every iterations)."""
        sampled = [(r.reports[i], r.references[i]) for r in rollouts for i in range(len(r.reports))][:SAMPLE_REPORTS]
        shown = self.eval_set.take(list(range(min(SAMPLE_REPORTS, len(self.eval_set)))))
        greedy = self.get(self.roles.workers[0].greedy.remote(shown.images))
        for tag, pairs in (("reports/sampled", sampled), ("reports/greedy_held_out", zip(greedy, shown.reports))):
            rows = ["| generated | reference |", "|---|---|"]
            rows += [f"| {text or '(empty)'} | {reference} |".replace("\n", " ") for text, reference in pairs]
            self.tracker.log_text(iteration, tag, "\n".join(rows))

    def iteration_scalars(self, rollouts, scored, rewards, update, seconds, wall) -> dict[str, float]:
        scalars = {REWARD.format(name=self.reward_name): float(np.nanmean(rewards)),
                   **({} if scored[0].greedy_rewards is None else {  # the self-critical baseline's own reward
                       "reward/greedy": float(np.nanmean(np.concatenate([s.greedy_rewards for s in scored])))}),
                   "rollout/nonfinite_rewards": float((~np.isfinite(rewards)).sum())}
        for name in ("radcliq_v0", "radcliq_v1", *FEATURES):
            values = np.concatenate([s.scores[name] for s in scored])
            scalars[f"radcliq/{name.removeprefix('radcliq_')}"] = float(np.nanmean(values))
        lengths = [len(text.split()) for r in rollouts for text in r.reports]
        scalars["rollout/words_per_report"] = float(np.mean(lengths))
        scalars["rollout/empty_reports"] = float(sum(n == 0 for n in lengths))
        scalars.update({f"ppo/{k}": v for k, v in update.items() if k not in ("weight_version", "advantages")})
        reports = sum(len(r.reports) for r in rollouts)
        scalars["rollout/reports"] = float(reports)
        scalars["throughput/reports_per_s"] = reports / wall
        scalars["broadcast/bytes"] = float(self.broadcast_bytes)
        for stage, value in seconds.items():
            scalars[TIMING_KEY.format(stage=stage)] = value
        scalars[TIMING_KEY.format(stage="reward_" + self.reward_name)] = sum(s.seconds for s in scored)
        for who in ("policy", "reference"):
            scalars[TIMING_KEY.format(stage=f"rollout_{who}")] = sum(r.seconds[who] for r in rollouts)
        scalars["timing/iteration"] = wall
        return scalars

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Path:
        tensors, learner_state = self.get(self.roles.learner.state.remote())
        state = {"epochs_done": self.epochs_done, "iteration": self.iteration, "weight_version": self.weight_version,
                 "learner": learner_state, "supervised_evaluation": self.supervised_evaluation,
                 "selection": self.selection, "rl_selection": self.rl_selection,
                 "rl_handover_texts": self.handover_texts,
                 "config": self.cfg.model_dump(mode="json")}
        # folders are numbered by steps done: supervised epochs, the hand-over evaluation, then iterations
        step = self.epochs_done + (self.supervised_evaluation is not None) + self.iteration
        handover = self.cfg.learner.supervised_epochs + 1  # the supervised stage's result: other runs start from it
        best = self.best_epoch()  # the validation's best epoch: the hand-over may load it
        protect = (handover,) if best is None else (handover, best)
        if self.rl_selection:  # the best validated CQRL iteration: the run may end with it
            protect += (handover + self.best_iteration(),)
        folder = save_checkpoint(self.run_dir, step, tensors, state, keep=self.cfg.logging.keep_checkpoints,
                                 protect=protect)
        self.last_checkpoint = (self.epochs_done, self.iteration)
        return folder

    def restore(self) -> None:
        folder, state = restore_learner(self.run_dir, self.cfg, self.roles, self.get)
        self.epochs_done, self.iteration = state["epochs_done"], state["iteration"]
        self.supervised_evaluation = state["supervised_evaluation"]
        self.selection = state.get("selection", [])
        self.rl_selection = state.get("rl_selection", [])
        self.handover_texts = state.get("rl_handover_texts")
        self.last_checkpoint = (self.epochs_done, self.iteration)
        if state["learner"]["stage"] == "rl":
            self.send_supervised()
            self.weight_version = self.broadcast()
        log.info("resumed from %s (supervised epoch %d, iteration %d)", folder, self.epochs_done, self.iteration)

    def start_from_supervised(self, path: Path) -> None:
        """Take the supervised stage's result (and its held-out evaluation) from another run: CQRL starts here."""
        folder, state = finished_supervised_checkpoint(Path(path), self.cfg)
        tensors, _ = load_checkpoint(folder)
        self.get(self.roles.learner.load_supervised.remote(
            {k.removeprefix("supervised/"): v for k, v in tensors.items() if k.startswith("supervised/")}))
        self.epochs_done = self.cfg.learner.supervised_epochs
        same_eval = state["config"]["logging"]["eval_reports"] == self.cfg.logging.eval_reports
        self.supervised_evaluation = state["supervised_evaluation"] if same_eval else None
        self.selection = state.get("selection", [])  # that run's validation scores: which epoch it kept
        log.info("supervised stage taken from %s (%d epochs)", folder, self.epochs_done)

    def failure_message(self, error: Exception, stage: str) -> str:
        return (f"training stopped at supervised epoch {self.epochs_done}, iteration {self.iteration} during {stage}: "
                f"{type(error).__name__}: {error}. Fix the cause, then {resume_hint(self.run_dir)}.")

    # ------------------------------------------------------------------ results

    def write_results(self, results: dict) -> None:
        texts = [results[stage]["per_report"].get("texts") for stage in ("supervised", "cqrl")]
        if all(texts):  # (a supervised evaluation taken from a checkpoint written before texts were kept has none)
            results["ce_f1_change"] = ce_f1_changes(*texts, list(self.eval_set.reports))
        measured = self.eval_set.images[:OVERLAP_IMAGES]
        attention = self.get(self.roles.learner.region_attention.remote(measured))
        if attention is not None:
            if min(attention.shape[:2]) >= 2:  # two images and two regions to compare
                results["region_attention_overlap"] = attention_overlaps(attention)
            write_region_attention(measured[:ATTENTION_IMAGES], attention[:ATTENTION_IMAGES],
                                   self.run_dir / "region_attention.png")
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        (self.run_dir / "results.md").write_text(format_results_table(results) + "\n\n" + format_samples(
            results, list(self.eval_set.reports)) + "\n")
        self.tracker.write_reward_curves(CURVES)  # only the curves this run logged are drawn
        self.tracker.close()
        self.supervised_tracker.close()


# What the supervised stage's result depends on: a CQRL run may start from another run's only if these match.
SUPERVISED_KEYS = ("seed", "data", "models", "learner.supervised_epochs", "learner.supervised_lr",
                   "learner.supervised_batch_size", "learner.supervised_validation", "learner.supervised_selection")


def completed_config(saved: dict) -> dict:
    """A run's saved config with the keys added to the schema since then at their defaults (a new key's default
    keeps the behaviour from before it), so an older supervised run still matches the model it trained."""
    try:
        return ExperimentConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:  # a key since removed or renamed: compare what was saved, as saved
        return saved


def finished_supervised_checkpoint(path: Path, cfg: ExperimentConfig) -> tuple[Path, dict]:
    """The checkpoint that ends the supervised stage of the run at `path` (a run folder or a checkpoint folder)."""
    folders = [path] if (path / "state.json").is_file() else sorted((path / "checkpoints").glob(f"{PREFIX}*"))
    for folder in folders:
        state = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else None
        if state and state["supervised_evaluation"] is not None and state["iteration"] == 0:
            break
    else:
        raise FileNotFoundError(f"learner.supervised_checkpoint: no finished supervised stage under {path} (a run "
                                "folder whose supervised epochs and hand-over evaluation completed, or that checkpoint)")
    saved, current = completed_config(state["config"]), cfg.model_dump(mode="json")
    for key in SUPERVISED_KEYS:
        old, new = saved, current
        for part in key.split("."):
            old, new = old[part], new[part]
        if old != new:
            raise ValueError(f"learner.supervised_checkpoint: {folder} was trained with a different {key} "
                             f"({old!r}; this config has {new!r}); CQRL must start from the model this config describes")
    return folder, state


def eligible_iterations(selection: list[list], ce_guard: float | None) -> list[int]:
    """The validated iterations that may end CQRL: with ce_guard (a number of standard errors), those whose
    validation macro CE F1 did not fall below the hand-over's by more than ce_guard × its paired s.e. (a row's
    fourth and fifth entries); the hand-over (iteration 0), rows without them (a checkpoint from before the
    guard) and NaN changes pass."""
    return [row[0] for row in selection
            if ce_guard is None or row[0] == 0 or len(row) < 5 or not row[3] < -ce_guard * row[4]]


def best_validated_iteration(selection: list[list], ce_guard: float | None = None) -> int:
    """Of the [iteration, validation reward, macro CE F1, change, s.e.] rows, the eligible iteration whose reward
    is best (the earliest of ties; 0 is the hand-over)."""
    eligible = set(eligible_iterations(selection, ce_guard))
    rows = [row for row in selection if row[0] in eligible]
    return int(rows[int(np.argmax([row[1] for row in rows]))][0])


def paired_se(before: list[float], after: list[float]) -> float:
    """Standard error of the mean per-report difference (the same held-out images before and after)."""
    difference = np.asarray(after) - np.asarray(before)
    return float(difference.std(ddof=1) / np.sqrt(len(difference)))


def format_brief(summary: dict) -> str:
    return "  ".join(f"{k} {summary[k]:.3f}" for k in ("bleu4", "meteor", "rouge_l", "ce_f1", "radcliq_v0", "radcliq_v1"))


def format_epoch(epoch: int, total: int, scalars: dict) -> str:
    return (f"supervised epoch {epoch}/{total}  train loss {scalars['supervised/train_loss']:.3f}  "
            f"val report {scalars['supervised/val_report']:.3f}  val disease {scalars['supervised/val_disease']:.3f}  "
            f"image reliance {scalars['supervised/val_reliance_gap']:+.4f} "
            f"± {scalars['supervised/val_reliance_gap_se']:.4f}  "
            + (f"validation BLEU-4 {scalars['supervised/validation_bleu4']:.3f}  CE F1 "
               f"{scalars['supervised/validation_ce_f1']:.3f} macro {scalars['supervised/validation_macro_f1']:.3f}  "
               if "supervised/validation_ce_f1" in scalars else
               f"held-out BLEU-4 {scalars['supervised/bleu4']:.3f}  CE F1 {scalars['supervised/ce_f1']:.3f}  ")
            + f"{scalars['timing/epoch']:.0f} s")


def format_progress(iteration: int, total: int, scalars: dict, reward_name: str) -> str:
    return (f"iter {iteration:>4}/{total}  reward {scalars[REWARD.format(name=reward_name)]:+.4f}  "
            f"RadCliQ-v1 {scalars['radcliq/v1']:.3f}  kl {scalars['ppo/kl']:.2e}  λ_KL {scalars['ppo/lambda_kl']:.2f}  "
            f"entropy {scalars['ppo/entropy']:.2f}  clip {scalars['ppo/clipfrac']:.2f}  "
            f"{scalars['rollout/words_per_report']:.0f} words  {scalars['timing/iteration']:.1f} s")


LABELS = {"bleu4": "BLEU-4", "meteor": "METEOR (exact+stem)", "rouge_l": "ROUGE-L", "ce_precision": "CE precision",
          "ce_recall": "CE recall", "ce_f1": "CE F1", "radcliq_v0": "RadCliQ v0 ↓", "radcliq_v1": "RadCliQ v1 ↓"}


def format_results_table(results: dict) -> str:
    """Markdown: each metric after the supervised stage and after CQRL (held-out images), then CE per observation
    next to two image-blind baselines."""
    before, after, names = results["supervised"], results["cqrl"], results["backends"]
    lines = [f"| held-out ({len(before['per_report']['radcliq_v1'])} images) | supervised | after CQRL "
             f"({results['reward']} reward) | change (± paired s.e.) |", "|---|---|---|---|"]
    for key in METRICS:
        label = LABELS[key] if key in LABELS else f"RadCliQ feature: {names[key]}"
        change = f"{after[key] - before[key]:+.4f}"
        if key in ("radcliq_v0", "radcliq_v1"):
            change += f" ± {paired_se(before['per_report'][key], after['per_report'][key]):.4f}"
        lines.append(f"| {label} (greedy) | {before[key]:.4f} | {after[key]:.4f} | {change} |")
    draws = after["sampled"].get("samples_per_image", 1)
    for version in ("v1", "v0"):
        rows = [(f"sampled_radcliq_{version}", "sampled, T = 1" + (f", mean of {draws} per image" if draws > 1 else ""))]
        first = f"sampled_first_radcliq_{version}"
        if draws > 1 and first in before["per_report"]:  # one sample per image, as a one-sample evaluation draws
            rows.append((first, "sampled, T = 1, first sample only"))
        for key, label in rows:  # each image's score (the mean of its draws), averaged over images
            b, a = np.mean(before["per_report"][key]), np.mean(after["per_report"][key])
            lines.append(f"| RadCliQ {version} ↓ ({label}) | {b:.4f} | {a:.4f} | {a - b:+.4f} ± "
                         f"{paired_se(before['per_report'][key], after['per_report'][key]):.4f} |")
    lines.append("")
    lines.append("RadCliQ backends: " + "; ".join(f"{k} = {v}" for k, v in names.items())
                 + (". Offline stand-ins, not the official RadCliQ." if "rule" in names["radgraph"] else "."))
    baselines, changes = results["baselines"], results.get("ce_f1_change", {})
    lines += ["", "| CE F1, greedy (held-out positives) | always \"normal\" | most common train report | supervised "
              "| after CQRL | change (± paired bootstrap s.e.) | disease head's decisions |",
              "|---|---|---|---|---|---|---|",
              f"| example-based | {baselines['always_normal']['ce_f1']:.3f} | "
              f"{baselines['most_common_train']['ce_f1']:.3f} | {before['ce_f1']:.3f} | {after['ce_f1']:.3f} | | |"]
    head = before.get("head_per_observation", {})
    for name, value in before["ce_per_observation"].items():
        if value["positives"]:
            cells = [baselines["always_normal"]["ce_per_observation"][name]["f1"],
                     baselines["most_common_train"]["ce_per_observation"][name]["f1"], value["f1"],
                     after["ce_per_observation"][name]["f1"]]
            change = changes.get(name)
            shown = f"{change['change']:+.3f} ± {change['se']:.3f}" if change else ""
            head_f1 = f"{head[name]['f1']:.3f}" if name in head else ""
            lines.append(f"| {name} ({value['positives']}) | " + " | ".join(f"{c:.3f}" for c in cells)
                         + f" | {shown} | {head_f1} |")
    if overlap := results.get("region_attention_overlap"):
        lines += ["", f"Region attention over the patches ({overlap['images']} held-out images; histogram intersection, "
                      f"1 = the same map): between regions {overlap['between_regions']:.3f}, between images "
                      f"{overlap['between_images']:.3f}"
                      + (f"; share inside each region's atlas box {overlap['in_box']:.3f}." if "in_box" in overlap
                         else ".")]
    if skipped := results.get("skipped_pairs"):
        lines += ["", f"Data: skipped {skipped['train']} training and {skipped['test']} held-out image–report pairs "
                      "(unreadable image or empty report; the log names each)."]
    return "\n".join(lines)


def format_samples(results: dict, references: list[str]) -> str:
    """The first held-out reports: reference, supervised model, after CQRL."""
    lines = ["## Samples (held-out, greedy)"]
    for i, (before, after) in enumerate(zip(results["supervised"]["samples"], results["cqrl"]["samples"])):
        lines += [f"### {i + 1}", f"- reference: {references[i]}", f"- supervised: {before}", f"- after CQRL: {after}"]
    return "\n".join(lines)
