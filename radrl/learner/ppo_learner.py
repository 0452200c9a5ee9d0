"""The LM-RRG learner: the supervised stage, then CQRL (PPO with an adaptive KL to the reference).

It owns the report policy and its optimizer. The supervised stage trains the visual extractor's
region blocks, VTrans, the projection, the disease head and the decoder (or its LoRA); the RL
stage trains only a fresh LoRA on the decoder, with the visual extractor frozen.
"""

from __future__ import annotations

import numpy as np
import torch

from radrl.config import ExperimentConfig
from radrl.data.pairs import ImageReportSet
from radrl.data.report_pool import repeat_factors
from radrl.learner.ddpo import check_update_batch, finite_rows
from radrl.learner.ppo import adaptive_lambda_kl, group_advantages, ppo_loss
from radrl.learner.state import load_training_state, training_state
from radrl.models.diffusion_policy import PublishedWeights
from radrl.models.report_generator import build_report_policy, counterfactual_observations, disease_pos_weights
from radrl.rollout.report_worker import ReportTrajectory, concat_report_trajectories
from radrl.rollout.worker import device_for


def epoch_order(labels: np.ndarray, threshold: float | None, seed) -> np.ndarray:
    """One supervised epoch's pair indices, shuffled: each pair once, or with repeat-factor sampling floor(r) times
    plus once more with probability r − floor(r)."""
    rng = np.random.default_rng(seed)
    if threshold is None:
        return rng.permutation(len(labels))
    factors = repeat_factors(labels, threshold)
    counts = np.floor(factors).astype(int) + (rng.random(len(factors)) < factors - np.floor(factors))
    return rng.permutation(np.repeat(np.arange(len(labels)), counts))


