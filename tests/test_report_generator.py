"""The LM-RRG model on the shipped tiny CLIP and report LM: shapes, region prompts, log-probs, stages."""

import numpy as np
import pytest
import torch

from radrl.config import load_config
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.data.phantom import render_phantom
from radrl.learner.ppo_learner import ReportLearner
from radrl.learner.ppo import group_advantages
from radrl.models.report_generator import REGION_BOXES, REGION_PROMPTS, REGIONS, RegionBlock, build_report_policy
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


@pytest.mark.parametrize("finding, regions", [
    ("Pleural Effusion", ("right costophrenic angle", "left costophrenic angle")),
    ("Pleural Effusion", ("right lower lung zone", "left lower lung zone")),
    ("Cardiomegaly", ("cardiac silhouette",)),
    ("Pneumothorax", ("right lung", "left lung")),
])
def test_atlas_boxes_hold_the_pixels_a_phantom_finding_changes(finding, regions):
    """The atlas against the phantoms' own drawing: adding a finding to a seed changes only that finding's pixels,
    and per pixel they change ≥ 3× as much inside the finding's regions' boxes as outside them."""
    size = 128
    inside = np.zeros((size, size), bool)
    for region in regions:
        x0, y0, x1, y1 = (round(v * size) for v in REGION_BOXES[region])
        inside[y0:y1, x0:x1] = True
    for seed in range(5):
        change = np.abs(render_phantom([finding], size=size, seed=seed).astype(float)
                        - render_phantom([], size=size, seed=seed))
        assert change[inside].mean() > 3 * change[~inside].mean()


