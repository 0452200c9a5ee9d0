"""The CXRL driver: one loop that reads like single-process training while the roles run anywhere.

    for each iteration:  1 sample → 2 score → 3 RLCF rewards → 4 DDPO update → 5 broadcast → log → checkpoint

The roles are Ray actors or, with `orchestration.local`, plain objects in this process; the
code below is the same for both (see handles.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from radrl.checkpoints import check_resumable, latest_checkpoint, save_checkpoint, valid_checkpoint
from radrl.config import ExperimentConfig
from radrl.data.embedded import stable_seed
from radrl.data.labeler import label_reports
from radrl.data.report_pool import iteration_reports, repeat_factors, report_pool
from radrl.eval.diagnosis import diagnosis_summary, format_diagnosis_table, mean_auroc
from radrl.models.classifier import PAPER_CLASSES, chexpert_names
from radrl.orchestration.actors import Roles
from radrl.orchestration.recovery import RoleLost
from radrl.orchestration.tracking import (CXRL_CURVES, REWARD_KEY, THROUGHPUT_KEY, TIMING_KEY, TOTAL_KEY, WIN_RATE_KEY,
                                         RunTracker)
from radrl.reward_actors.anchor_cache import AnchorCache, iteration_noise_seeds, pair_seed
from radrl.reward_actors.rewards import report_targets
from radrl.reward_actors.rlcf import (COMPONENTS, anchor_reference, combine, paired_variance_ratio,
                                     weights)

log = logging.getLogger("radrl")

GRID_REPORTS = 6  # columns of the anchor-vs-policy image grid


class StaleRolloutError(RuntimeError):
    """A rollout was made by weights older than orchestration.max_staleness allows."""


class RunFailed(RuntimeError):
    """Training stopped; the message says what was saved and how to continue."""


def check_staleness(versions: list[int], learner_version: int, max_staleness: int) -> None:
    """Refuse rollouts more than `max_staleness` versions behind the learner (or from the future)."""
    for version in versions:
        if not 0 <= learner_version - version <= max_staleness:
            raise StaleRolloutError(
                f"a rollout carries weight version {version} but the learner is at {learner_version} "
                f"(orchestration.max_staleness = {max_staleness}); a worker missed a broadcast")


class StageTimer:
    """Wall seconds per named stage of one iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class SampledBatch:
    """One iteration's sampling calls, submitted (results may still be in flight)."""

    reports: list[str]
    seeds: list[int] | None  # per-row x_T seeds (rollout.noise_seeds_per_report), else None
    anchor_rows: list[int] | None  # rows whose anchor is sampled (anchor cache, anchor_samples_per_report); None = all
    trajectories: list  # refs of DiffusionTrajectory batches, for the learner
    rollouts: list  # refs of RolloutImages batches


@dataclass(frozen=True)
class Scores:
    """Direct scores of a set of rollouts: reward name → [B] for policy and (if sampled) anchor images."""

    reports: list[str]
    policy: dict[str, np.ndarray]
    anchor: dict[str, np.ndarray] | None  # of the anchor images of `anchor_rows`
    anchor_rows: list[int] | None  # rows that have an anchor image; None = every row
    seconds: dict[str, float]  # reward name → seconds spent in that reward's actors
    # the diagnostic classifier's calibrated outputs: {"class_names", "policy" [B, C], "anchor" [A, C] or None}
    diagnosis: dict | None = None


def direct_total(scores: dict[str, np.ndarray], cfg: ExperimentConfig) -> np.ndarray:
    """λ-weighted sum of direct scores (the total reward an image would get without RLCF)."""
    return sum(w * scores[name] for name, w in weights(cfg.rewards).items())


def evaluation_summary(scores: Scores, cfg: ExperimentConfig) -> dict[str, dict[str, float]]:
    """Per component and for the total: mean direct score of policy and anchor images, and the
    standard error of their per-report difference (the images are paired by report and noise);
    plus the policy's win rate on the total."""
    policy = dict(scores.policy, total=direct_total(scores.policy, cfg))
    anchor = dict(scores.anchor, total=direct_total(scores.anchor, cfg))
    summary = {}
    for name in (*COMPONENTS, "total"):
        difference = policy[name] - anchor[name]
        summary[name] = {"policy": float(policy[name].mean()), "anchor": float(anchor[name].mean()),
                         "difference_se": float(difference.std(ddof=1) / np.sqrt(len(difference)))}
    wins = (policy["total"] > anchor["total"]) + 0.5 * (policy["total"] == anchor["total"])
    summary["win_rate"] = {"policy": float(wins.mean()), "anchor": float(1 - wins.mean())}
    if scores.diagnosis is not None and scores.anchor_rows is None:  # every report has its anchor image
        names = scores.diagnosis["class_names"]
        summary["diagnosis"] = diagnosis_summary(scores.diagnosis["policy"], scores.diagnosis["anchor"],
                                                 report_targets(scores.reports, names), names)
    return summary