class ReportLearner:
    """Supervised training, then PPO updates of the RL LoRA; publishes weights for the rollout workers."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.device = device_for(cfg.learner.resources.num_gpus)
        self.policy = build_report_policy(cfg, self.device)
        self.optimizer = self._optimizer(self.policy.supervised_parameters(), cfg.learner.supervised_lr)
        # θ of the adaptive λ_KL: learner.kl_threshold, or set from the first CQRL batch's rewards (then fixed)
        self.kl_threshold: float | None = cfg.learner.kl_threshold
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)  # minibatch order
        self.supervised_tensors: dict[str, torch.Tensor] | None = None  # kept after the stage, for checkpoints
        self.version = 0

    def _optimizer(self, parameters, lr: float) -> torch.optim.AdamW:
        learner = self.cfg.learner
        return torch.optim.AdamW(parameters, lr=lr, betas=learner.adam_betas, weight_decay=learner.weight_decay,
                                 eps=learner.adam_eps)

    # ------------------------------------------------------------------ supervised stage

    def supervised_epoch(self, data: ImageReportSet, epoch: int) -> dict[str, float]:
        """One pass over the training pairs in a seeded order: L_report + λ·L_disease, AdamW."""
        self._require_stage("supervised")
        self.policy.train()
        generator = self.policy.generator
        size = self.cfg.learner.supervised_batch_size
        order = epoch_order(data.labels, self.cfg.learner.repeat_factor_threshold, [self.cfg.seed, epoch])
        rg = self.cfg.models.report_generator
        weights = disease_pos_weights(np.asarray(data.labels), rg.disease_pos_weight, rg.disease_unmentioned)
        pos_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=self.device)
        dropout = rg.visual_prompt_dropout
        # visual-prompt dropout and counterfactual observations: one seeded stream each
        draws, flips = (torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
                        for key in ([self.cfg.seed, epoch], [self.cfg.seed, epoch, 1]))
        totals: dict[str, list[float]] = {"loss": [], "report": [], "disease": [], "grad_norm": []}
        if rg.counterfactual_weight:
            totals.update(counterfactual=[], counterfactual_gap=[])
        for start in range(0, len(order), size):
            batch = data.take(order[start:start + size])
            images = torch.from_numpy(batch.images).to(self.device)
            labels = torch.from_numpy(batch.labels).to(self.device)
            drop = (torch.rand(len(batch), generator=draws) < dropout).to(self.device) if dropout else None
            flip = counterfactual_observations(labels, flips) if rg.counterfactual_weight else None
            loss, parts = generator.supervised_loss(images, list(batch.reports), labels, rg.disease_weight, pos_weight,
                                                    drop, flip, rg.counterfactual_weight, rg.counterfactual_margin)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = self._clip_and_step(self.policy.supervised_parameters(), "supervised")
            totals["loss"].append(float(loss.detach()))
            totals["grad_norm"].append(grad_norm)
            for key, value in parts.items():
                totals[key].append(value)
        self.policy.eval()
        self.fit_operating_points(data)
        return {key: float(np.mean(values)) for key, values in totals.items()}

    def _batches(self, data: ImageReportSet):
        """The pairs in order, in supervised-batch-size chunks (copies: object-store arrays are read-only)."""
        size = self.cfg.learner.supervised_batch_size
        for start in range(0, len(data), size):
            yield data.take(np.arange(start, min(start + size, len(data))))

    @torch.no_grad()
    def fit_operating_points(self, data: ImageReportSet) -> np.ndarray:
        """The disease head's decision thresholds from its logits on the training pairs (see
        ReportGenerator.fit_operating_points); generation reads the head through them."""
        generator = self.policy.generator
        features = (generator.visual_features(torch.from_numpy(b.images).to(self.device)) for b in self._batches(data))
        logits = torch.cat([generator.disease_logits(f) for f in features])
        return generator.fit_operating_points(logits, torch.from_numpy(np.array(data.labels))).numpy()

    @torch.no_grad()
    def validation_loss(self, data: ImageReportSet) -> dict[str, float]:
        """Mean supervised losses on held-out pairs (no update), and the image-reliance gap.

        reliance_gap = mean over reports of [NLL(report | another report's image) − NLL(report | its image)],
        the other image fixed by a seeded derangement; > 0 means the decoder reads the image. With its s.e.
        """
        generator = self.policy.generator
        sums, count = {"report": 0.0, "disease": 0.0}, 0
        for batch in self._batches(data):
            _, parts = generator.supervised_loss(torch.from_numpy(batch.images).to(self.device), list(batch.reports),
                                                 torch.from_numpy(batch.labels).to(self.device), 1.0)
            for key in sums:
                sums[key] += parts[key] * len(batch)
            count += len(batch)
        result = {key: value / count for key, value in sums.items()}
        gap = self.reliance_gaps(data)
        result.update(reliance_gap=float(gap.mean()), reliance_gap_se=float(gap.std(ddof=1) / np.sqrt(len(gap))))
        return result

    @torch.no_grad()
    def reliance_gaps(self, data: ImageReportSet) -> np.ndarray:
        """Per held-out report: NLL with another report's image minus NLL with its own image [N]."""
        generator, size = self.policy.generator, self.cfg.learner.supervised_batch_size
        order = np.random.default_rng(self.cfg.seed).permutation(len(data))
        other = np.empty(len(data), dtype=int)
        other[order] = np.roll(order, 1)  # a derangement: no report keeps its own image
        gaps = []
        for start in range(0, len(data), size):
            index = np.arange(start, min(start + size, len(data)))
            reports = [data.reports[i] for i in index]
            own = generator.report_nll(torch.from_numpy(data.images[index]).to(self.device), reports)
            swapped = generator.report_nll(torch.from_numpy(data.images[other[index]]).to(self.device), reports)
            gaps.append((swapped - own).cpu().numpy())
        return np.concatenate(gaps)

    @torch.no_grad()
    def greedy(self, images: np.ndarray) -> list[str]:
        """Greedy-decoded reports of the current model (validation during the supervised stage)."""
        # a copy: object-store arrays are read-only
        return self.policy.generator.greedy_reports(torch.from_numpy(np.array(images)).to(self.device))

    @torch.no_grad()
    def region_attention(self, images: np.ndarray) -> np.ndarray | None:
        """Each region's attention over the patch grid [B, K, N] (region_query blocks; None for the paper's form)."""
        pixels = torch.from_numpy(np.array(images)).to(self.device)
        attention = self.policy.generator.extractor.features_and_attention(pixels)[1]
        return None if attention is None else attention.cpu().numpy()

    def start_rl(self) -> str:
        """End the supervised stage: keep its tensors, merge them, add the RL LoRA and its optimizer."""
        self._require_stage("supervised")
        self.supervised_tensors = {k: v.detach().cpu().clone() for k, v in self.policy.supervised_state().items()}
        self.policy.start_rl()
        self.optimizer = self._optimizer(self.policy.rl_parameters(), self.cfg.learner.lr)
        return self.policy.stage

    def supervised_weights(self) -> PublishedWeights:
        """The supervised stage's result, for the rollout workers (sent once per run)."""
        self._require_stage("rl")
        tensors = {k: v.numpy() for k, v in self.supervised_tensors.items()}
        return PublishedWeights(-1, tensors)

    def load_supervised(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install another run's finished supervised stage (learner.supervised_checkpoint) before the hand-over."""
        self._require_stage("supervised")
        self.policy.load_supervised_state(tensors)

    def _require_stage(self, stage: str) -> None:
        if self.policy.stage != stage:
            raise RuntimeError(f"the learner is in its {self.policy.stage} stage, not {stage}")

    # ------------------------------------------------------------------ RL stage

    def publish(self) -> PublishedWeights:
        """This version's RL LoRA tensors as numpy (adapter tensors only)."""
        self._require_stage("rl")
        return PublishedWeights(self.version, {k: v.cpu().numpy().copy() for k, v in self.policy.rl_state().items()})

    def load_rl(self, tensors: dict[str, torch.Tensor]) -> int:
        """Install an earlier iteration's RL LoRA (CQRL's validation selection); a new version for the workers."""
        self._require_stage("rl")
        self.policy.load_rl_state(tensors)
        self.version += 1
        return self.version

    def lambda_kl(self, rewards: np.ndarray) -> np.ndarray:
        """Per-report KL weight: the adaptive rule with θ, or learner.lambda_kl when adaptive_kl is off."""
        learner = self.cfg.learner
        if learner.adaptive_kl:
            return adaptive_lambda_kl(rewards, self.kl_threshold)
        return np.full(len(rewards), learner.lambda_kl)

    def update(self, rewards: np.ndarray, *trajectories: ReportTrajectory) -> dict[str, float]:
        """One PPO round with a group baseline (learner.rrg_advantage 'rloo' or 'group_mean'); see update_with."""
        return self.update_with(rewards, None, *trajectories)

    def update_with(self, rewards: np.ndarray, greedy_rewards: np.ndarray | None,
                    *trajectories: ReportTrajectory) -> dict[str, float]:
        """One PPO round on this iteration's reports (rewards in the same order; greedy_rewards: each row's greedy
        report's reward, for rrg_advantage 'greedy'); bumps the version.

        Epochs over shuffled minibatches; with learner.target_kl they stop early once a minibatch's
        approximate KL to the sampling policy exceeds it. All or nothing: a non-finite gradient in any
        minibatch undoes the whole round (LoRA, optimizer, RNG, θ) before it raises.
        """
        self._require_stage("rl")
        batch = concat_report_trajectories(list(trajectories))
        rewards = check_update_batch(rewards, len(batch.references), batch.weight_version, self.version,
                                     self.cfg.orchestration.max_staleness)
        log_probs = torch.cat([batch.log_probs, batch.ref_log_probs], dim=1).numpy()
        if greedy_rewards is not None:  # a row whose greedy baseline is non-finite has no advantage: dropped too
            greedy_rewards = np.asarray(greedy_rewards, dtype=np.float64)
            rewards = np.where(np.isfinite(greedy_rewards), rewards, np.nan)
        keep = finite_rows(rewards, log_probs, self.cfg.learner.max_nonfinite_fraction)
        dropped = int((~keep).sum())
        if dropped:
            batch, rewards = batch.select(keep), rewards[keep]
            greedy_rewards = None if greedy_rewards is None else greedy_rewards[keep]
        lora = {name: tensor.clone() for name, tensor in self.policy.rl_state().items()}
        snapshot, threshold = training_state(self.optimizer, self.generator, None, self.version), self.kl_threshold
        try:
            return {**self._update(batch, rewards, greedy_rewards), "dropped_nonfinite": dropped}
        except FloatingPointError:
            self.policy.load_rl_state(lora)
            self.version = load_training_state(self.optimizer, self.generator, None, *snapshot, self.device)
            self.kl_threshold = threshold
            raise

    def _update(self, batch: ReportTrajectory, rewards: np.ndarray, greedy_rewards: np.ndarray | None
                ) -> dict[str, float]:
        learner = self.cfg.learner
        if learner.adaptive_kl and self.kl_threshold is None:  # θ from the reward's scale: a first-batch quantile
            self.kl_threshold = float(np.quantile(rewards, learner.kl_threshold_quantile))
            if self.kl_threshold <= 0:
                raise ValueError(f"the first CQRL batch's reward quantile {learner.kl_threshold_quantile} is "
                                 f"{self.kl_threshold:.4g}: θ must be > 0; set learner.kl_threshold")
        advantages = group_advantages(rewards, batch.groups, learner.rrg_advantage, greedy_rewards)
        compared = rewards if greedy_rewards is None else np.stack([rewards, greedy_rewards], axis=1)
        zero_variance = float(np.mean([np.ptp(compared[np.asarray(batch.groups) == g]) == 0
                                       for g in np.unique(batch.groups)]))
        advantages = torch.as_tensor(advantages, dtype=torch.float32, device=self.device).clamp(
            -learner.adv_clip_max, learner.adv_clip_max)
        lambda_kl = self.lambda_kl(rewards)
        generator = self.policy.generator
        tokens, mask = batch.tokens.to(self.device), batch.mask.to(self.device)
        old, ref = batch.log_probs.to(self.device), batch.ref_log_probs.to(self.device)
        prompts = generator.frozen_prompts(batch.images.to(self.device))  # the extractor is frozen: constants
        weights = torch.as_tensor(learner.kl_coef * lambda_kl, dtype=torch.float32, device=self.device)
        token_norm = None if learner.rrg_token_norm == "report_length" else \
            self.cfg.models.report_generator.max_new_tokens
        stats: dict[str, list[float]] = {}
        steps, planned, stopped = 0, learner.inner_epochs * -(-len(rewards) // learner.batch_size), False
        for _ in range(learner.inner_epochs):
            order = torch.randperm(len(rewards), generator=self.generator).to(self.device)
            for start in range(0, len(order), learner.batch_size):
                index = order[start:start + learner.batch_size]
                log_probs, entropy = generator.token_log_probs(prompts[index], tokens[index], mask[index],
                                                               with_entropy=True,
                                                               temperature=self.cfg.rollout.report_temperature)
                loss, info = ppo_loss(log_probs, old[index], ref[index], mask[index], advantages[index],
                                      weights[index], learner.clip_range, token_norm)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                info["grad_norm"] = self._clip_and_step(self.policy.rl_parameters(), "PPO")
                info["loss"] = float(loss.detach())
                info["entropy"] = float((entropy * mask[index]).sum() / mask[index].sum().clamp(min=1))
                for key, value in info.items():
                    stats.setdefault(key, []).append(value)
                steps += 1
                if learner.target_kl is not None and info["approx_kl"] > learner.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        self.version += 1
        metrics = {key: float(np.mean(values)) for key, values in stats.items()}
        metrics.update(lambda_kl=float(lambda_kl.mean()), lambda_kl_below_one=float((lambda_kl < 1).mean()),
                       kl_threshold=float(self.kl_threshold) if learner.adaptive_kl else float("nan"),
                       advantage_abs=float(advantages.abs().mean()), zero_variance_groups=zero_variance,
                       advantages=advantages.cpu().numpy(),  # for the TensorBoard histogram
                       steps_done=steps / planned, optimizer_steps=steps, trajectories=len(rewards),
                       weight_version=self.version)
        return metrics

    def _clip_and_step(self, parameters, what: str) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.cfg.learner.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"{what} gradient norm is {float(grad_norm)} at weight version {self.version}; "
                                     "lower the learning rate (this step was not applied"
                                     + (", and the whole update was undone)" if what == "PPO" else ")"))
        self.optimizer.step()
        return float(grad_norm)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able) of everything a resumed run needs."""
        rl = self.policy.stage == "rl"
        supervised = self.supervised_tensors if rl else self.policy.supervised_state()
        tensors = {f"supervised/{k}": v.detach().cpu().clone() for k, v in supervised.items()}
        if rl:
            tensors.update({f"rl/{k}": v.detach().cpu().clone() for k, v in self.policy.rl_state().items()})
        state, meta = training_state(self.optimizer, self.generator, None, self.version)
        tensors.update(state)
        meta.update(stage=self.policy.stage, kl_threshold=self.kl_threshold)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what `state` returned (into a freshly built learner)."""
        self._require_stage("supervised")
        supervised = {k.removeprefix("supervised/"): v for k, v in tensors.items() if k.startswith("supervised/")}
        if meta["stage"] == "rl":
            self.supervised_tensors = supervised
            self.policy.start_rl(supervised)
            self.policy.load_rl_state({k.removeprefix("rl/"): v for k, v in tensors.items() if k.startswith("rl/")})
            self.optimizer = self._optimizer(self.policy.rl_parameters(), self.cfg.learner.lr)
        else:
            self.policy.load_supervised_state(supervised)
        self.version = load_training_state(self.optimizer, self.generator, None, tensors, meta, self.device)
        self.kl_threshold = meta["kl_threshold"]
