"""Speed settings of the diffusion policy (`models.diffusion.precision / channels_last / compile`):
bf16 keeps the adapters, latents and log-probs in fp32 and still trains only LoRA + ACE; channels-last
and torch.compile change nothing but speed. Run on CPU with the tiny model (bf16 works there too)."""

import shutil

import numpy as np
import pytest
import torch

from radrl.config import DiffusionModelConfig, load_config
from radrl.learner.ddpo_learner import DDPOLearner
from radrl.models.diffusion import build_diffusion
from radrl.models.diffusion_policy import DiffusionPolicy
from radrl.rollout.sampler import sample_trajectories, step_log_prob, text_conditions
from radrl.rollout.worker import RolloutWorker

REPORTS = ["Heart size is enlarged. Small right pleural effusion.", "No acute cardiopulmonary abnormality."]


def make_policy():
    torch.manual_seed(0)
    models = build_diffusion(DiffusionModelConfig(), image_size=32)
    return DiffusionPolicy(models, lora_rank=4, lora_alpha=4, lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
                           ace_tokens=3).eval()


def sample(policy, guidance=5.0):
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return sample_trajectories(policy, REPORTS, num_steps=4, eta=1.0, guidance_scale=guidance, initial_noise=noise,
                               weight_version=0, generator=torch.Generator().manual_seed(2))


def test_bf16_stores_frozen_weights_in_bf16_and_keeps_adapters_latents_and_log_probs_fp32():
    policy = make_policy().accelerate("bf16")
    assert policy.unet.conv_in.weight.dtype == torch.bfloat16
    assert policy.models.text_encoder.dtype == torch.bfloat16
    assert policy.ace.dtype == torch.float32
    assert policy.lora_parameters() and all(p.dtype == torch.float32 for p in policy.lora_parameters())
    trajectory = sample(policy)
    assert trajectory.latents.dtype == torch.float32 and trajectory.log_probs.dtype == torch.float32
    assert torch.isfinite(trajectory.log_probs).all()
    cond, uncond = text_conditions(policy, REPORTS)
    with torch.no_grad():  # the learner's recomputation gives ratio 1 in bf16 too
        for step in range(4):
            again = step_log_prob(policy, trajectory, step, cond, uncond, eta=1.0, guidance_scale=5.0)
            assert torch.allclose((again - trajectory.log_probs[:, step]).exp(), torch.ones(2), atol=1e-6)


def test_bf16_samples_are_the_fp32_model_up_to_rounding():
    fp32, bf16 = sample(make_policy()), sample(make_policy().accelerate("bf16"))
    difference = (fp32.images - bf16.images).abs().mean()
    assert difference < 0.05, f"bf16 images differ from fp32 by {difference:.3f} on average"


def test_bf16_update_trains_fp32_adapters_and_leaves_the_bf16_base_bit_identical():
    cfg = load_config(None, ["rollout.num_steps=3", "rollout.batch_size=4", "learner.batch_size=4",
                             "models.diffusion.precision=bf16"])
    learner = DDPOLearner(cfg)
    worker = RolloutWorker(cfg)
    worker.load_weights(learner.publish())
    trajectory, _ = worker.sample([*REPORTS, *REPORTS], seed=0, with_anchor=False)
    before = {name: p.detach().clone() for name, p in learner.policy.named_parameters()}
    metrics = learner.update(np.array([1.0, -1.0, 0.5, -0.5]), trajectory)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    for name, p in learner.policy.named_parameters():
        if name == "ace" or "lora_" in name:
            assert p.dtype == torch.float32
        else:
            assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in learner.policy.named_parameters() if "lora_" in n)
    published = learner.publish().tensors
    assert all(t.dtype == np.float32 for t in published.values())  # workers load fp32 adapters


def test_channels_last_predicts_the_same_noise():
    plain, fast = make_policy(), make_policy().accelerate(channels_last=True)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(500)
    cond, uncond = text_conditions(plain, REPORTS)
    with torch.no_grad():
        assert torch.allclose(plain.predict_noise(x, t, cond, uncond, 5.0), fast.predict_noise(x, t, cond, uncond, 5.0),
                              atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_unet_predicts_the_same_noise_for_policy_and_anchor():
    plain, compiled = make_policy(), make_policy().accelerate(compile_unet=True)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor(500)
    cond, uncond = text_conditions(plain, REPORTS)
    with torch.no_grad():
        assert torch.allclose(plain.predict_noise(x, t, cond, uncond, 5.0),
                              compiled.predict_noise(x, t, cond, uncond, 5.0), atol=1e-4)
        with plain.anchor(), compiled.anchor():  # adapters off: a second graph, not the policy's
            assert torch.allclose(plain.predict_noise(x, t, cond, uncond, 5.0),
                                  compiled.predict_noise(x, t, cond, uncond, 5.0), atol=1e-4)
