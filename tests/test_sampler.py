"""Diffusion policy and sampler: recorded log-probs are reproduced under unchanged weights, the
anchor is the base model, and only LoRA + ACE can train."""

import pytest
import torch

from radrl.config import DiffusionModelConfig
from radrl.models.diffusion import build_diffusion
from radrl.models.diffusion_policy import DiffusionPolicy
from radrl.rollout.sampler import sample_trajectories, step_log_prob, text_conditions

REPORTS = ["Heart size is enlarged. Small right pleural effusion.", "No acute cardiopulmonary abnormality."]


def make_policy(ace_tokens=3):
    torch.manual_seed(0)
    models = build_diffusion(DiffusionModelConfig(), image_size=32)
    return DiffusionPolicy(models, lora_rank=4, lora_alpha=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
                           ace_tokens=ace_tokens).eval()


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_recomputed_log_probs_give_ratio_one(guidance):
    policy = make_policy()
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    trajectory = sample_trajectories(policy, REPORTS, num_steps=5, eta=1.0, guidance_scale=guidance,
                                     initial_noise=noise, weight_version=0, generator=torch.Generator().manual_seed(2))
    assert trajectory.latents.shape == (2, 6, 1, 32, 32) and trajectory.log_probs.shape == (2, 5)
    assert trajectory.images.shape == (2, 1, 32, 32)
    cond, uncond = text_conditions(policy, REPORTS)
    with torch.no_grad():
        for step in range(5):
            again = step_log_prob(policy, trajectory, step, cond, uncond, eta=1.0, guidance_scale=guidance)
            ratio = (again - trajectory.log_probs[:, step]).exp()
            assert torch.allclose(ratio, torch.ones(2), atol=1e-6)  # 100× inside DDPO's clip range (1e-4)


def test_anchor_is_the_base_model_without_adapters():
    policy = make_policy()
    base = build_diffusion(DiffusionModelConfig(), image_size=32).unet.eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(500)
    cond, uncond = text_conditions(policy, REPORTS)
    with torch.no_grad():
        with policy.anchor():
            anchor_eps = policy.predict_noise(x, t, cond, uncond, guidance_scale=1.0)
        policy_eps = policy.predict_noise(x, t, cond, uncond, guidance_scale=1.0)
        base_eps = base(x, t, encoder_hidden_states=cond).sample
    assert torch.allclose(anchor_eps, base_eps, atol=1e-5)
    assert not torch.allclose(policy_eps, base_eps, atol=1e-3)  # ACE prefix + Gaussian-initialised LoRA


def test_only_lora_and_ace_are_trainable():
    policy = make_policy()
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert "ace" in trainable and all(n == "ace" or "lora_" in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert set(policy.trainable_state()) == trainable