def evaluation_reports(pool: list[str], count: int, per_class: int = 3) -> list[str]:
    """`count` held-out reports for the end-of-run table: first up to `per_class` positives of each of the paper's
    classes that the pool has (rarest first), so that each has an AUROC, then the rest in pool order; returned in
    pool order. The first `count` alone held 0–2 positives of half the classes."""
    targets = report_targets(pool, chexpert_names(PAPER_CLASSES))
    chosen: list[int] = []
    for c in np.argsort(np.nansum(targets == 1, axis=0)):
        positives = np.flatnonzero(targets[:, c] == 1)
        need = per_class - int(np.isin(positives, chosen).sum())
        chosen += [int(i) for i in positives if i not in chosen][:max(need, 0)]
    chosen += [i for i in range(len(pool)) if i not in chosen]
    return [pool[i] for i in sorted(chosen[:count])]


def sampling_calls(total: int, batch_size: int, workers: int, group: int = 1) -> list[tuple[int, int]]:
    """The row ranges [start, end) of one iteration's sampling calls, call k going to worker k mod workers.

    Whole groups (a report's samples) per call, at most batch_size rows each, and as many calls as workers where
    there are enough groups, near-equal in size (uneven where they must be: 4 reports × 4 samples on 3 workers
    are calls of 4, 4 and 8 rows).
    The rows, and so what the learner trains on, are the same for any number of workers; only the calls differ.
    """
    groups = total // group
    calls = max(-(-total // batch_size), min(workers, groups))
    bounds = [(k * groups) // calls for k in range(calls + 1)]
    return [(bounds[k] * group, bounds[k + 1] * group) for k in range(calls)]


class CXRLTrainer:
    """Owns the loop and the run folder; the roles own the models."""

    def __init__(self, cfg: ExperimentConfig, roles: Roles, resume: bool = False):
        self.cfg, self.roles = cfg, roles
        self.get, self.put = roles.cluster.get, roles.cluster.put
        self.run_dir = Path(cfg.logging.run_dir)
        self.train_pool = report_pool(cfg.data, "train")
        self.report_weights = (None if cfg.rollout.repeat_factor_threshold is None else
                               repeat_factors(label_reports(self.train_pool), cfg.rollout.repeat_factor_threshold))
        self.eval_reports = evaluation_reports(report_pool(cfg.data, "test"), cfg.logging.eval_reports)
        rollout = cfg.rollout
        self.per_iteration = rollout.trajectories_per_iteration
        self.iteration, self.last_checkpoint, self.start_evaluation = 0, 0, None
        self.train_seconds, self.images_generated = 0.0, 0  # training wall time and images so far (the budget)
        self.anchor_cache = AnchorCache() if cfg.rollout.anchor_cache else None
        self.next_batch: SampledBatch | None = None  # orchestration.overlap: the next iteration's, in flight
        self.loading = []  # orchestration.overlap: workers' pending weight loads
        if resume:
            self.restore()
        self.tracker = RunTracker(self.run_dir, purge_step=self.iteration + 1 if resume else None)
        if not resume:
            self.tracker.log_config(cfg.model_dump(mode="json"), CXRL_CURVES)
        self.faults = FaultLog(roles.cluster, self.tracker)
        self.weight_version = self.broadcast()

    # ------------------------------------------------------------------ the loop

    def train_step(self) -> dict[str, float]:
        """One iteration: sample → score → RLCF rewards → DDPO update → broadcast. Returns its scalars."""
        cfg, timer, start = self.cfg, StageTimer(), time.perf_counter()

        with timer("sample"):  # 1. policy (and anchor) images; trajectories stay in the object store
            batch = self.next_batch or self.submit_batch(self.iteration)
            reports, seeds, trajectories = batch.reports, batch.seeds, batch.trajectories
            rollouts = self.get(batch.rollouts)
            held = self.get(self.loading)  # queued behind this batch on each worker: done by now
            if any(version != self.weight_version for version in held):
                raise RuntimeError(f"workers hold weight versions {held} after broadcasting {self.weight_version}")
            self.next_batch = None
            if cfg.orchestration.overlap and self.iteration + 1 < cfg.learner.iterations:
                self.next_batch = self.submit_batch(self.iteration + 1)  # sampled while this one trains
        check_staleness([r.weight_version for r in rollouts], self.weight_version, cfg.orchestration.max_staleness)
        staleness = self.weight_version - min(r.weight_version for r in rollouts)

        with timer("score"):  # 2. every reward actor at once, policy and anchor images in one call each
            scores = self.score(rollouts, refs=batch.rollouts)
        if self.anchor_cache is not None:  # anchor scores of cached (report, seed) pairs; the new ones are kept
            scores = replace(scores, anchor=self.anchor_cache.complete(reports, seeds, batch.anchor_rows, scores.anchor),
                             anchor_rows=None)

        reference = self.reference_scores(scores)  # 3. RLCF: each image against its anchor reference
        rewards, components = combine(scores.policy, reference, cfg.rewards)

        with timer("update"):  # 4. DDPO on the learner
            update = self.get(self.roles.learner.update.remote(rewards, *trajectories))
        histograms = {"hist/reward_total": rewards}
        if "advantages" in update:  # DDPO's
            histograms["hist/advantages"] = update.pop("advantages")
        self.tracker.log_histograms(self.iteration + 1, histograms)

        with timer("broadcast"):  # 5. new LoRA + ACE to every worker (with overlap: queued behind their sampling)
            self.weight_version = self.broadcast(wait=not cfg.orchestration.overlap)

        self.iteration += 1
        scalars = self.iteration_scalars(rollouts, scores, reference, rewards, components, update, timer.seconds,
                                         time.perf_counter() - start)
        return {"rollout/staleness": float(staleness), **scalars}

    def run(self) -> dict:
        """Train to learner.iterations (from a resumed checkpoint if any); returns the start/end evaluation."""
        cfg, stage = self.cfg, "evaluate"
        try:
            if self.start_evaluation is None:
                self.start_evaluation = self.evaluate()
                log.info("start (held-out, %d reports): %s", len(self.eval_reports), format_brief(self.start_evaluation))
                self.log_grid()
            if cfg.rollout.precompute_anchor and not self.anchor_cache:
                stage = "precompute anchor"
                self.precompute_anchor()
            while self.iteration < cfg.learner.iterations and not self.out_of_time():
                try:
                    stage = "train"
                    scalars = self.train_step()
                    stage = "log"
                    self.train_seconds += scalars["timing/iteration"]
                    self.images_generated += int(scalars["rollout/images"])
                    scalars.update({"time/train_seconds": self.train_seconds, "time/images": self.images_generated})
                    if cfg.logging.eval_every and self.iteration % cfg.logging.eval_every == 0:
                        stage = "held-out check"
                        scalars.update(self.heldout_scalars())
                        stage = "log"
                    scalars.update(self.faults.log(self.iteration))
                    self.tracker.log_scalars(self.iteration, scalars)
                    self.roles.cluster.record(self.iteration, int(scalars["rollout/images"]), scalars[TOTAL_KEY],
                                              scalars)
                    log.info(format_progress(self.iteration, cfg.learner.iterations, scalars))
                    if self.iteration % cfg.logging.image_every == 0:
                        self.log_grid()
                    if self.iteration % cfg.logging.checkpoint_every == 0:
                        self.checkpoint()
                except RoleLost:
                    self.recover_learner()
            stage = "evaluate"
            end = self.evaluate()
        except Exception as error:
            raise RunFailed(self.failure_message(error, stage)) from error
        if self.last_checkpoint != self.iteration:
            self.checkpoint()
        results = {"iterations": self.iteration, "weight_version": self.weight_version,
                   "algorithm": cfg.learner.algorithm, "train_seconds": self.train_seconds,
                   "images_generated": self.images_generated,
                   "start": self.start_evaluation, "end": end, "paired_variance_ratio": self.paired_noise_report(),
                   "diag_metric": self.cfg.rewards.diag_metric}
        self.write_results(results)
        return results

    def out_of_time(self) -> bool:
        """learner.time_budget_minutes is spent (training time only: held-out checks and evaluation not counted)."""
        budget = self.cfg.learner.time_budget_minutes
        if budget is None or self.train_seconds < 60 * budget:
            return False
        if self.iteration < self.cfg.learner.iterations:
            log.info("time budget of %g min spent after %d iterations (%.0f s of training)", budget, self.iteration,
                     self.train_seconds)
        return True

    def heldout_scalars(self) -> dict[str, float]:
        """The policy alone on the held-out reports at the evaluation's fixed noise: direct rewards, their total and
        the classifier's mean AUROC against the reports' labels ('heldout/…'), for curves against training time."""
        _, rollouts = self.sample(self.eval_reports, ("eval", self.cfg.logging.eval_seed), with_anchor=False,
                                  identical_noise=True)
        scores = self.score(rollouts)
        found = {f"heldout/{name}": float(np.mean(values)) for name, values in scores.policy.items()}
        found["heldout/total"] = float(np.mean(direct_total(scores.policy, self.cfg)))
        if scores.diagnosis is not None:
            names = scores.diagnosis["class_names"]
            found["heldout/auroc"] = mean_auroc(scores.diagnosis["policy"], report_targets(scores.reports, names), names)
        return found

    def paired_noise_report(self) -> dict[str, float]:
        """Mean over iterations of Var(policy − anchor) / (Var(policy) + Var(anchor)) per reward, logged."""
        history = self.tracker.history()
        ratios = {name: float(np.mean([h[key] for h in history if key in h]))
                  for name in COMPONENTS if any((key := f"rlcf/paired_variance_ratio/{name}") in h for h in history)}
        if ratios:
            shared = "shared" if self.cfg.rollout.share_noise_with_anchor else "independent"
            log.info("%s policy/anchor noise: Var(policy − anchor) = %s × (Var(policy) + Var(anchor)), "
                     "mean over iterations (1.0 is what independent noise gives)", shared,
                     ", ".join(f"{v:.3f} ({k})" for k, v in ratios.items()))
        return ratios

    # ------------------------------------------------------------------ stages

    def submit_batch(self, iteration: int) -> SampledBatch:
        """Start sampling an iteration's reports on the workers (its anchor only where the cache lacks it)."""
        cfg = self.cfg
        reports = iteration_reports(self.train_pool, self.per_iteration, cfg.seed, iteration,
                                    cfg.rollout.samples_per_report, self.report_weights)
        seeds = (iteration_noise_seeds(reports, cfg.rollout.noise_seeds_per_report, cfg.seed, iteration)
                 if cfg.rollout.noise_seeds_per_report else None)
        if self.anchor_cache is not None:
            anchor_rows = self.anchor_cache.missing(reports, seeds)
        elif cfg.rollout.anchor_samples_per_report is not None:  # the first rows of each report's group
            group, kept = cfg.rollout.samples_per_report, cfg.rollout.anchor_samples_per_report
            anchor_rows = [i for i in range(len(reports)) if i % group < kept]
        else:
            anchor_rows = None
        spans = sampling_calls(len(reports), cfg.rollout.batch_size, len(self.roles.workers),
                               cfg.rollout.samples_per_report)
        trajectories, rollouts = self.sample(reports, ("train", cfg.seed, iteration), cfg.rewards.rlcf,
                                             row_seeds=seeds, anchor_rows=anchor_rows, wait=False, spans=spans)
        return SampledBatch(reports, seeds, anchor_rows, trajectories, rollouts)

    def sample(self, reports: list[str], seed_parts: tuple, with_anchor: bool, identical_noise: bool = False,
               row_seeds: list[int] | None = None, anchor_rows: list[int] | None = None, wait: bool = True,
               spans: list[tuple[int, int]] | None = None):
        """Split `reports` into calls over the workers → (trajectory refs, rollout images) in report order
        (rollout refs if not `wait`). `spans`: the calls' row ranges (default: rollout.batch_size rows each);
        `row_seeds` (anchor cache): per-row x_T seeds; `anchor_rows`: the rows that need an anchor image (None: all)."""
        size, workers, calls = self.cfg.rollout.batch_size, self.roles.workers, []
        spans = spans or [(start, min(start + size, len(reports))) for start in range(0, len(reports), size)]
        for k, (start, end) in enumerate(spans):
            seeds = row_seeds[start:end] if row_seeds is not None else None
            rows = [i - start for i in anchor_rows if start <= i < end] if anchor_rows is not None else None
            calls.append(workers[k % len(workers)].sample.options(num_returns=2).remote(
                reports[start:end], stable_seed(*seed_parts, k), with_anchor, identical_noise, seeds, rows))
        trajectories, rollouts = [trajectory for trajectory, _ in calls], [rollout for _, rollout in calls]
        return trajectories, self.get(rollouts) if wait else rollouts

    def score(self, rollouts, refs=None) -> Scores:
        """Direct scores of every reward for every rollout, all reward actors working concurrently. `refs`: the
        rollouts' object refs, passed to the actors instead of the values, so the images are not serialised
        again by the driver for each reward (the actors read them from the object store)."""
        sent = rollouts if refs is None else refs
        pending = {name: [replicas[k % len(replicas)].score.remote(rollout) for k, rollout in enumerate(sent)]
                   for name, replicas in self.roles.rewards.items()}
        scored = {name: self.get(refs) for name, refs in pending.items()}
        reports = [report for rollout in rollouts for report in rollout.reports]
        offsets = np.cumsum([0] + [len(r.reports) for r in rollouts])
        anchor_rows = [int(offset + i) for r, offset in zip(rollouts, offsets)
                       for i in (range(len(r.reports)) if r.anchor_rows is None else r.anchor_rows)]
        anchor_reports = [reports[i] for i in anchor_rows]
        policy = {name: np.concatenate([s.policy for s in results]) for name, results in scored.items()}
        has_anchor = rollouts[0].anchor_images is not None
        anchor = {name: np.concatenate([s.anchor for s in results]) for name, results in scored.items()} if has_anchor else None
        diagnosis = None
        if "diag" in scored and scored["diag"][0].policy_probabilities is not None:
            results = scored["diag"]
            diagnosis = {"class_names": results[0].class_names,
                         "policy": np.concatenate([s.policy_probabilities for s in results]),
                         "anchor": np.concatenate([s.anchor_probabilities for s in results]) if has_anchor else None}
        return Scores(reports, policy, anchor, None if anchor_rows == list(range(len(reports))) else anchor_rows,
                      {name: sum(s.seconds for s in results) for name, results in scored.items()}, diagnosis)

    def reference_scores(self, scores: Scores) -> dict[str, np.ndarray] | None:
        """Per reward, the anchor score [B] each policy image is compared with (rewards.anchor_reference)."""
        if scores.anchor is None:
            return None
        return anchor_reference(scores.reports, scores.anchor, scores.anchor_rows, self.cfg.rewards.anchor_reference)

    def precompute_anchor(self) -> None:
        """Sample and score the anchor on every (training report, x_T seed) pair once, into the cache."""
        start, size, workers = time.perf_counter(), self.cfg.rollout.batch_size, self.roles.workers
        pairs = [(r, pair_seed(r, j, self.cfg.seed)) for r in self.train_pool
                 for j in range(self.cfg.rollout.noise_seeds_per_report)]
        batches = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        images = [workers[k % len(workers)].anchor_images.remote([r for r, _ in b], [s for _, s in b])
                  for k, b in enumerate(batches)]
        pending = {name: [replicas[k % len(replicas)].score_images.remote(ref, [r for r, _ in b])
                          for k, (ref, b) in enumerate(zip(images, batches))]
                   for name, replicas in self.roles.rewards.items()}
        scores = {name: np.concatenate(self.get(refs)) for name, refs in pending.items()}
        reports, seeds = [r for r, _ in pairs], [s for _, s in pairs]
        self.anchor_cache.store(reports, seeds, scores)
        log.info("anchor scores precomputed for %d (report, seed) pairs in %.0f s", len(pairs),
                 time.perf_counter() - start)

    def broadcast(self, wait: bool = True) -> int:
        """Fetch the learner's newest LoRA + ACE, put them in the object store once, load them on every worker
        (not `wait`: the loads are queued and checked when the next batch is collected)."""
        published, self.loading = broadcast_weights(self.roles, wait)
        self.broadcast_bytes = published.nbytes
        return published.version

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Direct rewards of policy and anchor on the held-out reports, one seeded image each, both
        from identical noise: the difference is the weights' doing, measured with the least noise."""
        _, rollouts = self.sample(self.eval_reports, ("eval", self.cfg.logging.eval_seed), with_anchor=True,
                                  identical_noise=True)
        return evaluation_summary(self.score(rollouts), self.cfg)

    def log_grid(self) -> None:
        """Anchor vs policy for the first held-out reports, always the same noise: how the policy drifts."""
        reports = self.eval_reports[:GRID_REPORTS]
        _, rollouts = self.sample(reports, ("eval", self.cfg.logging.eval_seed), with_anchor=True, identical_noise=True)
        anchor = torch.cat([r.anchor_images for r in rollouts])
        policy = torch.cat([r.policy_images for r in rollouts])
        self.tracker.log_image_grid(self.iteration, reports, anchor, policy)

    def iteration_scalars(self, rollouts, scores: Scores, reference, rewards, components, update, seconds,
                          wall) -> dict:
        """Everything logged for one iteration, under namespaced keys."""
        # means over the finite values: a sample with a NaN reward is dropped from the update and counted
        scalars = {TOTAL_KEY: float(np.nanmean(rewards)),
                   "rollout/nonfinite_rewards": float((~np.isfinite(rewards)).sum())}
        paired = scores.anchor_rows if scores.anchor_rows is not None else slice(None)  # rows with their own anchor
        for name in COMPONENTS:
            scalars[REWARD_KEY.format(name=name, who="policy")] = float(np.nanmean(scores.policy[name]))
            if scores.anchor is not None:
                scalars[REWARD_KEY.format(name=name, who="anchor")] = float(np.nanmean(scores.anchor[name]))
                scalars[f"rlcf/paired_variance_ratio/{name}"] = paired_variance_ratio(scores.policy[name][paired],
                                                                                      scores.anchor[name])
        for name, values in components.items():
            scalars[REWARD_KEY.format(name=name, who="rlcf")] = float(np.nanmean(values))
        if reference is not None:
            policy_total, anchor_total = direct_total(scores.policy, self.cfg), direct_total(reference, self.cfg)
            scalars[WIN_RATE_KEY] = float(((policy_total > anchor_total) + 0.5 * (policy_total == anchor_total)).mean())
        # the learner's own figures under its algorithm's name (ddpo/approx_kl, draft/replay_error, …)
        algorithm = self.cfg.learner.algorithm
        scalars["loss/policy"] = update["loss"]
        scalars.update({f"{algorithm}/{key}": float(value) for key, value in update.items()
                        if key not in ("loss", "weight_version") and value is not None})
        images = sum(len(r.reports) + (len(r.anchor_images) if r.anchor_images is not None else 0) for r in rollouts)
        scalars["rollout/images"] = float(images)
        scalars["rollout/truncated_reports"] = float(sum(r.truncated for r in rollouts))
        if self.anchor_cache is not None:
            scalars["anchor/cache_hit_rate"] = self.anchor_cache.hits / max(1, self.anchor_cache.hits + self.anchor_cache.misses)
            scalars["anchor/cache_size"] = float(len(self.anchor_cache))
        scalars[THROUGHPUT_KEY] = images / wall
        scalars["broadcast/bytes"] = float(self.broadcast_bytes)
        for stage, value in seconds.items():
            scalars[TIMING_KEY.format(stage=stage)] = value
        for name, value in scores.seconds.items():
            scalars[TIMING_KEY.format(stage=f"reward_{name}")] = value
        for who in ("policy", "anchor"):
            spent = sum(r.seconds.get(who, 0.0) for r in rollouts)
            if spent:
                scalars[TIMING_KEY.format(stage=f"rollout_{who}")] = spent
        scalars["timing/iteration"] = wall
        return scalars

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Path:
        tensors, learner_state = self.get(self.roles.learner.state.remote())
        state = {"iteration": self.iteration, "weight_version": self.weight_version, "learner": learner_state,
                 "start_evaluation": self.start_evaluation, "config": self.cfg.model_dump(mode="json"),
                 "train_seconds": self.train_seconds, "images_generated": self.images_generated}
        folder = save_checkpoint(self.run_dir, self.iteration, tensors, state, keep=self.cfg.logging.keep_checkpoints)
        self.last_checkpoint = self.iteration
        return folder

    def recover_learner(self) -> None:
        """The learner died and a fresh one took its place: load the last checkpoint into it (none yet: the fresh
        learner is the run's start, its initialisation is seeded), forget what was logged after it, send its weights
        to the workers, and go on from there. Every iteration is then recorded once, and the run ends with the same
        iteration count and weight version as one without the fault."""
        failed_at = self.iteration
        if latest_checkpoint(self.run_dir) is not None:  # restore() loads the newest whole one
            self.restore()
        else:
            self.iteration = self.last_checkpoint = 0
        self.next_batch, self.loading = None, []
        self.tracker.rollback(self.iteration)
        self.weight_version = self.broadcast()
        self.faults.learner_recovered(self.iteration, failed_at - self.iteration)

    def restore(self) -> None:
        folder, state = restore_learner(self.run_dir, self.cfg, self.roles, self.get)
        self.iteration = self.last_checkpoint = state["iteration"]
        self.start_evaluation = state["start_evaluation"]
        self.train_seconds, self.images_generated = state.get("train_seconds", 0.0), state.get("images_generated", 0)
        log.info("resumed from %s (iteration %d, weight version %d)", folder, self.iteration, state["weight_version"])

    def failure_message(self, error: Exception, stage: str) -> str:
        saved = ""
        if stage != "train" and self.iteration > self.last_checkpoint:
            try:  # the learner's state is whole between iterations: keep the progress
                saved = f"; saved iteration {self.iteration} to {self.checkpoint()}"
            except Exception as again:  # the learner itself may be what died
                saved = f"; could not save a checkpoint ({type(again).__name__})"
        return (f"training stopped at iteration {self.iteration} during {stage}: {type(error).__name__}: {error}"
                f"{saved}. Fix the cause, then {resume_hint(self.run_dir)}.")

    # ------------------------------------------------------------------ results

    def write_results(self, results: dict) -> None:
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=1))
        (self.run_dir / "results.md").write_text(format_results_table(results) + "\n")
        self.tracker.write_reward_curves()
        self.tracker.close()


class FaultLog:
    """Actor failures of a run, as the cluster recovered them: faults.jsonl, a log line, and `faults/...` scalars."""

    def __init__(self, cluster, tracker: RunTracker):
        self.cluster, self.tracker, self.counts = cluster, tracker, Counter()

    def log(self, iteration: int) -> dict[str, float]:
        """Write the failures since the last call; returns the cumulative counts as scalars (faults/total from the
        first iteration, faults/<kind> once that kind has failed)."""
        self.record(iteration, self.cluster.drain_faults())
        return {f"faults/{kind}": float(n) for kind, n in self.counts.items()}

    def record(self, iteration: int, faults: list[dict]) -> None:
        self.tracker.log_faults(iteration, faults)
        self.counts.update(f["kind"] for f in faults)
        self.counts.update(total=len(faults))

    def learner_recovered(self, iteration: int, rolled_back: int) -> None:
        """The learner's failure, once its replacement has its checkpoint and the workers its weights."""
        faults = self.cluster.drain_faults()
        for fault in faults:
            if fault["kind"] == "learner":
                fault.update(recovery_s=round(time.perf_counter() - fault.pop("noticed"), 3),
                             restored_iteration=iteration, iterations_rolled_back=rolled_back)
                log.warning("learner restored to iteration %d (%d completed iteration(s) to redo) in %.1f s",
                            iteration, rolled_back, fault["recovery_s"])
        self.record(iteration, faults)


def resume_hint(run_dir: Path) -> str:
    """What a person can do after a failure: resume from the latest checkpoint, if there is one."""
    latest = latest_checkpoint(run_dir)
    return f"rerun with --resume to continue from {latest.name}" if latest else "no checkpoint was written yet"


def broadcast_weights(roles: Roles, wait: bool = True):
    """The learner's newest published adapter tensors → one object-store copy → loaded by every worker.
    Returns (published, pending load refs): none pending when `wait`, else the caller gets them later."""
    get = roles.cluster.get
    published = get(roles.learner.publish.remote())
    ref = roles.cluster.put(published)  # one object; each worker reads the same copy
    loads = [worker.load_weights.remote(ref) for worker in roles.workers]
    if not wait:
        return published, loads
    held = get(loads)
    if any(version != published.version for version in held):
        raise RuntimeError(f"workers hold weight versions {held} after broadcasting {published.version}")
    return published, []


def restore_learner(run_dir: Path, cfg: ExperimentConfig, roles: Roles, get) -> tuple[Path, dict]:
    """Load the run's latest checkpoint into the learner (after checking the config may resume it)."""
    found = valid_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {Path(run_dir) / 'checkpoints'}; "
                                "start without --resume (or point logging.run_dir at the run to continue)")
    folder, tensors, state = found
    check_resumable(state["config"], cfg.model_dump(mode="json"))
    get(roles.learner.load_state.remote(tensors, state["learner"]))
    return folder, state


