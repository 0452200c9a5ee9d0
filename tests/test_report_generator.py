"""The LM-RRG model on the shipped tiny CLIP and report LM: shapes, region prompts, log-probs, stages."""

import numpy as np
import pytest
import torch

from radrl.config import load_config
from radrl.learner.ppo_learner import ReportLearner
from radrl.learner.ppo import group_advantages
from radrl.models.report_generator import REGION_PROMPTS, RegionBlock, build_report_policy
from radrl.rollout.report_worker import ReportRolloutWorker

REPORTS = ["Heart size is normal. No pleural effusion or pneumothorax.", "Moderate cardiomegaly. Small left effusion.",
           "The lungs are clear.", "Right upper lobe consolidation."]
GROUPS = [0, 0, 1, 1]  # two images, two sampled reports each


def config(**overrides):
    settings = {"task": "rrg", "models.report_generator.max_new_tokens": 24, "rollout.batch_size": 4,
                "rollout.samples_per_report": 2, "learner.batch_size": 4, "learner.clip_range": 0.2,
                "learner.lora_rank": 4}
    settings.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in settings.items()])


def images(n=4, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def rl_stage(cfg):
    """A learner past the supervised stage and a worker holding its weights (version 0)."""
    learner = ReportLearner(cfg)
    learner.start_rl()
    worker = ReportRolloutWorker(cfg)
    worker.load_supervised(learner.supervised_weights())
    worker.load_weights(learner.publish())
    return learner, worker


def test_29_chest_imagenome_regions_each_with_its_own_prompt():
    assert len(REGION_PROMPTS) == 29 and len(set(REGION_PROMPTS.values())) == 29


def test_region_block_keeps_shapes_and_depends_on_the_region_text():
    torch.manual_seed(0)
    block = RegionBlock(width=32, text_width=16, heads=2)
    patches = torch.randn(3, 10, 32)
    out_a, out_b = block(patches, torch.randn(3, 1, 16)), block(patches, torch.randn(3, 1, 16))
    assert out_a.shape == (3, 10, 32)
    assert not torch.allclose(out_a, out_b)


def test_the_papers_region_block_adds_one_vector_to_every_patch():
    """Patches query a single region key: the softmax over one key is 1, so cross-attention gives every patch
    the same vector W_o·W_v·F_T^k, whatever the patch: the degeneracy that region_query avoids."""
    torch.manual_seed(0)
    block = RegionBlock(width=32, text_width=16, heads=2)
    patches, text = torch.randn(2, 10, 32), torch.randn(2, 1, 16)
    added = block.cross(block.norm_ca(patches), text, text, need_weights=False)[0]
    assert torch.allclose(added, added[:, :1].expand_as(added), atol=1e-6)


def test_region_queries_attend_differently_by_region_and_by_image():
    generator = build_report_policy(config(), "cpu").generator
    features, attention = generator.extractor.features_and_attention(images(2))
    patches = generator.extractor.clip.patch_tokens(images(1)).shape[1]
    assert attention.shape == (2, 29, patches)  # every region over the full patch grid
    assert torch.allclose(attention.sum(dim=-1), torch.ones(2, 29), atol=1e-5)
    assert (attention[0, 0] - attention[0, 8]).abs().max() > 1e-6  # right lung ≠ left lung, even untrained
    assert (features[0, 1:] - features[1, 1:]).abs().max() > 1e-3  # region features depend on the image


def test_visual_features_one_global_and_one_per_region_and_regions_differ_by_prompt():
    generator = build_report_policy(config(), "cpu").generator
    features = generator.extractor(images(2))
    assert features.shape == (2, 1 + 29, generator.extractor.width)
    regions = features[0, 1:]
    assert torch.cdist(regions, regions).fill_diagonal_(1.0).min() > 1e-3  # every region's feature is its own
    prompts = generator.prompt_embeddings(generator.visual_features(images(2)))
    instruction = len(generator.instruction_ids)
    # [global, 29 regions], 14 disease-prompt tokens, the instruction and BOS
    assert prompts.shape == (2, 30 + 14 + instruction, generator.decoder.get_input_embeddings().embedding_dim)


def test_recomputed_token_log_probs_equal_the_sampled_ones():
    learner, worker = rl_stage(config())
    trajectory, rollout = worker.sample(images().numpy(), REPORTS, GROUPS, seed=3)
    assert len(rollout.reports) == 4 and trajectory.weight_version == 0
    generator = learner.policy.generator
    with torch.no_grad():
        again = generator.token_log_probs(generator.frozen_prompts(trajectory.images), trajectory.tokens, trajectory.mask)
    assert torch.allclose((again - trajectory.log_probs).exp(), torch.ones_like(again), atol=1e-4)
    # a fresh RL LoRA starts at zero: the policy is the reference
    assert torch.allclose(trajectory.log_probs, trajectory.ref_log_probs, atol=1e-5)


def test_supervised_stage_lowers_the_report_loss_on_pairs_it_sees():
    from radrl.data.pairs import ImageReportSet
    from radrl.data.labeler import label_reports

    learner = ReportLearner(config(**{"learner.supervised_batch_size": 4, "learner.supervised_lr": 1e-3}))
    data = ImageReportSet(images().numpy(), tuple(REPORTS), label_reports(REPORTS))
    before = learner.validation_loss(data)["report"]
    for epoch in range(8):
        learner.supervised_epoch(data, epoch)
    after = learner.validation_loss(data)
    assert after["report"] < before - 0.5
    assert np.isfinite(after["reliance_gap"]) and after["reliance_gap_se"] >= 0


def test_group_advantages_hand_computed():
    rewards, groups = np.array([1.0, 2.0, 6.0, 5.0, 5.0, 5.0]), [7, 7, 7, 3, 3, 3]
    # leave-one-out: 1 − (2 + 6)/2 = −3, 2 − 3.5 = −1.5, 6 − 1.5 = 4.5; a group of equal rewards gives 0
    assert group_advantages(rewards, groups, "rloo") == pytest.approx([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert group_advantages(rewards, groups, "group_mean") == pytest.approx([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="needs 2 or more"):
        group_advantages(np.array([1.0, 2.0]), [0, 1], "rloo")


def test_theta_comes_from_the_first_batch_and_target_kl_stops_epochs_early():
    learner, worker = rl_stage(config(**{"learner.inner_epochs": 4, "learner.batch_size": 2,
                                         "learner.target_kl": 1e-12}))
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    rewards = np.array([0.2, 0.4, 0.6, 0.8])
    metrics = learner.update(rewards, trajectory)
    assert learner.kl_threshold == pytest.approx(np.quantile(rewards, 0.75))
    assert metrics["lambda_kl"] == pytest.approx(np.mean(np.minimum(rewards / learner.kl_threshold, 1.0)))
    assert metrics["steps_done"] < 1.0 and metrics["entropy"] > 0


def test_ppo_update_changes_only_the_rl_lora():
    learner, worker = rl_stage(config())
    before = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    metrics = learner.update(np.array([1.0, 0.0, 0.5, 2.0]), trajectory)
    assert metrics["weight_version"] == 1 and np.isfinite(metrics["loss"])
    changed = {n for n, p in learner.policy.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and all("lora_" in n for n in changed)


def test_learner_refuses_stale_reports_and_a_wrong_number_of_rewards():
    learner, worker = rl_stage(config())
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    with pytest.raises(ValueError, match="3 rewards for 4"):
        learner.update(np.zeros(3), trajectory)
    learner.update(np.arange(4.0), trajectory)
    with pytest.raises(ValueError, match="weight version 0 given to the learner at version 1"):
        learner.update(np.arange(4.0), trajectory)


def test_empty_reference_report_is_refused_with_advice():
    generator = build_report_policy(config(), "cpu").generator
    with pytest.raises(ValueError, match="empty report"):
        generator.encode_reports(["Normal.", "  "])


def test_fixed_lambda_kl_needs_no_theta_even_when_every_reward_is_zero():
    learner, worker = rl_stage(config(**{"learner.adaptive_kl": "false"}))
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    metrics = learner.update(np.zeros(4), trajectory)  # a zero θ would be refused; fixed λ_KL never uses it
    assert learner.kl_threshold is None and metrics["lambda_kl"] == 1.0 and np.isnan(metrics["kl_threshold"])
