"""Configuration: shipped configs validate; every error names the bad field."""

from pathlib import Path

import pytest

from radrl.config import ConfigError, ExperimentConfig, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.task in ("cxrl", "rrg")


def _grouping_params(path):
    if path.stem == "cxrl_roentgen_mimic":  # issue 15 owns the real CXRL config's advantage grouping
        return pytest.param(path, id=path.stem, marks=pytest.mark.xfail(
            strict=True, reason="DDPO's per-report tracker with 1 sample per report uses batch statistics until "
                                "a report has recurred stat_min_count times"))
    return pytest.param(path, id=path.stem)


@pytest.mark.parametrize("path", [_grouping_params(p) for p in CONFIGS])
def test_no_shipped_config_falls_back_to_batch_normalised_advantages(path):
    """Advantages compare samples of one report (cxrl) or one image (rrg): every group must be full at once."""
    from radrl.learner.ppo import group_advantages

    cfg = load_config(path)
    samples = cfg.rollout.samples_per_report
    if cfg.task == "rrg":  # one image's reports are one group, all sampled in one batch
        assert samples >= 2 and cfg.rollout.batch_size % samples == 0
        groups = [i // samples for i in range(cfg.rollout.batch_size)]
        rewards = [float(i) for i in range(len(groups))]
        greedy = [0.5] * len(groups) if cfg.learner.rrg_advantage == "greedy" else None  # each image's greedy report
        assert group_advantages(rewards, groups, cfg.learner.rrg_advantage, greedy).shape
    elif cfg.learner.per_prompt_stats:  # the tracker normalises per report only once it holds stat_min_count
        assert cfg.learner.stat_min_count <= samples


def test_paper_config_matches_the_paper():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "cxrl_roentgen_mimic.yaml")
    assert cfg.rollout.trajectories_per_iteration == 81  # the paper's images per iteration, for any num_workers
    assert cfg.rollout.trajectories_per_iteration // cfg.learner.batch_size == 3  # and its 3 minibatches
    assert cfg.learner.lr == 3e-4
    assert (cfg.rewards.lambda_align, cfg.rewards.lambda_diag, cfg.rewards.lambda_consist) == (1, 10, 10)
    assert cfg.learner.ace_tokens == 3 and cfg.data.max_tokens == 74
    assert cfg.models.diffusion.use_vae and cfg.rewards.rlcf


def test_defaults_are_the_reference_hyperparameters():
    cfg = ExperimentConfig()
    assert (cfg.rollout.num_steps, cfg.rollout.eta, cfg.rollout.guidance_scale) == (50, 1.0, 5.0)
    assert (cfg.learner.clip_range, cfg.learner.adv_clip_max, cfg.learner.max_grad_norm) == (1e-4, 5.0, 1.0)


def test_override_sets_nested_value_with_yaml_types():
    cfg = load_config(None, ["learner.lr=1e-5", "rollout.share_noise_with_anchor=false", "learner.lora_targets=[to_q]"])
    assert cfg.learner.lr == 1e-5
    assert cfg.rollout.share_noise_with_anchor is False
    assert cfg.learner.lora_targets == ("to_q",)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("learner.lrr=1", r"learner\.lrr: unknown key; did you mean 'lr'\?"),
        ("learner.lr=abc", r"learner\.lr: Input should be a valid number"),
        ("rollout.eta=0", r"rollout\.eta: Input should be greater than 0"),
        ("rollout.resources.num_gpu=1", r"rollout\.resources\.num_gpu: unknown key"),
        ("task=segmentation", r"task: Input should be 'cxrl' or 'rrg'"),
        ("learner.batch_size=3", r"learner\.batch_size = 3 does not divide the 8 trajectories"),
        ("data.source=mimic_cxr", r"data\.mimic_root is not set"),
        ("data.image_size=16", r"data\.image_size: Input should be greater than or equal to 32"),
        ("widgets.count=3", r"widgets: unknown key"),
        ("learner.rl_validation_every=40", r"learner\.rl_validation_every scores the validation pairs: set "
                                           r"learner\.supervised_validation"),
        ("learner.rl_selection_ce_guard=2", r"learner\.rl_selection_ce_guard guards the choice among "
                                            r"validated CQRL iterations: set learner\.rl_validation_every"),
    ],
)
def test_errors_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_all_lambdas_zero_is_refused():
    overrides = ["rewards.lambda_align=0", "rewards.lambda_diag=0", "rewards.lambda_consist=0"]
    with pytest.raises(ConfigError, match="rewards.lambda_align, rewards.lambda_diag and rewards.lambda_consist"):
        load_config(None, overrides)


def test_fewer_anchor_images_than_policy_images_need_the_report_mean():
    group = ["rollout.batch_size=8", "rollout.samples_per_report=4", "learner.batch_size=8"]
    cfg = load_config(None, group + ["rollout.anchor_samples_per_report=1", "rewards.anchor_reference=report_mean"])
    assert cfg.rollout.anchor_samples_per_report == 1
    with pytest.raises(ConfigError, match="set rewards.anchor_reference=report_mean"):
        load_config(None, group + ["rollout.anchor_samples_per_report=2"])
    with pytest.raises(ConfigError, match="anchor_samples_per_report = 5 exceeds rollout.samples_per_report = 4"):
        load_config(None, group + ["rollout.anchor_samples_per_report=5"])
    with pytest.raises(ConfigError, match="leave rollout.anchor_samples_per_report unset"):
        load_config(None, group + ["rollout.anchor_samples_per_report=1", "rewards.anchor_reference=report_mean",
                                   "rollout.noise_seeds_per_report=2", "rollout.anchor_cache=true"])


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["learner.lr=-1", "rollout.num_steps=0"])
    assert "learner.lr" in str(info.value) and "rollout.num_steps" in str(info.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["learner.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="learner.lr is a value, not a section"):
        apply_overrides({"learner": {"lr": 1}}, ["learner.lr.x=2"])