def format_brief(summary: dict) -> str:
    parts = [f"{name} {summary[name]['policy']:+.3f}/{summary[name]['anchor']:+.3f}" for name in (*COMPONENTS, "total")]
    return "  ".join(parts) + "  (policy/anchor)"


def format_progress(iteration: int, total: int, scalars: dict) -> str:
    parts = [f"iter {iteration:>4}/{total}", f"reward {scalars[TOTAL_KEY]:+.4f}"]
    parts += [f"{name} {scalars[REWARD_KEY.format(name=name, who='rlcf')]:+.4f}" for name in COMPONENTS
              if REWARD_KEY.format(name=name, who="rlcf") in scalars]
    if WIN_RATE_KEY in scalars:
        parts.append(f"win {scalars[WIN_RATE_KEY]:.2f}")
    if "ddpo/approx_kl" in scalars:
        parts.append(f"kl {scalars['ddpo/approx_kl']:.1e}")
    if "draft/reward" in scalars:  # the differentiable reward the update ascended
        parts.append(f"draft reward {scalars['draft/reward']:+.4f}")
    if "heldout/total" in scalars:
        parts.append(f"held-out {scalars['heldout/total']:+.4f}"
                     + (f" auroc {scalars['heldout/auroc']:.3f}" if "heldout/auroc" in scalars else ""))
    parts += [f"{scalars[THROUGHPUT_KEY]:.1f} img/s", f"{scalars['timing/iteration']:.1f} s"]
    return "  ".join(parts)