def test_atlas_prior_keeps_each_region_inside_its_box_and_learns_where_within_it():
    generator = build_report_policy(config(**{"models.report_generator.region_prior": "atlas"}), "cpu").generator
    _, attention = generator.extractor.features_and_attention(images(2))
    side = int(round(attention.shape[-1] ** 0.5))
    grid = attention.reshape(2, 29, side, side)
    halves = grid[..., : side // 2].sum(dim=(-2, -1)), grid[..., side // 2:].sum(dim=(-2, -1))
    right_lung, left_lung = REGIONS.index("right lung"), REGIONS.index("left lung")
    assert (halves[0][:, right_lung] > 0.9).all() and (halves[1][:, left_lung] > 0.9).all()  # patient's right = image left
    assert (grid[:, REGIONS.index("abdomen"), side // 2:].sum(dim=(-2, -1)) > 0.9).all()  # below the diaphragm
    assert (attention[0] - attention[1]).abs().max() > 1e-4  # within its box, each region's weights follow the image
    inside = torch.isfinite(generator.extractor.region_prior)  # floor 0: patches outside a box are masked
    assert inside.shape == (29, side * side) and generator.extractor.region_prior.max() == 0
    assert torch.allclose((attention * inside).sum(-1), torch.ones(2, 29), atol=1e-5)
    soft = build_report_policy(config(**{"models.report_generator.region_prior": "atlas",
                                         "models.report_generator.region_prior_floor": 0.02}), "cpu").generator
    assert torch.isclose(soft.extractor.region_prior.min(), torch.tensor(0.02).log())


def test_atlas_prior_needs_region_queries():
    with pytest.raises(ValueError, match="region_prior 'atlas'"):
        config(**{"models.report_generator.region_prior": "atlas",
                  "models.report_generator.region_attention": "paper"})


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


def test_teacher_forced_disease_prompt_is_the_labels_in_training_and_the_heads_decision_in_generation():
    from radrl.data.observations import Label

    generator = build_report_policy(config(), "cpu").generator
    features = generator.visual_features(images(2))
    positive, negative = generator.disease_tokens.detach()
    labels = torch.full((2, 14), int(Label.NOT_MENTIONED))
    labels[0, 2] = int(Label.POSITIVE)  # Cardiomegaly in the first report
    visual = features.shape[1]
    taught = generator.prompt_embeddings(features, labels)[:, visual:visual + 14].detach()
    assert torch.equal(taught[0, 2], positive[2]) and torch.equal(taught[1, 2], negative[2])
    assert torch.equal(taught[0, 3], negative[3])  # not mentioned → the "absent" token
    with torch.no_grad():  # generation: each token is exactly e⁺ or e⁻, as the head decides at p = 0.5
        generator.disease_head.bias.copy_(torch.linspace(-3, 3, 14))
        generator.disease_head.weight.zero_()
        generated = generator.prompt_embeddings(features)[:, visual:visual + 14]
    decided = torch.linspace(-3, 3, 14) >= 0
    expected = torch.where(decided[:, None], positive, negative)
    assert torch.equal(generated[0], expected) and torch.equal(generated[1], expected)


def test_disease_tokens_start_as_the_words_of_present_and_absent_findings():
    generator = build_report_policy(config(), "cpu").generator
    embed, tokenizer = generator.decoder.get_input_embeddings(), generator.tokenizer
    positive, negative = generator.disease_tokens.detach()
    effusion = CHEXPERT_OBSERVATIONS.index("Pleural Effusion")
    for token, text in ((positive, "pleural effusion"), (negative, "no pleural effusion")):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert torch.allclose(token[effusion], embed.weight[ids].mean(dim=0))


def test_words_disease_prompt_is_the_observation_names_each_followed_by_present_or_negative():
    from radrl.data.observations import Label

    generator = build_report_policy(config(**{"models.report_generator.disease_prompt_form": "words"}), "cpu").generator
    assert generator.disease_tokens is None
    tokenizer, embed = generator.tokenizer, generator.decoder.get_input_embeddings()
    # the text the prompt spells when every finding but Pleural Effusion is negative, written out by hand
    text = " ".join(f"{name.lower()} {'present' if name == 'Pleural Effusion' else 'negative'}"
                    for name in CHEXPERT_OBSERVATIONS)
    expected = embed(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])).detach()
    labels = torch.full((1, 14), int(Label.NEGATIVE))
    labels[0, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = int(Label.POSITIVE)
    features = generator.visual_features(images(1))
    visual, length = features.shape[1], len(expected)
    prompt = generator.prompt_embeddings(features, labels)[0].detach()
    assert torch.allclose(prompt[visual:visual + length], expected)
    # what follows is the instruction, unchanged
    assert torch.allclose(prompt[visual + length:], embed(generator.instruction_ids).detach())


def test_present_words_prompt_names_only_the_present_findings():
    """present_words: an absent observation's name tokens read 'negative' too; only present findings are named."""
    from radrl.data.observations import Label

    cfg = config(**{"models.report_generator.disease_prompt_form": "present_words"})
    generator = build_report_policy(cfg, "cpu").generator
    tokenizer, embed = generator.tokenizer, generator.decoder.get_input_embeddings()

    def spelt(name):  # written out by hand: the name's own tokens, or as many 'negative's
        count = len(tokenizer(name.lower(), add_special_tokens=False)["input_ids"])
        return f"{name.lower()} present" if name == "Pleural Effusion" else " ".join(["negative"] * (count + 1))

    text = " ".join(spelt(name) for name in CHEXPERT_OBSERVATIONS)
    expected = embed(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])).detach()
    labels = torch.full((1, 14), int(Label.NEGATIVE))
    labels[0, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = int(Label.POSITIVE)
    features = generator.visual_features(images(1))
    prompt = generator.prompt_embeddings(features, labels)[0].detach()
    assert torch.allclose(prompt[features.shape[1]:features.shape[1] + len(expected)], expected)


def test_unmentioned_observations_train_the_disease_head_as_negatives_unless_ignored():
    """IU reports name Atelectasis mostly when present (244 positive, 8 negative, 2,822 unmentioned in train):
    with unmentioned left out, the head would only ever see positives."""
    from radrl.data.observations import Label

    labels = torch.full((4, 14), int(Label.NOT_MENTIONED))
    labels[:, 8] = int(Label.POSITIVE)
    losses = {}
    for mode in ("negative", "ignore"):
        cfg = config(**{"models.report_generator.disease_unmentioned": mode})
        generator = build_report_policy(cfg, "cpu").generator
        with torch.no_grad():
            generator.disease_head.weight.zero_()
            generator.disease_head.bias.fill_(2.0)  # every observation predicted present with p = σ(2)
        losses[mode] = generator.supervised_loss(images(), REPORTS, labels, 1.0)[1]["disease"]
    bce_pos, bce_neg = np.log1p(np.exp(-2.0)), np.log1p(np.exp(2.0))  # BCE of logit 2 against 1 and against 0
    assert losses["ignore"] == pytest.approx(bce_pos, rel=1e-5)  # only the 4 positives count
    assert losses["negative"] == pytest.approx((bce_pos + 13 * bce_neg) / 14, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_recomputed_token_log_probs_equal_the_sampled_ones(temperature):
    learner, worker = rl_stage(config(**{"rollout.report_temperature": temperature}))
    trajectory, rollout = worker.sample(images().numpy(), REPORTS, GROUPS, seed=3)
    assert len(rollout.reports) == 4 and trajectory.weight_version == 0
    generator = learner.policy.generator
    prompts = generator.frozen_prompts(trajectory.images)
    with torch.no_grad():
        again = generator.token_log_probs(prompts, trajectory.tokens, trajectory.mask, temperature=temperature)
        plain = generator.token_log_probs(prompts, trajectory.tokens, trajectory.mask)
    assert torch.allclose((again - trajectory.log_probs).exp(), torch.ones_like(again), atol=1e-6)
    # a fresh RL LoRA starts at zero: the policy is the reference
    assert torch.allclose(trajectory.log_probs, trajectory.ref_log_probs, atol=1e-5)
    if temperature != 1.0:  # by hand: log softmax(z / T) = z/T − logsumexp(z/T), from the T = 1 log-probs' logits
        assert not torch.allclose(again, plain, atol=1e-3)
        tokens, mask = trajectory.tokens, trajectory.mask
        prompts_only, condition, _ = generator._streams(prompts)
        with torch.no_grad(), generator._conditioned(condition):
            words = generator.decoder.get_input_embeddings()(tokens)
            embeddings = torch.cat([prompts_only, words], dim=1)
            attention = torch.cat([torch.ones(prompts_only.shape[:2]), mask], dim=1)
            logits = generator.decoder(inputs_embeds=embeddings, attention_mask=attention).logits
        z = logits[:, prompts_only.shape[1] - 1:-1].float() / temperature
        expected = (z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)) * mask
        assert torch.allclose(again, expected, atol=1e-5)
        # and the sampler draws from that distribution: T → 0 is greedy decoding
        cold, cold_mask = generator.generate(prompts, greedy=False, generator_seed=0, temperature=1e-4)
        assert generator.decode(cold, cold_mask) == generator.decode(*generator.generate(prompts, greedy=True))


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


def test_greedy_baseline_advantages_and_the_worker_greedy_reports():
    # self-critical: each sample's reward minus its image's greedy report's reward, no group mean
    assert group_advantages(np.array([1.0, 2.0, 6.0]), [7, 7, 3], "greedy", np.array([1.5, 1.5, 6.0])) == \
        pytest.approx([-0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="greedy_rewards"):
        group_advantages(np.array([1.0, 2.0]), [0, 0], "greedy")
    learner, worker = rl_stage(config(**{"learner.rrg_advantage": "greedy"}))
    trajectory, rollout = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    expected = worker.policy.generator.greedy_reports(images())  # each row's own image, greedy
    assert rollout.greedy == (expected[0], expected[0], expected[2], expected[2])  # GROUPS: rows 0-1, rows 2-3
    rewards, greedy = np.array([1.0, 0.0, 0.5, 2.0]), np.array([0.5, 0.5, 0.5, 0.5])
    metrics = learner.update_with(rewards, greedy, trajectory)
    assert metrics["advantage_abs"] == pytest.approx(np.mean(np.abs(rewards - greedy)))
    learner, worker = rl_stage(config(**{"learner.rrg_advantage": "greedy"}))
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    metrics = learner.update_with(rewards, np.array([0.5, np.nan, 0.5, 0.5]), trajectory)
    assert metrics["dropped_nonfinite"] == 1 and metrics["trajectories"] == 3  # a NaN baseline drops its row


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


def test_a_non_finite_gradient_in_a_later_ppo_minibatch_undoes_the_whole_update():
    cfg = config(**{"learner.batch_size": 2, "learner.inner_epochs": 1, "learner.target_kl": "null"})
    learner, worker = rl_stage(cfg)
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=0)
    rewards = np.array([1.0, 0.0, 0.5, 2.0])
    before = {n: t.clone() for n, t in learner.policy.rl_state().items()}
    optimizer_before = learner.optimizer.state_dict()["state"]
    lora = learner.policy.rl_parameters()[0]
    calls = {"n": 0}

    def nan_in_second_minibatch(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    hook = lora.register_hook(nan_in_second_minibatch)
    with pytest.raises(FloatingPointError, match="whole update was undone"):
        learner.update(rewards, trajectory)
    hook.remove()
    assert all(torch.equal(t, before[n]) for n, t in learner.policy.rl_state().items())
    assert learner.version == 0 and learner.optimizer.state_dict()["state"] == optimizer_before
    assert learner.update(rewards, trajectory)["weight_version"] == 1  # a retry runs


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


def test_operating_points_are_the_f1_best_thresholds_and_travel_with_the_supervised_state():
    from radrl.data.observations import Label

    policy = build_report_policy(config(), "cpu")
    generator = policy.generator
    logits = torch.zeros(6, 14)
    logits[:, 10] = torch.tensor([3.0, 2.0, 1.0, -1.0, -2.0, -3.0])
    labels = torch.full((6, 14), int(Label.NOT_MENTIONED))
    # effusion present in the rows scored 3, 1 and −1; the row scored 2 is uncertain (left out)
    labels[[0, 2, 3], 10] = int(Label.POSITIVE)
    labels[1, 10] = int(Label.UNCERTAIN)
    thresholds = generator.fit_operating_points(logits, labels)
    # top 1: F1 = 2/(1+3) = 0.5; top 2 (3, 1): 2·2/(2+3) = 0.8; top 3 (3, 1, −1): 2·3/(3+3) = 1 → between −1 and −2
    assert thresholds[10] == pytest.approx(-1.5)
    assert thresholds[0] == 0  # no positive: p ≥ ½ stays the decision
    state = policy.supervised_state()
    assert state["decision_logits"][10] == pytest.approx(-1.5)
    other = build_report_policy(config(), "cpu")
    other.load_supervised_state({k: v.numpy() for k, v in state.items()})
    assert torch.equal(other.generator.decision_logits, generator.decision_logits)
    assert all(p is not generator.decision_logits for p in policy.supervised_parameters())
    assert all(p.requires_grad for p in policy.supervised_parameters())


def test_disease_pos_weight_counts_negatives_as_the_loss_does():
    """disease_pos_weight: 1 effusion among 4 pairs → 3 negatives; sqrt → sqrt(3), ratio → 3; an observation with no
    positive keeps 1. With 'ignore', an unmentioned label is no negative: 1 positive, 1 NEGATIVE → ratio 1."""
    from radrl.data.observations import Label
    from radrl.models.report_generator import disease_pos_weights

    labels = np.full((4, 14), int(Label.NOT_MENTIONED), dtype=np.int8)
    effusion = CHEXPERT_OBSERVATIONS.index("Pleural Effusion")
    labels[0, effusion], labels[1, effusion] = int(Label.POSITIVE), int(Label.NEGATIVE)
    assert disease_pos_weights(labels, "none") is None
    assert disease_pos_weights(labels, "ratio")[effusion] == pytest.approx(3.0)
    assert disease_pos_weights(labels, "sqrt")[effusion] == pytest.approx(3 ** 0.5)
    assert disease_pos_weights(labels, "ratio", "ignore")[effusion] == pytest.approx(1.0)
    assert disease_pos_weights(labels, "ratio")[CHEXPERT_OBSERVATIONS.index("Edema")] == 1.0
    # in the loss it multiplies a positive's BCE term: 4 positives at logit 2, weight 3 → 3·log(1 + e^-2)
    cfg = config(**{"models.report_generator.disease_unmentioned": "ignore"})
    generator = build_report_policy(cfg, "cpu").generator
    with torch.no_grad():
        generator.disease_head.weight.zero_()
        generator.disease_head.bias.fill_(2.0)
    codes = torch.full((4, 14), int(Label.NOT_MENTIONED))
    codes[:, effusion] = int(Label.POSITIVE)
    weighted = generator.supervised_loss(images(), REPORTS, codes, 1.0, torch.full((14,), 3.0))[1]["disease"]
    assert weighted == pytest.approx(3 * np.log1p(np.exp(-2.0)), rel=1e-5)


def test_visual_prompt_dropout_hides_the_image_from_the_report_loss_only():
    """A dropped row's report loss no longer depends on its image; L_disease still does."""
    from radrl.data.observations import Label

    generator = build_report_policy(config(), "cpu").generator
    labels = torch.full((4, 14), int(Label.NOT_MENTIONED))
    every, none = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        a, b = (generator.supervised_loss(images(seed=s), REPORTS, labels, 1.0, drop_visual=every)[1] for s in (0, 1))
        kept = [generator.supervised_loss(images(seed=s), REPORTS, labels, 1.0, drop_visual=none)[1] for s in (0, 1)]
    assert a["report"] == pytest.approx(b["report"], rel=1e-6) and a["disease"] != pytest.approx(b["disease"])
    assert kept[0]["report"] != pytest.approx(kept[1]["report"], rel=1e-6)


def test_repeat_factor_sampling_follows_lvis():
    """LVIS (Gupta et al. 2019): r_c = max(1, sqrt(t / f_c)), a pair's factor the max over its findings."""
    from radrl.data.observations import Label
    from radrl.data.report_pool import repeat_factors
    from radrl.learner.ppo_learner import epoch_order

    labels = np.full((8, 14), int(Label.NOT_MENTIONED), dtype=np.int8)
    labels[:, 0] = int(Label.POSITIVE)  # No Finding everywhere: never a reason to repeat
    labels[0, 10] = int(Label.POSITIVE)  # effusion in 1 of 8 pairs: f = 0.125
    labels[:4, 2] = int(Label.POSITIVE)  # cardiomegaly in 4 of 8: f = 0.5
    factors = repeat_factors(labels, threshold=0.5)
    assert factors[0] == pytest.approx(2.0)  # sqrt(0.5 / 0.125), beats cardiomegaly's max(1, 1)
    assert factors[1:] == pytest.approx(np.ones(7))
    order = epoch_order(labels, 0.5, seed=0)
    assert sorted(order.tolist()) == [0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert sorted(epoch_order(labels, None, seed=0).tolist()) == list(range(8))


def test_bf16_precision_stores_frozen_weights_in_bf16_trains_fp32_and_matches_fp32_likelihoods():
    """models.report_generator.precision=bf16: frozen CLIP and decoder in bf16, adapters/extractor/prompts fp32."""
    from radrl.data.labeler import label_reports

    full = build_report_policy(config(**{"models.report_generator.supervised_decoder": "lora"}), "cpu")
    half = build_report_policy(config(**{"models.report_generator.supervised_decoder": "lora",
                                         "models.report_generator.precision": "bf16"}), "cpu")
    generator = half.generator
    assert {p.dtype for p in generator.extractor.clip.parameters()} == {torch.bfloat16}
    decoder = dict(generator.decoder.named_parameters())
    assert {p.dtype for n, p in decoder.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in decoder.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in half.supervised_parameters()} == {torch.float32}  # what trains, and its Adam state
    labels = torch.as_tensor(label_reports(REPORTS))
    loss, parts = generator.supervised_loss(images(), REPORTS, labels, 1.0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in generator.decoder.named_parameters()
               if "lora_" in n)
    reference, _ = full.generator.supervised_loss(images(), REPORTS, labels, 1.0)  # same seed: same weights
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()  # bf16 rounding, not another model

    half.start_rl()
    decoder = dict(generator.decoder.named_parameters())
    assert {p.dtype for n, p in decoder.items() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in decoder.items() if "lora_" not in n} == {torch.bfloat16}
    tokens, mask = generator.encode_reports(REPORTS)
    log_probs = generator.token_log_probs(generator.frozen_prompts(images()), tokens, mask)
    assert log_probs.dtype == torch.float32
    log_probs.sum().backward()
    assert all(p.grad is not None for p in half.rl_parameters())


def test_counterfactual_flips_one_of_the_reports_findings_or_any_finding_of_a_normal_report():
    from radrl.data.observations import Label
    from radrl.models.report_generator import counterfactual_observations, flipped_labels

    labels = torch.full((3, 14), int(Label.NOT_MENTIONED))
    labels[0, [0]] = int(Label.POSITIVE)  # No Finding only: a normal report
    labels[1, [2, 10]] = int(Label.POSITIVE)  # Cardiomegaly and Pleural Effusion
    labels[1, 0] = int(Label.NEGATIVE)
    labels[2, 10] = int(Label.UNCERTAIN)  # uncertain is not a finding the report states
    draws = torch.stack([counterfactual_observations(labels, torch.Generator().manual_seed(s)) for s in range(400)])
    assert set(draws[:, 1].tolist()) == {2, 10}
    assert set(draws[:, 0].tolist()) == set(range(1, 14)) and set(draws[:, 2].tolist()) == set(range(1, 14))
    flipped = flipped_labels(labels, torch.tensor([3, 10, 10]))
    assert flipped[0, 3] == Label.POSITIVE and flipped[1, 10] == Label.NEGATIVE and flipped[2, 10] == Label.POSITIVE
    changed = (flipped != labels).sum(dim=1)
    assert changed.tolist() == [1, 1, 1]  # one observation per row, nothing else


def test_counterfactual_loss_is_the_hinge_on_each_reports_likelihood_under_its_prompt_minus_a_flipped_one():
    """By the definition: per report, gap = Σ_t log p(y_t | prompt with the true labels) − Σ_t log p(y_t | prompt with
    observation flip[i] written by hand the other way); L_counterfactual = mean max(0, m − gap)."""
    from radrl.data.observations import Label

    generator = build_report_policy(config(**{"models.report_generator.disease_prompt_form": "words"}),
                                    "cpu").generator
    labels = torch.full((4, 14), int(Label.NEGATIVE))
    labels[1, 10] = int(Label.POSITIVE)
    flip = torch.tensor([10, 10, 2, 5])
    by_hand = labels.clone()
    by_hand[0, 10], by_hand[1, 10], by_hand[2, 2], by_hand[3, 5] = (int(Label.POSITIVE), int(Label.NEGATIVE),
                                                                    int(Label.POSITIVE), int(Label.POSITIVE))
    with torch.no_grad():
        features = generator.visual_features(images())
        tokens, mask = generator.encode_reports(REPORTS)
        own = generator.token_log_probs(generator.prompt_embeddings(features, labels), tokens, mask).sum(dim=1)
        other = generator.token_log_probs(generator.prompt_embeddings(features, by_hand), tokens, mask).sum(dim=1)
        margin = float((own - other).abs().max()) * 0.5 + 0.1  # some rows inside the hinge, maybe some outside
        plain = generator.supervised_loss(images(), REPORTS, labels, 1.0)
        loss, parts = generator.supervised_loss(images(), REPORTS, labels, 1.0, flip=flip, counterfactual_weight=0.3,
                                                counterfactual_margin=margin)
    expected = torch.relu(margin - (own - other)).mean()
    assert parts["counterfactual"] == pytest.approx(float(expected), rel=1e-5)
    assert parts["counterfactual_gap"] == pytest.approx(float((own - other).mean()), rel=1e-4, abs=1e-6)
    assert parts["report"] == pytest.approx(plain[1]["report"], rel=1e-6)  # L_report still on the true prompts
    assert float(loss) == pytest.approx(float(plain[0]) + 0.3 * float(expected), rel=1e-5)


def test_counterfactual_loss_needs_a_teacher_forced_prompt():
    with pytest.raises(ValueError, match="teacher_forced"):
        config(**{"models.report_generator.counterfactual_weight": 0.1,
                  "models.report_generator.disease_prompt": "predicted"})


def test_patch_disease_head_reads_the_frozen_patch_grid_and_leaves_the_visual_prompts_alone():
    generator = build_report_policy(config(**{"models.report_generator.disease_head_input": "patches"}),
                                    "cpu").generator
    patches = generator.extractor.clip.patch_tokens(images(2)).float()  # [2, N, D]
    features = generator.visual_features(images(2))
    assert features.shape == (2, 30 + patches.shape[1], generator.extractor.width)
    with torch.no_grad():
        by_hand = patches.flatten(1) @ generator.disease_head.weight.T + generator.disease_head.bias
        assert torch.allclose(generator.disease_logits(features), by_hand, atol=1e-5)
        instruction = len(generator.instruction_ids)
        prompts = generator.prompt_embeddings(features)
    assert prompts.shape[1] == 30 + 14 + instruction  # [global, 29 regions], disease prompt, instruction
    assert torch.allclose(prompts[:, :30], generator.project(features[:, :30]))


def condition_config(**overrides):
    """A 'words' disease prompt with disease_condition every_token (plus overrides)."""
    return config(**{"models.report_generator.disease_condition": "every_token",
                     "models.report_generator.disease_prompt_form": "words", **overrides})


def condition_generator(seed=0, **overrides):
    """condition_config's generator with random (non-zero) condition vectors."""
    generator = build_report_policy(condition_config(**overrides), "cpu").generator.eval()
    with torch.no_grad():
        generator.disease_condition.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return generator


def test_disease_condition_is_added_to_every_report_tokens_input_in_scoring_and_in_generation():
    generator = condition_generator()
    labels = torch.zeros(2, 14, dtype=torch.long)
    labels[0, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = Label.POSITIVE
    with torch.no_grad():
        prompts = generator.prompt_embeddings(generator.visual_features(images(2)), labels)
        rows = 30 + len(generator.disease_word_ids) + len(generator.instruction_ids)
        assert prompts.shape[1] == rows + 1  # the condition rides as the last row
        u = generator.disease_condition
        present = (labels == Label.POSITIVE).float().unsqueeze(-1)
        by_hand = (present * u[0] + (1 - present) * u[1]).sum(dim=1)  # [2, H]
        assert torch.allclose(prompts[:, -1], by_hand, atol=1e-6)
        tokens, mask = generator.generate(prompts, greedy=True)
        # by hand: the decoder reads the prompt rows, then each report token's embedding plus the condition
        words = generator.decoder.get_input_embeddings()(tokens) + by_hand.unsqueeze(1)
        logits = generator.decoder(inputs_embeds=torch.cat([prompts[:, :-1], words], dim=1)).logits
        logits = logits[:, rows - 1:-1]
        greedy_by_hand = logits.argmax(dim=-1)
        kept = mask.bool()
        assert torch.equal(greedy_by_hand[kept], tokens[kept])  # generation saw the condition at every step
        expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
        assert torch.allclose(generator.token_log_probs(prompts, tokens, mask), expected, atol=1e-5)
        # the condition matters: without it the same tokens score differently
        plain = torch.cat([prompts[:, :-1], torch.zeros_like(prompts[:, -1:])], dim=1)
        assert not torch.allclose(generator.token_log_probs(plain, tokens, mask), expected, atol=1e-3)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_disease_condition_starts_at_zero_and_sampled_log_probs_recompute_exactly(guidance):
    """With findings guidance too: the rollouts' guided log-probs recompute on the learner."""
    cfg = condition_config(**{"models.report_generator.findings_guidance": guidance})
    assert torch.count_nonzero(build_report_policy(cfg, "cpu").generator.disease_condition) == 0
    learner, worker = rl_stage(cfg)
    with torch.no_grad():  # as after a supervised stage: non-zero condition, the same on both sides
        for generator in (learner.policy.generator, worker.policy.generator):
            generator.disease_condition.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    trajectory, _ = worker.sample(images().numpy(), REPORTS, GROUPS, seed=3)
    generator = learner.policy.generator
    with torch.no_grad():
        again = generator.token_log_probs(generator.frozen_prompts(trajectory.images), trajectory.tokens,
                                          trajectory.mask)
    assert torch.allclose((again - trajectory.log_probs).exp(), torch.ones_like(again), atol=1e-6)
    assert torch.allclose(trajectory.log_probs, trajectory.ref_log_probs, atol=1e-5)  # a fresh RL LoRA: the reference


def test_disease_condition_needs_a_disease_prompt():
    with pytest.raises(ValueError, match="disease_condition 'every_token' spreads"):
        config(**{"models.report_generator.disease_condition": "every_token",
                  "models.report_generator.disease_prompt": "'off'"})


def guided_generator(guidance=2.0):
    """condition_generator's model with findings guidance γ against the empty contrast (every observation absent)."""
    return condition_generator(**{"models.report_generator.findings_guidance": guidance,
                                  "models.report_generator.guidance_contrast": "empty"})


def test_findings_guidance_prompts_carry_a_no_findings_stream_in_generation_only():
    generator = guided_generator()
    rows = 30 + len(generator.disease_word_ids) + len(generator.instruction_ids) + 1
    labels = torch.zeros(2, 14, dtype=torch.long)
    labels[:, CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = Label.POSITIVE
    with torch.no_grad():
        features = generator.visual_features(images(2))
        taught = generator.prompt_embeddings(features, labels)  # the supervised stage's: one stream
        prompts = generator.prompt_embeddings(features)
    assert taught.shape[1] == rows and prompts.shape[1] == 2 * rows
    u = generator.disease_condition
    assert torch.allclose(prompts[:, -1], u[1].sum(dim=0).expand(2, -1), atol=1e-6)  # every finding absent
    assert torch.allclose(prompts[:, rows:rows + 30], prompts[:, :30])  # the same image
    decided = generator.disease_decisions(images(2)).float().unsqueeze(-1)
    assert torch.allclose(prompts[:, rows - 1], (decided * u[0] + (1 - decided) * u[1]).sum(dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        generator.token_log_probs(prompts[:, :-1], torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    # the image-reliance gap's NLL is the likelihood the supervised stage fits: the findings stream's
    guided_nll = generator.report_nll(images(2), REPORTS[:2])
    generator.guidance = 0.0
    assert torch.allclose(guided_nll, generator.report_nll(images(2), REPORTS[:2]))


def test_guided_decoding_of_two_equal_streams_is_transformers_generate():
    """ℓ + γ·(ℓ − ℓ) = ℓ: the KV-cache loop must then pick what transformers' generate picks, greedy and sampled."""
    generator = guided_generator()
    labels = torch.zeros(4, 14, dtype=torch.long)
    labels[1, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = Label.POSITIVE
    with torch.no_grad():
        one = generator.prompt_embeddings(generator.visual_features(images()), labels)
        rows, condition, _ = generator._streams(one)
        for greedy in (True, False):
            expected = generator.decode(*generator.generate(one, greedy=greedy, generator_seed=5))
            torch.manual_seed(5)
            tokens = generator._generate_guided(torch.cat([rows, rows]), torch.cat([condition, condition]),
                                                torch.arange(4), greedy, 1.0)
            assert generator.decode(tokens, torch.ones_like(tokens)) == expected
        # a prompt whose two streams are equal (nothing marked present) skips the second pass: transformers' path
        assert len(generator._streams(torch.cat([one[:1], one[:1]], dim=1))[2]) == 0


def test_guided_policy_is_findings_plus_gamma_times_findings_minus_no_findings_by_hand():
    gamma = 2.0
    generator = guided_generator(gamma)
    with torch.no_grad():
        features = generator.visual_features(images())
        logits = generator.disease_logits(features)[:, 0]
        generator.decision_logits.fill_(float("inf"))  # one observation, present in the top two images only
        generator.decision_logits[0] = logits.median() + 1e-6
        prompts = generator.prompt_embeddings(features)
        present = generator.disease_decisions(images()).any(dim=1)
        assert 0 < present.sum() < 4  # guided and unguided rows in one batch
        assert torch.equal(generator._streams(prompts)[2], torch.nonzero(present).squeeze(1))
        tokens, mask = generator.generate(prompts, greedy=True)
        rows = generator.prompt_rows
        logits = []
        for stream in (prompts[:, :rows], prompts[:, rows:]):  # by hand, each stream alone with its own condition
            words = generator.decoder.get_input_embeddings()(tokens) + stream[:, -1:]
            z = generator.decoder(inputs_embeds=torch.cat([stream[:, :-1], words], dim=1)).logits
            logits.append(z[:, rows - 2:-1])
        guided = logits[0] + gamma * (logits[0] - logits[1])
        kept = mask.bool()
        assert torch.equal(guided.argmax(dim=-1)[kept], tokens[kept])
        expected = torch.log_softmax(guided, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
        assert torch.allclose(generator.token_log_probs(prompts, tokens, mask), expected, atol=1e-5)
        unguided = torch.log_softmax(logits[0], -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
        assert not torch.allclose(expected, unguided, atol=1e-3)


@pytest.mark.parametrize("contrast, no_finding", [("normal", True), ("normal", False), ("findings", True),
                                                   ("findings", False)])
def test_guidance_contrast_prompt_and_which_images_get_a_second_pass(contrast, no_finding):
    """normal: ℓ_∅ reads a normal study's findings (No Finding present, the rest absent); findings: the image's own
    No Finding, the rest absent. An image whose findings equal its contrast's gets no second pass."""
    generator = condition_generator(**{"models.report_generator.findings_guidance": 2.0,
                                       "models.report_generator.guidance_contrast": contrast})
    normal, effusion = CHEXPERT_OBSERVATIONS.index("No Finding"), CHEXPERT_OBSERVATIONS.index("Pleural Effusion")
    with torch.no_grad():
        features = generator.visual_features(images())
        generator.decision_logits.fill_(float("inf"))  # nothing present, No Finding in every image or none ...
        generator.decision_logits[normal] = float("-inf") if no_finding else float("inf")
        scores = generator.disease_logits(features)[:, effusion]  # ... and an effusion in the top two images
        generator.decision_logits[effusion] = scores.median() + 1e-6
        prompts = generator.prompt_embeddings(features)
    rows, u = generator.prompt_rows, generator.disease_condition
    contrast_normal = contrast == "normal" or no_finding  # No Finding's state in the contrast stream
    by_hand = u[1].sum(dim=0) + (u[0, normal] - u[1, normal]) * contrast_normal  # every other observation absent
    assert torch.allclose(prompts[:, -1], by_hand.expand(4, -1), atol=1e-6)
    states = generator.decoder.get_input_embeddings()(generator.disease_state_ids)  # 'present', 'negative'
    slots = rows + 30 + generator.disease_slots  # the contrast stream's state words
    assert torch.allclose(prompts[:, slots[normal]], states[0 if contrast_normal else 1].expand(4, -1))
    assert torch.allclose(prompts[:, slots[effusion]], states[1].expand(4, -1))
    # images whose findings are the contrast's skip the second pass: with 'normal' and no No Finding decided,
    # every image differs from a normal study; otherwise only the two with an effusion do
    guided = generator._streams(prompts)[2]
    if contrast == "normal" and not no_finding:
        assert torch.equal(guided, torch.arange(4))
    else:
        assert torch.equal(guided, torch.nonzero(scores >= scores.median() + 1e-6).squeeze(1))
        assert len(guided) == 2


def test_findings_guidance_needs_a_disease_prompt():
    with pytest.raises(ValueError, match="findings_guidance"):
        config(**{"models.report_generator.findings_guidance": 1.0,
                  "models.report_generator.disease_prompt": "'off'"})
