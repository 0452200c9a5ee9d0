"""One validated configuration for a radrl experiment.

Everything a user can set lives here, one pydantic model per concern. Defaults are the
papers' and the DDPO reference's values; YAML files in `configs/` hold only what differs.
`load_config` reads YAML, applies `--set a.b.c=value` overrides and validates the lot
before anything starts; every error names the dotted path of the bad field.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Weight sources understood by every model builder (see radrl/models/):
#   "embedded"  the tiny model trained by `radrl bootstrap` and shipped inside the package
#   "random"    the architecture given by `arch`, randomly initialised (tests, smoke runs)
#   anything else: a local path (file or folder), or a hub id for users with access
EMBEDDED = "embedded"
RANDOM = "random"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- data


class DataConfig(Section):
    source: Literal["embedded", "mimic_cxr", "iu_xray"] = Field(
        "embedded",
        description="embedded = IU report text paired with phantom radiographs; "
        "mimic_cxr / iu_xray = real images from local folders",
    )
    image_size: int = Field(32, ge=32, le=512, description="image side in pixels (the embedded world is 32 px)")
    postures_per_report: int = Field(
        4, ge=1, description="embedded: phantoms rendered per report, each in its own posture"
    )
    posture_spread: float = Field(
        1.0, ge=0.0, le=2.0, description="embedded: 0 = always upright, 1 = realistic mis-positioning"
    )
    max_tokens: int = Field(74, ge=1, description="M: longest report kept, in text-encoder tokens")
    mimic_root: Path | None = Field(None, description="MIMIC-CXR-JPG folder (files/, metadata and split CSVs)")
    mimic_reports_root: Path | None = Field(None, description="MIMIC-CXR reports folder; default mimic_root")
    iu_image_dir: Path | None = Field(None, description="folder of the IU X-ray PNG images")
    n_train: int = Field(5000, ge=1, description="report/image pairs sampled from the train split")
    n_test: int = Field(1000, ge=1, description="pairs sampled from the test split (PA only)")

    @model_validator(mode="after")
    def _paths_for_real_sources(self) -> DataConfig:
        if self.source == "mimic_cxr" and self.mimic_root is None:
            raise ValueError("data.source is 'mimic_cxr' but data.mimic_root is not set: point it at your MIMIC-CXR-JPG folder")
        if self.source == "iu_xray" and self.iu_image_dir is None:
            raise ValueError("data.source is 'iu_xray' but data.iu_image_dir is not set: point it at the IU X-ray PNG folder")
        return self


# -------------------------------------------------------------------------- models


class DiffusionModelConfig(Section):
    weights: str = Field(EMBEDDED, description="'embedded', 'random', or a diffusers SD 1.x folder / hub id (RoentGen)")
    arch: Literal["tiny", "sd1"] = Field("tiny", description="architecture when weights='random'")
    use_vae: bool = Field(False, description="denoise VAE latents (SD 1.x) instead of pixels (tiny)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the frozen UNet, text encoder and VAE are stored and run in bfloat16 (GPU); LoRA, "
                            "ACE, optimizer state, latents and log-probs stay fp32")
    channels_last: bool = Field(False, description="UNet convolutions in channels-last memory format (GPU tensor cores)")
    compile: bool = Field(False, description="torch.compile the UNet in rollout workers and the learner (the first "
                                             "calls compile, once for the policy and once for the anchor)")


class PostureModelConfig(Section):
    weights: str = Field(EMBEDDED, description="'embedded', 'random', or a .safetensors/.pt file")
    arch: Literal["tiny", "resnet18"] = "tiny"


class ClassifierConfig(Section):
    weights: str = Field(
        EMBEDDED,
        description="'embedded', 'random', a torchxrayvision name (e.g. 'densenet121-res224-all', "
        "must be in its local cache), or a local weight file",
    )
    arch: Literal["tiny", "densenet121"] = "tiny"


class ClipConfig(Section):
    weights: str = Field(EMBEDDED, description="'embedded', 'random', an open_clip model folder / hf-hub: id, or (arch "
                                               "cxr_clip) a released CXR-CLIP checkpoint file such as r50_mc.tar")
    arch: Literal["tiny", "biomedclip", "cxr_clip"] = "tiny"
    text_model: str | None = Field(None, description="a released CXR-CLIP file's BERT config and tokenizer: a "
                                                     "Bio_ClinicalBERT folder or hub id (local cache)")
    open_clip_config: Path | None = Field(None, description="open_clip model JSON for a local checkpoint")


class ReportGeneratorConfig(Section):
    decoder_weights: str = Field(EMBEDDED, description="'embedded', 'random', or a transformers folder / hub id")
    decoder_arch: Literal["tiny", "opt2.7b"] = "tiny"
    num_regions: int = Field(29, ge=1, description="K: anatomical regions (Chest ImaGenome)")
    region_blocks: int = Field(3, ge=1, description="region cross-/self-attention blocks")
    vtrans_layers: int = Field(3, ge=1, description="VTrans transformer layers")
    region_attention: Literal["region_query", "paper"] = Field(
        "region_query", description="region blocks: each region prompt queries the image's patches (region_query), or "
                                    "the paper's form, patches querying one region key (its softmax over one key is "
                                    "1, so every patch gets the same region vector)")
    region_prior: Literal["none", "atlas"] = Field(
        "none", description="region_query only. atlas: each region's attention logits get log(floor + (1 − floor)·"
                            "overlap of the patch with the region's box on an upright PA film) (REGION_BOXES), so a "
                            "region attends inside its own box and learns where within it; none: where to look is "
                            "learnt from the report loss alone")
    region_prior_floor: float = Field(
        0.0, ge=0.0, lt=1.0, description="region_prior atlas: the weight a patch outside a region's box keeps against "
                                         "one inside (0: masked)")
    region_grid: int = Field(0, ge=0, description="average-pool the patch grid to G × G before the region blocks "
                                                  "(0 = every patch); the paper's form costs K × a ViT pass")
    disease_prompt: Literal["off", "predicted", "teacher_forced"] = Field(
        "teacher_forced", description="one decoder prompt token per CheXpert observation, mixed by the disease head's "
                                      "probability; teacher_forced: the supervised stage uses the reference report's "
                                      "labels instead, and generation the head's 0/1 decision at per-observation "
                                      "operating points fit on the training pairs")
    disease_prompt_form: Literal["tokens", "words", "present_words"] = Field(
        "tokens", description="how the disease prompt reaches the decoder: tokens, one learnt token per observation "
                              "(its present/absent pair, started at the words' mean embedding); words, the "
                              "observations' names as decoder tokens, each followed by 'present' or 'negative' "
                              "(one rule shared by all observations: a rare finding learns from the common ones); "
                              "present_words, as words but an absent observation's name is masked by 'negative', "
                              "so only present findings' names are in the prompt")
    instruction: str = "Write the findings and impression of this chest radiograph."
    max_new_tokens: int = Field(96, ge=2, description="longest generated report, in tokens")
    supervised_decoder: Literal["lora", "full"] = Field(
        "lora", description="supervised stage: train a LoRA on the decoder (merged when the stage ends) or all of it"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the frozen CLIP and the decoder's frozen weights (all of it under a LoRA, i.e. the "
                            "supervised stage with supervised_decoder=lora and all of CQRL) stored and run in bfloat16; "
                            "LoRA, extractor, prompts, optimizer state and log-probs stay fp32")
    decoder_lora_targets: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "out_proj"),
                                                  description="decoder modules that get LoRA (OPT's attention)")
    disease_weight: float = Field(1.0, ge=0, description="λ of L_disease in the supervised loss")
    counterfactual_weight: float = Field(
        0.0, ge=0, description="μ of L_counterfactual in the supervised stage (0 = off): each report must be more "
                               "likely, by counterfactual_margin nats, under its teacher-forced disease prompt than "
                               "under the same prompt with one observation's state flipped (one of its positive "
                               "findings to absent, or for a report without one any finding to present); costs a "
                               "second decoder pass per supervised step (epochs 1.6× as long in the tiny config)")
    counterfactual_margin: float = Field(2.0, ge=0, description="m of L_counterfactual, in nats per report")
    disease_condition: Literal["off", "every_token"] = Field(
        "off", description="every_token: besides the disease prompt, a learnt vector per observation and state "
                           "(present / absent), mixed like the prompt, is added to the input embedding of every "
                           "report token, so the decoder reads the findings at each step without attending back "
                           "to the prompt (needs disease_prompt on)")
    findings_guidance: float = Field(
        0.0, ge=0, description="γ: classifier-free guidance on the findings. The policy's next-token logits become "
                               "ℓ_f + γ·(ℓ_f − ℓ_∅), ℓ_∅ from the same image's prompt with guidance_contrast's findings, "
                               "in sampling, greedy decoding and the RL stage's log-probs (one decoder pass of "
                               "twice the batch); the supervised stage fits ℓ_f (needs disease_prompt on)")
    guidance_contrast: Literal["empty", "normal", "findings"] = Field(
        "findings", description="the prompt findings guidance contrasts with (ℓ_∅): findings, the image's own No "
                                "Finding with every other observation absent (an image the head calls normal, or "
                                "marks nothing in, is left unguided and costs no second decoder pass); empty, every "
                                "observation absent (a normal image's 'No Finding' is amplified too); normal, a normal "
                                "study's (No Finding present, the rest absent). Validation, 3 seeds, γ = 2: macro CE "
                                "F1 0.498 / 0.496 / 0.455, greedy RadCliQ v1 1.045 / 1.061 / 1.091 (README)")
    disease_head_input: Literal["regions", "patches"] = Field(
        "regions", description="what the disease head's linear map reads: the VTrans features [global, regions], "
                               "flattened, or the frozen CLIP patch grid, flattened (every patch in place)")
    disease_unmentioned: Literal["negative", "ignore"] = Field(
        "negative", description="L_disease target of an observation the report does not mention: negative (what the "
                                "prompt teacher-forces too), or left out of the loss (then an observation reports "
                                "mention mostly when present, e.g. Atelectasis, trains the head on positives only)")
    visual_prompt_dropout: float = Field(
        0.0, ge=0, lt=1, description="supervised stage: the share of pairs whose visual prompts are zeroed in the "
                                     "decoder's input (L_disease still sees them), so the decoder learns to write "
                                     "findings from the disease prompt")
    disease_pos_weight: Literal["none", "sqrt", "ratio"] = Field(
        "none", description="weight of an observation's positive pairs in L_disease, from the training labels: 1, "
                            "sqrt(n_negative / n_positive), or n_negative / n_positive (a rare finding's head learns "
                            "without repeating its reports to the decoder, as learner.repeat_factor_threshold does)")

    @model_validator(mode="after")
    def _counterfactual_needs_teacher_forcing(self):
        if self.counterfactual_weight > 0 and self.disease_prompt != "teacher_forced":
            raise ValueError("models.report_generator.counterfactual_weight > 0 flips the teacher-forced disease prompt; "
                             f"it needs disease_prompt 'teacher_forced' (got {self.disease_prompt!r}): set one or the "
                             "other")
        if self.disease_condition != "off" and self.disease_prompt == "off":
            raise ValueError("models.report_generator.disease_condition 'every_token' spreads the disease prompt's "
                             "findings over the report tokens; it needs disease_prompt on (got 'off')")
        if self.findings_guidance > 0 and self.disease_prompt == "off":
            raise ValueError("models.report_generator.findings_guidance contrasts the disease prompt with a no-findings "
                             "prompt; it needs disease_prompt on (got 'off'): set findings_guidance 0 or turn the "
                             "disease prompt on")
        if self.region_prior == "atlas" and self.region_attention != "region_query":
            raise ValueError("models.report_generator.region_prior 'atlas' biases the region queries' attention over "
                             "the patches; the paper's form has no such attention (its softmax is over one key): set "
                             "region_attention 'region_query' or region_prior 'none'")
        return self


class ModelsConfig(Section):
    diffusion: DiffusionModelConfig = DiffusionModelConfig()
    posture: PostureModelConfig = PostureModelConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    clip: ClipConfig = ClipConfig()
    report_generator: ReportGeneratorConfig = ReportGeneratorConfig()


# ------------------------------------------------------------------------- rollout


class Resources(Section):
    num_cpus: float = Field(1.0, ge=0, description="CPUs per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a device")
    memory_gb: float = Field(0.0, ge=0, description="memory reserved per actor on Ray (0: no reservation)")
    custom: dict[str, float] = Field(default_factory=dict, description=(
        "Ray custom resources per actor, e.g. {rollout_node: 0.01} to put a role on the nodes started with "
        "`ray start --resources '{\"rollout_node\": 8}'`"))


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="rollout worker actors: a speed knob only; what an iteration "
                                                 "samples and trains does not depend on it")
    report_temperature: float = Field(
        1.0, gt=0, description="rrg: CQRL samples reports from softmax(logits / T); the PPO ratio, the KL to the "
                               "reference (tempered alike) and the entropy are the tempered policy's. T < 1 samples "
                               "near greedy decoding. Evaluation samples at T = 1 whatever this is")
    per_iteration: int | None = Field(
        None, ge=1, description="trajectories sampled per iteration (CXRL: images, LM-RRG: sampled reports), for "
                                "any num_workers; None = batch_size")
    batch_size: int = Field(8, ge=1, description="the most trajectories one sampling call makes (memory); an "
                                                 "iteration is cut into calls of at most this many, at least one "
                                                 "per worker, whole report groups each")
    samples_per_report: int = Field(
        1, ge=1, description="images per report in an iteration (a group: per-report advantages compare them)"
    )
    num_steps: int = Field(50, ge=1, description="DDIM steps")
    eta: float = Field(1.0, gt=0.0, description="DDIM eta; > 0 or log-probs are undefined")
    guidance_scale: float = Field(5.0, ge=1.0, description="classifier-free guidance (also used in training)")
    share_noise_with_anchor: bool = Field(True, description="policy and anchor start from the same noise")
    anchor_samples_per_report: int | None = Field(
        None, ge=1, description="anchor images per report in an iteration (the first rows of its group, each from "
                                "its row's x_T); None = one per policy image. Fewer needs "
                                "rewards.anchor_reference='report_mean'")
    noise_seeds_per_report: int = Field(
        0, ge=0, description="0: a fresh x_T for every sample; K: each sample's x_T is one of K fixed seeds of its "
                             "report (shared with the anchor), so (report, seed) pairs recur")
    anchor_cache: bool = Field(False, description="reuse the frozen anchor's scores of recurring (report, x_T seed) "
                                                  "pairs instead of sampling it again; needs noise_seeds_per_report")
    precompute_anchor: bool = Field(False, description="score the anchor on every training (report, seed) pair before "
                                                       "training (for a small data.n_train); needs anchor_cache")
    repeat_factor_threshold: float | None = Field(
        None, gt=0, le=1, description="draw each iteration's training reports (cxrl) or image–report pairs (rrg's "
                                      "CQRL) in proportion to their LVIS repeat factor max(1, sqrt(t / f)), f the "
                                      "share of training reports with the report's rarest positive finding; None = "
                                      "uniformly (IU reports are mostly normal)")
    resources: Resources = Resources()

    @property
    def trajectories_per_iteration(self) -> int:
        """What one iteration samples and trains on, whatever the number of workers."""
        return self.batch_size if self.per_iteration is None else self.per_iteration


# ------------------------------------------------------------------------- rewards


class RewardsConfig(Section):
    lambda_align: float = Field(1.0, ge=0, description="weight of r_align")
    lambda_diag: float = Field(10.0, ge=0, description="weight of r_diag")
    lambda_consist: float = Field(10.0, ge=0, description="weight of r_consist")
    rlcf: bool = Field(True, description="comparative feedback against the anchor; False = 'w/o RLCF'")
    anchor_reference: Literal["paired", "report_mean"] = Field(
        "paired", description="RLCF: compare each policy image with its paired anchor image (same x_T), or with the "
                              "mean score of the anchor's images of the same report (less noise, fewer anchor images)")
    diag_metric: Literal["accuracy", "balanced", "prevalence_weighted"] = Field(
        "accuracy", description="r_diag per image: accuracy over the scored classes (the paper); balanced: the "
                                "mean of sensitivity over its positive classes and specificity over its negative ones "
                                "(IU reports are mostly normal: accuracy pays most for reading classes negative); "
                                "prevalence_weighted: the calibrated probability of each label, a positive weighted "
                                "1/(2·its class's training share), a negative 1/(2·(1 − share)), so a shift of a "
                                "class's probability on every image does not pay (use with learner.per_prompt_stats "
                                "false)")
    replicas: int = Field(1, ge=1, description="actors per reward model")
    radcliq_version: Literal["v0", "v1"] = "v1"
    rrg_reward: Literal["radcliq", "bleu4"] = Field(
        "radcliq", description="rrg: RadCliQ (reward = RadCliQ(empty report) − RadCliQ) or BLEU-4 (ablation)")
    radcliq_backends: Literal["offline", "official"] = Field(
        "offline", description="RadCliQ features from offline stand-ins (embedded world) or the official models")
    bertscore_layer: int = Field(2, ge=1, description="offline BERTScore: hidden layer of the shipped report LM")
    bertscore_model: str = Field("distilroberta-base", description="official BERTScore model (hub cache)")
    radgraph_model: str = Field("radgraph", description="official RadGraph model name (radgraph package)")
    chexbert_weights: str | None = Field(None, description="official CheXbert: path of chexbert.pth")
    resources: Resources = Resources()


# ------------------------------------------------------------------------- learner


class LearnerConfig(Section):
    iterations: int = Field(100, ge=0, description="sample→score→update rounds (rrg: 0 = the supervised stage only)")
    time_budget_minutes: float | None = Field(
        None, gt=0, description="cxrl: also stop once training (sampling, scoring, updates; not the held-out checks) "
                                "has taken this many minutes of wall time: equal-compute comparisons")
    algorithm: Literal["ddpo", "draft"] = Field(
        "ddpo", description="cxrl: ddpo (policy gradient on the recorded trajectories, the paper's) or draft (reward "
                            "backpropagation through the last draft_steps denoising steps, DRaFT-K)")
    draft_steps: int = Field(1, ge=1, description="cxrl, draft: K, the last denoising steps the learner replays with "
                                                  "gradients from the rollout's x at step T−K and its recorded noise")
    anchor_penalty: float = Field(0.0, ge=0, description=(
        "cxrl, draft: weight of the L2 anchor penalty, the mean over the K replayed steps of "
        "‖ε_θ(x_t) − ε_anchor(x_t)‖² (per element): keeps the denoiser near the frozen base, against reward hacking"))
    batch_size: int = Field(8, ge=1, description="trajectories per gradient step")
    gradient_checkpointing: bool = Field(False, description="cxrl: the learner's UNet recomputes activations in the "
                                                           "backward pass (diffusers' gradient checkpointing): less "
                                                           "memory, ~1/3 more compute, the same gradient")
    micro_batch_size: int | None = Field(
        None, ge=1, description="cxrl: trajectories per UNet forward/backward inside a gradient step (gradient "
                                "accumulation: memory only, the same update); None = the whole batch_size at once")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (LoRA)")
    ace_lr: float | None = Field(None, gt=0, description="learning rate of the ACE tokens; default lr")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_nonfinite_fraction: float = Field(0.25, ge=0, le=1, description=(
        "samples of an iteration whose reward or recorded log-prob is NaN/inf are dropped from the update and "
        "counted; above this fraction the run stops instead"))
    inner_epochs: int = Field(1, ge=1)
    clip_range: float = Field(1e-4, gt=0, description="PPO clip on the importance ratio (DDPO)")
    adv_clip_max: float = Field(5.0, gt=0)
    timestep_fraction: float = Field(1.0, gt=0, le=1.0, description="share of the trained denoising steps used in "
                                                                      "each minibatch (a random subset)")
    min_train_timestep: int = Field(
        0, ge=0, description="train only denoising steps at t ≥ this (0 = all); the last, nearly noise-free steps "
                             "have a tiny σ_t, so their log-prob gradients are the largest and carry the least signal")
    per_prompt_stats: bool = Field(True, description="cxrl: normalise advantages per report (stat tracker)")
    stat_buffer_size: int = Field(16, ge=1)
    stat_min_count: int = Field(16, ge=1)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(4.0, gt=0)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    ace_tokens: int = Field(3, ge=0, description="N adaptive condition embeddings; 0 = 'w/o ACE'")
    kl_threshold: float | None = Field(
        None, gt=0, description="rrg: θ of the adaptive λ_KL, in reward units; None = set from the reward's measured "
                                "scale: the kl_threshold_quantile of the first CQRL batch's rewards, then fixed")
    kl_threshold_quantile: float = Field(0.75, gt=0, lt=1, description="rrg: quantile of the supervised model's "
                                                                      "sampled rewards that sets θ (kl_threshold None)")
    adaptive_kl: bool = Field(True, description="rrg: λ_KL = 1 if reward ≥ θ else reward/θ (clipped at 0)")
    rrg_advantage: Literal["rloo", "group_mean", "greedy"] = Field(
        "rloo", description="rrg: advantage = reward minus the mean of the image's other samples (rloo), of all its "
                            "samples (group_mean), or the reward of the image's greedy report (greedy: self-critical, "
                            "SCST / ReMax; the workers also greedy-decode each image); no std division")
    rrg_token_norm: Literal["report_length", "constant"] = Field(
        "report_length", description="rrg: divide each report's summed PPO and KL terms by its own token count "
                                "(report_length, GRPO's mean: length-biased) or by max_new_tokens (constant, Dr. GRPO)")
    target_kl: float | None = Field(None, gt=0, description="rrg: stop an iteration's PPO epochs once a minibatch's "
                                                            "approximate KL to the sampling policy exceeds this")
    lambda_kl: float = Field(1.0, ge=0, description="rrg: the fixed lambda_KL when adaptive_kl is off")
    kl_coef: float = Field(1.0, ge=0, description="rrg: β, the KL term's weight is β·λ_KL (adaptive or fixed); the "
                                                  "paper's rule alone (β = 1) weighs the report's summed token KL "
                                                  "as much as the whole reward")
    supervised_epochs: int = Field(3, ge=0, description="rrg: supervised stage before CQRL")
    supervised_lr: float = Field(1e-4, gt=0, description="rrg: AdamW learning rate of the supervised stage")
    supervised_batch_size: int = Field(32, ge=1, description="rrg: image–report pairs per supervised step")
    repeat_factor_threshold: float | None = Field(
        None, gt=0, le=1, description="rrg: repeat-factor sampling of the supervised epochs (LVIS): a pair whose "
                                      "rarest positive finding is in a share f of training pairs appears "
                                      "max(1, sqrt(t / f)) times per epoch in expectation; None = each pair once")
    supervised_validation: int = Field(
        0, ge=0, description="rrg: about this many training pairs held back, whole report texts at a time (no "
                             "validation text, normalised, stays in training; the same texts for every seed, and "
                             "out of both stages), to choose the supervised epoch: the one whose greedy reports "
                             "score best there (supervised_selection) ends the stage; 0 = the last epoch, every "
                             "training pair trained on")
    supervised_selection: Literal["example_f1", "macro_f1"] = Field(
        "example_f1", description="rrg: what chooses the supervised epoch on the validation pairs: example-based CE "
                                  "F1 (mostly the normal reports' No Finding), or macro F1, the mean per-observation "
                                  "F1 over the observations with at least 5 positive validation reports")
    rl_validation_every: int = Field(
        0, ge=0, description="rrg: every this many CQRL iterations (and at the hand-over), greedy reports and reports "
                             "sampled at temperature 1 of the validation pairs (learner.supervised_validation) are "
                             "scored with the training reward; CQRL ends with the weights of the iteration whose mean "
                             "of the two scores is best (the hand-over's included). 0 = the last iteration's weights")
    rl_selection_ce_guard: float | None = Field(
        None, ge=0, description="rrg, with rl_validation_every: a validated iteration whose greedy validation reports' "
                                "macro CE F1 fell below the hand-over's by more than this many standard errors (paired "
                                "bootstrap over the validation pairs) is not kept, however high its reward (RadCliQ "
                                "barely sees a lost finding); None = every validated iteration competes")
    supervised_checkpoint: Path | None = Field(
        None, description="rrg: skip the supervised stage and start CQRL from this finished supervised run "
                          "(its run folder or one checkpoint folder); e.g. several CQRL variants from one model")
    resources: Resources = Resources()


# ------------------------------------------------------------------- orchestration


class OrchestrationConfig(Section):
    local: bool = Field(False, description="run every role in-process, no Ray")
    address: str | None = Field(None, description="Ray cluster address ('auto' joins a running one)")
    max_staleness: int = Field(0, ge=0, description="how many versions behind the learner a batch may be (0 = on-policy)")
    dashboard: bool = Field(True, description="start the Ray dashboard with a new local Ray instance")
    overlap: bool = Field(False, description="sample iteration k+1 while iteration k is scored and trained: "
                                             "batches one weight version old, so it needs max_staleness ≥ 1")
    max_failures: int = Field(3, ge=0, description="dead actors replaced in one run before it stops (Ray only)")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds every actor (or a replacement) may take to "
                                                            "start before the run stops with what it waits for")
    run_id: str | None = Field(None, description="Ray namespace and actor-name prefix of the run (default: from "
                                                 "logging.run_dir), so two runs on one cluster stay apart")


class LoggingConfig(Section):
    run_dir: Path = Field(Path("runs/default"), description="TensorBoard events, checkpoints, figures")
    image_every: int = Field(10, ge=1, description="iterations between image grids")
    checkpoint_every: int = Field(10, ge=1, description="iterations between checkpoints")
    keep_checkpoints: int = Field(3, ge=0, description="newest checkpoints kept (older ones deleted); 0 keeps all")
    eval_reports: int = Field(32, ge=1, description="held-out reports in the start and end evaluation")
    eval_seed: int = Field(1234, description="noise seed of the evaluation samples (same for every run)")
    eval_samples: int = Field(1, ge=1, description=(
        "rrg: reports sampled (T = 1) per held-out image in the start and end evaluation; an image's sampled RadCliQ "
        "is the mean of its samples (the expected score of a sampled report, estimated with less sampling noise), "
        "and the first sample alone is kept too ('sampled_first')"))
    eval_every: int | None = Field(None, ge=1, description=(
        "cxrl: every this many iterations, score the policy on the eval_reports held-out reports at fixed noise "
        "(rewards and mean AUROC, 'heldout/…' against training wall time and images generated); None = start and end only"))


class EvaluationConfig(Section):
    after_training: bool = Field(True, description=(
        "cxrl: `radrl train` ends with `radrl eval` on the final checkpoint: FID, MS-SSIM diversity and AUROC of "
        "policy and anchor next to the rewards (<run_dir>/eval/)"))
    reports: int = Field(128, ge=2, description="`radrl eval`: held-out reports (cxrl) or images (rrg), a seeded draw")
    diversity_reports: int = Field(16, ge=1, description="cxrl: reports sampled several times for MS-SSIM diversity")
    diversity_samples: int = Field(4, ge=2, description="cxrl: samples per report for MS-SSIM diversity")
    shown: int = Field(6, ge=1, description="reports shown in the sample figures")


# ---------------------------------------------------------------------- experiment


class ExperimentConfig(Section):
    task: Literal["cxrl", "rrg"] = "cxrl"
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    learner: LearnerConfig = LearnerConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    logging: LoggingConfig = LoggingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ExperimentConfig:
        per_iteration = self.rollout.trajectories_per_iteration
        if per_iteration % self.learner.batch_size:
            raise ValueError(
                f"learner.batch_size = {self.learner.batch_size} does not divide the {per_iteration} trajectories "
                f"sampled per iteration (rollout.per_iteration, or rollout.batch_size if unset); pick a divisor"
            )
        for key in ("batch_size", "per_iteration"):
            if getattr(self.rollout, key) is not None and getattr(self.rollout, key) % self.rollout.samples_per_report:
                raise ValueError(
                    f"rollout.samples_per_report = {self.rollout.samples_per_report} must divide rollout.{key} = "
                    f"{getattr(self.rollout, key)}, so that each report's group is sampled in one call"
                )
        rollout = self.rollout
        if rollout.anchor_cache and not (rollout.noise_seeds_per_report and self.rewards.rlcf):
            raise ValueError("rollout.anchor_cache needs rollout.noise_seeds_per_report > 0 (recurring (report, seed) "
                             "pairs) and rewards.rlcf (an anchor to score)")
        if rollout.anchor_samples_per_report is not None:
            if rollout.anchor_samples_per_report > rollout.samples_per_report:
                raise ValueError(f"rollout.anchor_samples_per_report = {rollout.anchor_samples_per_report} exceeds "
                                 f"rollout.samples_per_report = {rollout.samples_per_report}: a report's anchor images "
                                 "come from its group's rows")
            fewer = rollout.anchor_samples_per_report < rollout.samples_per_report
            if fewer and self.rewards.anchor_reference != "report_mean":
                raise ValueError("rollout.anchor_samples_per_report below rollout.samples_per_report leaves policy images "
                                 "without a paired anchor image: set rewards.anchor_reference=report_mean")
            if fewer and rollout.anchor_cache:
                raise ValueError("rollout.anchor_cache scores the anchor on every row's (report, seed) pair: leave "
                                 "rollout.anchor_samples_per_report unset with it")
        if self.orchestration.overlap and self.orchestration.max_staleness < 1:
            raise ValueError("orchestration.overlap samples with the previous weights: set orchestration.max_staleness "
                             "to 1 or more (the importance ratio corrects one version of staleness)")
        if rollout.precompute_anchor and not rollout.anchor_cache:
            raise ValueError("rollout.precompute_anchor fills the anchor cache: set rollout.anchor_cache=true too")
        if self.learner.algorithm == "draft":
            if self.task != "cxrl":
                raise ValueError("learner.algorithm=draft backpropagates image rewards: it is for task cxrl")
            if self.learner.draft_steps > self.rollout.num_steps:
                raise ValueError(f"learner.draft_steps = {self.learner.draft_steps} exceeds the rollout's "
                                 f"{self.rollout.num_steps} denoising steps (rollout.num_steps)")
        if self.task == "rrg" and self.rollout.samples_per_report < 2:
            raise ValueError("rollout.samples_per_report must be ≥ 2 for rrg: a report's advantage is its reward minus "
                             "the mean of the other reports sampled for the same image")
        if self.learner.rl_validation_every and not self.learner.supervised_validation:
            raise ValueError("learner.rl_validation_every scores the validation pairs: set learner.supervised_validation "
                             "(e.g. 300), or rl_validation_every=0 to end CQRL with its last iteration")
        if self.learner.rl_selection_ce_guard is not None and not self.learner.rl_validation_every:
            raise ValueError("learner.rl_selection_ce_guard guards the choice among validated CQRL iterations: set "
                             "learner.rl_validation_every (e.g. 40), or leave rl_selection_ce_guard unset")
        if self.learner.stat_min_count > self.learner.stat_buffer_size:
            raise ValueError("learner.stat_min_count must not exceed learner.stat_buffer_size")
        if self.task == "cxrl" and self.rewards.lambda_align + self.rewards.lambda_diag + self.rewards.lambda_consist == 0:
            raise ValueError(
                "rewards.lambda_align, rewards.lambda_diag and rewards.lambda_consist are all 0: nothing to learn from; "
                "enable at least one reward"
            )
        if self.models.diffusion.use_vae and self.models.diffusion.weights == RANDOM and self.models.diffusion.arch == "tiny":
            raise ValueError("models.diffusion.use_vae needs arch 'sd1' or a pretrained folder; the tiny model denoises pixels")
        return self


# ------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A configuration that cannot run, with every problem on its own line."""


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def _valid_keys(loc: tuple) -> list[str]:
    """Field names of the section that `loc` (path to a bad key) lives in."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _explain(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = _dotted(item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1])
            valid = _valid_keys(item["loc"])
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"{path}: unknown key{hint} (valid here: {', '.join(valid)})")
        elif item["type"] == "value_error":  # our cross-field rules name their fields themselves
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: {item['msg'].removeprefix('Value error, ')}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set learner.lr=1e-4")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` override set (unknown keys fail at validation)."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


SHIPPED_CONFIGS = Path(__file__).parent / "configs"  # the repository's configs/, inside the installed package


def config_path(path: str | Path) -> Path:
    """`path` if it is a file; else, for a relative path, the shipped config of that file name (so
    `radrl train configs/rrg_tiny.yaml` works from any folder after `pip install radrl`)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_absolute() and (SHIPPED_CONFIGS / path.name).is_file():
        return SHIPPED_CONFIGS / path.name
    shipped = ", ".join(sorted(p.name for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (shipped with radrl, by name from any folder: {shipped})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the schema defaults if None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = config_path(path)
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        raw = loaded or {}
    return _validated(apply_overrides(raw, overrides or []), f" ({path})" if path else "")


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A validated copy of `cfg` with each `a.b.c=value` override set."""
    return _validated(apply_overrides(cfg.model_dump(mode="json"), overrides), "")


def with_current_defaults(saved: dict) -> dict:
    """A config dict written by an older radrl, with the settings added since at their defaults, so that it compares
    equal to today's config of the same run (a new option that keeps the old behaviour is not a change). A dict
    this version no longer validates is returned as it is."""
    try:
        return ExperimentConfig.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def _validated(raw: dict, where: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error).replace("invalid config:", f"invalid config{where}:", 1)) from None