def format_results_table(results: dict) -> str:
    """Markdown: each reward component for policy and anchor at the start and the end (held-out reports)."""
    lines = ["| held-out (direct scores) | anchor | policy, start | policy, end | end: policy − anchor (± s.e.) |",
             "|---|---|---|---|---|"]
    start, end = results["start"], results["end"]
    diag = {"balanced": "diagnostic balanced accuracy", "prevalence_weighted": "diagnostic score, prevalence-weighted"
            }.get(results.get("diag_metric"), "diagnostic accuracy")
    labels = {"align": "r_align", "diag": diag, "consist": "CLIP cosine",
              "total": "total (λ-weighted)"}
    for key, label in labels.items():
        anchor = end[key]["anchor"]
        lines.append(f"| {label} | {anchor:.4f} | {start[key]['policy']:.4f} | {end[key]['policy']:.4f} | "
                     f"{end[key]['policy'] - anchor:+.4f} ± {end[key]['difference_se']:.4f} |")
    lines.append(f"| win rate vs anchor (total) | | {start['win_rate']['policy']:.3f} | {end['win_rate']['policy']:.3f} | |")
    if "diagnosis" in end:
        lines += ["", "End of training, diagnosis (the paper's metric; r_diag above is its reward):", "",
                  format_diagnosis_table(end["diagnosis"])]
    return "\n".join(lines)


def format_seed_summary(names: list[str], results: list[dict]) -> str:
    """Markdown: end-of-run policy − anchor per reward for each run, then mean ± std (ddof 1) across runs."""
    keys = (*COMPONENTS, "total")
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    differences = np.array([[r["end"][k]["policy"] - r["end"][k]["anchor"] for k in keys] for r in results])
    for name, row in zip(names, differences):
        lines.append(f"| {name} | " + " | ".join(f"{v:+.4f}" for v in row) + " |")
    if len(results) > 1:
        mean, std = differences.mean(axis=0), differences.std(axis=0, ddof=1)
        lines.append("| mean ± std | " + " | ".join(f"{m:+.4f} ± {s:.4f}" for m, s in zip(mean, std)) + " |")
    return "\n".join(lines)
