"""The LM-RRG report generator: region-prompted visual extractor → VTrans → decoder LM.

    patches F_I = CLIP image tower tokens                                   [B, N, D]
    region text F_T^k = CLIP text tower on region k's prompt                [K, E]
    3 × region block, one of two forms (models.report_generator.region_attention):
      region_query (default)  region tokens R^k = W·F_T^k are the queries:  [B, K, D]
        R = CA(LN(R), LN(F_I)) + R      each region attends over all N patches, several heads (region_prior
                                        'atlas': the attention logits get log(floor + (1 − floor)·the patch's
                                        overlap with the region's box on an upright PA film, ÷ the best patch's),
                                        so "left lung" looks at the left lung's patches; floor 0, the default,
                                        masks every patch outside the box)
        R = SA(LN(R)) + R               regions attend to each other
        R = FFN(LN(R)) + R
      paper  (as the paper writes it; per region k, patches are the queries): [B·K, N, D]
        F_CA  = CA(LN(F_I), F_T^k) + F_I, F_SA = SA(LN(F_CA)) + F_CA, F_FFN = FFN(LN(F_SA)) + F_SA,
        F_region^k = mean over patches.  With one key/value per region the softmax is 1 for
        every patch, so CA adds the same vector W_o·W_v·F_T^k to each patch: region identity
        enters only as a constant bias, and regions differ little (kept for the paper's form).
    global = mean of F_I;  [global, regions]                                 [B, 1 + K, D]
    VTrans (3 layers, width D) → projection to the decoder's width          [B, 1 + K, H]
    disease head (models.report_generator.disease_head_input): 14 logits from a linear map of
        regions  the VTrans features, flattened                             [B, (1 + K)·D]
        patches  the frozen patch grid F_I, flattened (every patch in place) [B, N·D]
    disease condition (models.report_generator.disease_condition 'every_token'): c = Σ_c p_c·u⁺_c + (1 − p_c)·u⁻_c,
        learnt vectors started at 0, added to the input embedding of every report token            [B, H]
        (carried as the prompt tensor's last row, which never enters the decoder as a position)
    disease prompt (models.report_generator.disease_prompt): for each CheXpert observation c,
        p_c = σ(disease head) and the token p_c·e⁺_c + (1 − p_c)·e⁻_c             [B, 14, H]
        teacher_forced: training puts the reference's labels in p_c, generation the head's decision at an
        operating point per observation (the F1-best threshold on the training pairs)
        form 'words' instead: the decoder's own tokens "<name_1> s_1 <name_2> s_2 …", s_c = p_c·e(present) +
        (1 − p_c)·e(negative)                                                   [B, L, H]
    decoder input = [visual prompts, disease prompt, instruction, BOS] → report tokens (+ c each, if on)
    findings guidance (models.report_generator.findings_guidance γ > 0): the policy's next-token logits are
        ℓ_f + γ·(ℓ_f − ℓ_∅), ℓ_f from the prompt above and ℓ_∅ from the same image's prompt with the contrast's
        findings (guidance_contrast 'findings': the image's own No Finding, every other observation absent, so
        an image the head calls normal costs no second pass; 'empty': every observation absent, p = 0;
        'normal': a normal study's, No Finding present and the rest absent);
        classifier-free guidance on the findings, used for sampling, greedy decoding and every log-prob of the RL
        stage alike; the supervised stage fits ℓ_f alone (teacher-forced prompts)

The CLIP towers are frozen throughout. The supervised stage trains the region blocks, VTrans,
the projection, the disease head and prompt, and the decoder (fully, or through a LoRA that is
merged when the stage ends); the RL stage trains a fresh LoRA on the decoder only, so "adapters
off" is the supervised model: the frozen reference G_ref of CQRL, with no second copy.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from radrl.config import ExperimentConfig
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label
from radrl.models.clip import ImageReportClip, build_clip
from radrl.models.diffusion_policy import PRECISIONS
from radrl.models.report_lm import DecoderLM, build_decoder
from radrl.models.weights import copy_named_tensors

# The 29 Chest ImaGenome regions, each with a descriptive sentence written for this project.
REGION_PROMPTS: dict[str, str] = {
    "right lung": "the right lung field on the left side of the image",
    "right upper lung zone": "the upper zone of the right lung above the hilum",
    "right mid lung zone": "the middle zone of the right lung at the level of the hilum",
    "right lower lung zone": "the lower zone of the right lung above the diaphragm",
    "right hilar structures": "the right hilum where the pulmonary vessels and bronchus enter the lung",
    "right apical zone": "the apex of the right lung above the clavicle",
    "right costophrenic angle": "the right costophrenic angle where the diaphragm meets the chest wall",
    "right hemidiaphragm": "the dome of the right hemidiaphragm over the liver",
    "left lung": "the left lung field on the right side of the image",
    "left upper lung zone": "the upper zone of the left lung above the hilum",
    "left mid lung zone": "the middle zone of the left lung at the level of the hilum",
    "left lower lung zone": "the lower zone of the left lung behind the heart and above the diaphragm",
    "left hilar structures": "the left hilum where the pulmonary vessels and bronchus enter the lung",
    "left apical zone": "the apex of the left lung above the clavicle",
    "left costophrenic angle": "the left costophrenic angle where the diaphragm meets the chest wall",
    "left hemidiaphragm": "the dome of the left hemidiaphragm over the stomach bubble",
    "trachea": "the trachea, the midline air column above the carina",
    "spine": "the thoracic spine behind the mediastinum",
    "right clavicle": "the right clavicle across the top of the right chest",
    "left clavicle": "the left clavicle across the top of the left chest",
    "aortic arch": "the aortic arch, the knob at the upper left border of the mediastinum",
    "mediastinum": "the mediastinum, the central shadow between the lungs",
    "upper mediastinum": "the upper mediastinum above the heart and around the trachea",
    "svc": "the superior vena cava along the right upper border of the mediastinum",
    "cardiac silhouette": "the cardiac silhouette, the outline and size of the heart",
    "cavoatrial junction": "the cavoatrial junction where the superior vena cava meets the right atrium",
    "right atrium": "the right atrium forming the right heart border",
    "carina": "the carina where the trachea divides into the main bronchi",
    "abdomen": "the upper abdomen below the diaphragm",
}
REGIONS = tuple(REGION_PROMPTS)

# Where each region lies on an upright PA film, as a box (x0, y0, x1, y1) in fractions of the image's width and height
# from its top-left corner (the patient's right on the image's left). Written for this project from standard PA
# anatomy and matched to the embedded phantoms' layout (radrl/data/phantom.py: lungs at x = ±0.40 ± 0.34 and
# y = −0.66 … 0.45, heart centred at (0.13, 0.24), in its [−1, 1] coordinates); used by region_prior 'atlas'.
REGION_BOXES: dict[str, tuple[float, float, float, float]] = {
    "right lung": (0.12, 0.16, 0.48, 0.74),
    "right upper lung zone": (0.14, 0.18, 0.47, 0.36),
    "right mid lung zone": (0.13, 0.36, 0.47, 0.54),
    "right lower lung zone": (0.12, 0.54, 0.47, 0.72),
    "right hilar structures": (0.32, 0.38, 0.46, 0.54),
    "right apical zone": (0.18, 0.14, 0.44, 0.26),
    "right costophrenic angle": (0.10, 0.62, 0.26, 0.78),
    "right hemidiaphragm": (0.12, 0.64, 0.48, 0.78),
    "left lung": (0.52, 0.16, 0.88, 0.76),
    "left upper lung zone": (0.53, 0.18, 0.86, 0.36),
    "left mid lung zone": (0.53, 0.36, 0.87, 0.54),
    "left lower lung zone": (0.53, 0.54, 0.88, 0.74),
    "left hilar structures": (0.54, 0.38, 0.68, 0.54),
    "left apical zone": (0.56, 0.14, 0.82, 0.26),
    "left costophrenic angle": (0.74, 0.64, 0.90, 0.80),
    "left hemidiaphragm": (0.52, 0.66, 0.88, 0.80),
    "trachea": (0.45, 0.04, 0.55, 0.38),
    "spine": (0.44, 0.02, 0.56, 0.98),
    "right clavicle": (0.14, 0.10, 0.48, 0.24),
    "left clavicle": (0.52, 0.10, 0.86, 0.24),
    "aortic arch": (0.52, 0.26, 0.62, 0.38),
    "mediastinum": (0.40, 0.18, 0.64, 0.76),
    "upper mediastinum": (0.42, 0.14, 0.58, 0.42),
    "svc": (0.40, 0.24, 0.47, 0.46),
    "cardiac silhouette": (0.39, 0.48, 0.75, 0.76),
    "cavoatrial junction": (0.40, 0.44, 0.48, 0.54),
    "right atrium": (0.38, 0.50, 0.48, 0.70),
    "carina": (0.45, 0.34, 0.55, 0.44),
    "abdomen": (0.08, 0.78, 0.92, 1.00),
}


def atlas_prior(regions: tuple[str, ...], side: int, floor: float = 0.0) -> torch.Tensor:
    """Attention logit biases [K, side²] for a side × side patch grid (row-major from the top-left): per region, the
    log of floor + (1 − floor)·(the patch cell's overlap with the region's box ÷ the best cell's overlap). A patch
    inside the box adds 0, one outside log(floor) (−inf at floor 0: never attended); the learnt attention decides
    within the box."""
    edges = torch.linspace(0, 1, side + 1, dtype=torch.float64)
    low, high = edges[:-1], edges[1:]
    rows = []
    for region in regions:
        x0, y0, x1, y1 = REGION_BOXES[region]
        width = (torch.minimum(high, torch.tensor(x1)) - torch.maximum(low, torch.tensor(x0))).clamp(min=0)
        height = (torch.minimum(high, torch.tensor(y1)) - torch.maximum(low, torch.tensor(y0))).clamp(min=0)
        overlap = torch.outer(height, width).flatten()  # [side²], row y, column x
        rows.append(torch.log(floor + (1 - floor) * overlap / overlap.max()))
    return torch.stack(rows).float()


class RegionBlock(nn.Module):
    """The paper's form: patches attend to a region's text feature (one key), then to each other, then an FFN."""

    def __init__(self, width: int, text_width: int, heads: int):
        super().__init__()
        self.norm_ca, self.norm_sa, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, kdim=text_width, vdim=text_width, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, patches: torch.Tensor, region_text: torch.Tensor) -> torch.Tensor:
        """patches [M, N, D], region_text [M, 1, E] (one region per row) → [M, N, D]."""
        x = patches
        x = self.cross(self.norm_ca(x), region_text, region_text, need_weights=False)[0] + x
        h = self.norm_sa(x)
        x = self.self_attn(h, h, h, need_weights=False)[0] + x
        return self.ffn(self.norm_ffn(x)) + x


class RegionQueryBlock(nn.Module):
    """Region tokens query the image's patches (several heads), then attend to each other, then an FFN."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_patches = nn.LayerNorm(width), nn.LayerNorm(width)
        self.norm_sa, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, regions: torch.Tensor, patches: torch.Tensor, with_attention: bool = False,
                prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """regions [B, K, D], patches [B, N, D] → (regions [B, K, D], with_attention: the head-mean attention over
        patches [B, K, N], else None; asking for it leaves PyTorch's fused attention path, so only figures do).
        prior: logit biases [K, N] added to every head's attention logits (region_prior 'atlas')."""
        keys = self.norm_patches(patches)
        attended, attention = self.cross(self.norm_q(regions), keys, keys, need_weights=with_attention,
                                         attn_mask=prior)
        x = regions + attended
        h = self.norm_sa(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x)), attention


class VisualExtractor(nn.Module):
    """Frozen CLIP features → [global, region_1..K] features of the image's width D."""

    def __init__(self, clip: ImageReportClip, num_regions: int, num_blocks: int, region_grid: int = 0,
                 region_attention: str = "region_query", region_prior: str = "none", region_prior_floor: float = 0.0):
        super().__init__()
        if not 1 <= num_regions <= len(REGIONS):
            raise ValueError(f"models.report_generator.num_regions must be 1..{len(REGIONS)}, got {num_regions}")
        if region_attention not in ("region_query", "paper"):
            raise ValueError(f"region_attention must be 'region_query' or 'paper', got {region_attention!r}")
        if region_prior not in ("none", "atlas") or (region_prior == "atlas" and region_attention != "region_query"):
            raise ValueError(f"region_prior must be 'none' or 'atlas' (atlas only with region_attention "
                             f"'region_query'), got {region_prior!r} with {region_attention!r}")
        self.region_grid, self.region_attention = region_grid, region_attention
        self.clip = clip.requires_grad_(False).eval()
        with torch.no_grad():  # the width of the patch features, and the region prompts (encoded once: they never change)
            count, width = clip.patch_tokens(torch.zeros(1, 1, clip.image_size, clip.image_size)).shape[1:]
            text = clip.encode_reports([REGION_PROMPTS[r] for r in REGIONS[:num_regions]])
        self.register_buffer("region_text", text, persistent=False)  # [K, E]
        heads = max(1, width // 64)
        if region_attention == "paper":
            self.blocks = nn.ModuleList(RegionBlock(width, text.shape[-1], heads) for _ in range(num_blocks))
        else:
            self.region_in = nn.Linear(text.shape[-1], width)  # region prompt → its query token
            self.blocks = nn.ModuleList(RegionQueryBlock(width, heads) for _ in range(num_blocks))
        self.width, self.num_regions, self.num_patches = width, num_regions, count
        side = int(round(count ** 0.5))
        if region_prior == "atlas" and side * side != count:
            raise ValueError(f"region_prior 'atlas' needs a square patch grid; the CLIP gives {count} patches")
        side = region_grid or side  # the grid the region blocks see
        self.register_buffer("region_prior", atlas_prior(REGIONS[:num_regions], side, region_prior_floor)
                             if region_prior == "atlas"
                             else None, persistent=False)  # [K, G²] attention logit biases, or None

    def _pooled(self, patches: torch.Tensor) -> torch.Tensor:
        if self.region_grid:  # average-pool the patch grid first (the paper's form costs K × a ViT pass)
            side = int(round(patches.shape[1] ** 0.5))
            grid = patches.transpose(1, 2).reshape(len(patches), -1, side, side)
            patches = F.adaptive_avg_pool2d(grid, self.region_grid).flatten(2).transpose(1, 2)
        return patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] in [0, 1] → [B, 1 + K, D]."""
        return self.features_and_attention(images, with_attention=False)[0]

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's patch tokens F_I [B, N, D], fp32 whatever the CLIP's dtype."""
        with torch.no_grad():
            return self.clip.patch_tokens(images).float()

    def features_and_attention(self, images: torch.Tensor, with_attention: bool = True,
                               patches: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, 1 + K, D] features, region_query with_attention: each region's attention over the patches [B, K, N]
        averaged over heads and blocks; else None, and always None for the paper's form, whose softmax over one
        key is constant). `patches`: the images' patch_tokens when the caller has them already."""
        patches = self.patch_tokens(images) if patches is None else patches  # [B, N, D]
        global_feature = patches.mean(dim=1, keepdim=True)
        patches = self._pooled(patches)
        batch, count, width = patches.shape
        k = self.num_regions
        if self.region_attention == "region_query":
            regions = self.region_in(self.region_text).unsqueeze(0).expand(batch, -1, -1)
            maps = []
            for block in self.blocks:
                regions, attention = block(regions, patches, with_attention, self.region_prior)
                maps.append(attention)
            features = torch.cat([global_feature, regions], dim=1)
            return features, torch.stack(maps).mean(dim=0) if with_attention else None
        x = patches.unsqueeze(1).expand(batch, k, count, width).reshape(batch * k, count, width)
        text = self.region_text.unsqueeze(0).expand(batch, k, -1).reshape(batch * k, 1, -1)
        for block in self.blocks:
            x = block(x, text)
        regions = x.mean(dim=1).view(batch, k, width)
        return torch.cat([global_feature, regions], dim=1), None


class ReportGenerator(nn.Module):
    """Images → visual prompts → decoder LM; plus the disease head on the visual features."""

    def __init__(self, clip: ImageReportClip, decoder: DecoderLM, num_regions: int, region_blocks: int,
                 vtrans_layers: int, instruction: str, max_new_tokens: int, region_grid: int = 0,
                 region_attention: str = "region_query", disease_prompt: str = "teacher_forced",
                 disease_unmentioned: str = "negative", disease_prompt_form: str = "tokens",
                 disease_head_input: str = "regions", disease_condition: str = "off", region_prior: str = "none",
                 region_prior_floor: float = 0.0, findings_guidance: float = 0.0, guidance_contrast: str = "findings"):
        super().__init__()
        self.extractor = VisualExtractor(clip, num_regions, region_blocks, region_grid, region_attention, region_prior,
                                         region_prior_floor)
        width = self.extractor.width
        layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.vtrans = nn.TransformerEncoder(layer, vtrans_layers, enable_nested_tensor=False)
        embeddings = decoder.model.get_input_embeddings().weight
        hidden, scale = embeddings.shape[1], float(embeddings.detach().float().std())
        # visual and disease prompts start at the scale of the decoder's word embeddings: a prompt 20× larger
        # than the words (a plain Linear on CLIP features) swamps the decoder; one much smaller is ignored
        self.project = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        nn.init.normal_(self.project[1].weight, std=scale / width ** 0.5)
        nn.init.zeros_(self.project[1].bias)
        self.visual_prompts = 1 + num_regions  # [global, regions]: the decoder's visual prompt tokens
        if disease_head_input not in ("regions", "patches"):
            raise ValueError(f"disease_head_input must be 'regions' or 'patches', got {disease_head_input!r}")
        self.head_reads_patches = disease_head_input == "patches"
        head_tokens = self.extractor.num_patches if self.head_reads_patches else self.visual_prompts
        self.disease_head = nn.Linear(head_tokens * width, len(CHEXPERT_OBSERVATIONS))
        # disease prompt: per observation, a "present" and an "absent" token mixed by the head's probability
        self.disease_prompt, self.disease_unmentioned = disease_prompt, disease_unmentioned
        self.decoder = decoder.model
        self.tokenizer = decoder.tokenizer
        self.disease_tokens = None  # the 'tokens' form's parameters; the 'words' form reads the decoder's embeddings
        if disease_prompt != "off" and disease_prompt_form == "tokens":
            self.disease_tokens = nn.Parameter(self._observation_word_embeddings())
        self.mask_absent_names = disease_prompt_form == "present_words"
        if disease_prompt != "off" and disease_prompt_form in ("words", "present_words"):
            ids, slots, states, owners = self._observation_words()
            self.register_buffer("disease_word_ids", ids, persistent=False)
            self.register_buffer("disease_state_ids", states, persistent=False)
            self.register_buffer("disease_slots", slots, persistent=False)
            self.register_buffer("disease_name_owner", owners, persistent=False)
        # the disease condition's vectors [2, 14, H] (present, absent), started at 0: the decoder as without them
        self.disease_condition = None
        if disease_condition == "every_token" and disease_prompt != "off":
            self.disease_condition = nn.Parameter(torch.zeros(2, len(CHEXPERT_OBSERVATIONS), hidden))
        # the head's operating point per observation, as a logit (present when logit ≥ it); 0 (p ≥ ½) until
        # fit_operating_points sets it from the training pairs at the end of each supervised epoch
        self.register_buffer("decision_logits", torch.zeros(len(CHEXPERT_OBSERVATIONS)))
        ids = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
        self.register_buffer("instruction_ids", torch.tensor(ids + [self.tokenizer.bos_token_id]), persistent=False)
        self.max_new_tokens = max_new_tokens
        if findings_guidance and disease_prompt == "off":
            raise ValueError("findings_guidance contrasts the disease prompt with a no-findings one; it needs "
                             "disease_prompt on")
        if guidance_contrast not in ("empty", "normal", "findings"):
            raise ValueError(f"guidance_contrast must be 'empty', 'normal' or 'findings', got {guidance_contrast!r}")
        self.guidance, self.contrast = findings_guidance, guidance_contrast
        # rows of one prompt stream: a generation prompt holds two with guidance (findings, then no findings)
        disease_rows = 0 if disease_prompt == "off" else (
            len(CHEXPERT_OBSERVATIONS) if self.disease_tokens is not None else len(self.disease_word_ids))
        self.prompt_rows = (self.visual_prompts + disease_rows + len(self.instruction_ids)
                            + (self.disease_condition is not None))

    @torch.no_grad()
    def _observation_word_embeddings(self) -> torch.Tensor:
        """Start of the disease tokens [2, 14, H]: e⁺_c = the mean word embedding of the observation's name
        ("pleural effusion"), e⁻_c = that of "no <name>". The decoder reads them as the words from the first step
        (random tokens took epochs before the decoder wrote a rare finding such as an effusion when told to)."""
        embed = self.decoder.get_input_embeddings()
        rows = []
        for phrase in ("{}", "no {}"):
            texts = [phrase.format(name.lower()) for name in CHEXPERT_OBSERVATIONS]
            ids = [torch.tensor(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            rows.append(torch.stack([embed(i.to(embed.weight.device)).mean(dim=0) for i in ids]))
        return torch.stack(rows)

    def _observation_words(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 'words' form's token ids "<name_1> · <name_2> · …" [L], the state slots · [14], the ids of the
        two state words [2] ('present', 'negative': one token each in the report vocabulary; two more then), and
        per token the observation whose name it spells (−1 on state slots) [L]."""
        states = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in ("present", "negative")]
        if any(len(ids) != 1 for ids in states):
            raise ValueError("disease_prompt_form 'words' needs 'present' and 'negative' to be one token each in the "
                             f"decoder's vocabulary (got {states}); use disease_prompt_form 'tokens'")
        ids, slots, owners = [], [], []
        for k, name in enumerate(CHEXPERT_OBSERVATIONS):
            name_ids = self.tokenizer(name.lower(), add_special_tokens=False)["input_ids"]
            ids += name_ids
            owners += [k] * len(name_ids)
            slots.append(len(ids))
            ids += states[0]
            owners.append(-1)
        return torch.tensor(ids), torch.tensor(slots), torch.tensor([s[0] for s in states]), torch.tensor(owners)

    def _disease_block(self, p: torch.Tensor) -> torch.Tensor:
        """Per-observation probabilities [B, 14, 1] → the disease prompt's embeddings [B, 14 or L, H]."""
        if self.disease_tokens is not None:
            return p * self.disease_tokens[0] + (1 - p) * self.disease_tokens[1]
        embed = self.decoder.get_input_embeddings()
        states = embed(self.disease_state_ids).float()  # [2, H]
        block = embed(self.disease_word_ids).float().unsqueeze(0).repeat(len(p), 1, 1)
        block[:, self.disease_slots] = p * states[0] + (1 - p) * states[1]
        if self.mask_absent_names:  # present_words: an absent observation's name reads 'negative'
            names = self.disease_name_owner >= 0
            q = p[:, self.disease_name_owner[names]]  # [B, n_name_tokens, 1]
            block[:, names] = q * block[:, names] + (1 - q) * states[1]
        return block

    # ------------------------------------------------------------------ features and prompts

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] → [B, V, D]: VTrans([global, regions]), the visual prompts' source (V = 1 + K), followed,
        with disease_head_input 'patches', by the frozen patch tokens the disease head reads (V = 1 + K + N)."""
        patches = self.extractor.patch_tokens(images)
        tokens = self.vtrans(self.extractor.features_and_attention(images, False, patches)[0])
        return torch.cat([tokens, patches], dim=1) if self.head_reads_patches else tokens

    @torch.no_grad()
    def frozen_prompts(self, images: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings without gradient, computed once per distinct image (groups repeat images)."""
        unique, inverse = torch.unique(images.flatten(1), dim=0, return_inverse=True)
        prompts = self.prompt_embeddings(self.visual_features(unique.view(-1, *images.shape[1:])))
        return prompts[inverse]

    def prompt_embeddings(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """[visual prompts, disease prompt (if on), instruction, BOS] as decoder input embeddings [B, P, H].

        The disease prompt mixes each observation's two tokens by the head's probability (detached: L_disease
        alone trains the head). With `labels` (the reference's codes) and disease_prompt 'teacher_forced', the
        reference's POSITIVE labels stand in for the probabilities: the supervised stage's teacher forcing; without
        labels that mode gives the head's decision at its operating point (1 or 0), the tokens the decoder was taught.
        With findings guidance, a prompt without labels (generation's) is two streams of prompt_rows rows each: the
        findings' prompt, then the same image's with the contrast's findings (guidance_contrast).
        """
        visual = self.project(features[:, :self.visual_prompts])
        if self.disease_prompt == "off":
            return self._prompt_stream(visual, None)
        if labels is not None and self.disease_prompt == "teacher_forced":
            p = (labels == Label.POSITIVE).float().unsqueeze(-1)  # [B, 14, 1]
            return self._prompt_stream(visual, p)
        logits = self.disease_logits(features).detach()
        if self.disease_prompt == "teacher_forced":  # the decoder learnt 0/1 tokens: the decision
            p = (logits >= self.decision_logits).float().unsqueeze(-1)
        else:
            p = torch.sigmoid(logits).unsqueeze(-1)
        if not self.guidance:
            return self._prompt_stream(visual, p)
        return torch.cat([self._prompt_stream(visual, p), self._prompt_stream(visual, self._contrast(p))], dim=1)

    def _contrast(self, p: torch.Tensor) -> torch.Tensor:
        """The findings [B, 14, 1] of findings guidance's contrast stream (ℓ_∅), from the image's own p."""
        contrast = torch.zeros_like(p)
        normal = CHEXPERT_OBSERVATIONS.index("No Finding")
        if self.contrast == "normal":
            contrast[:, normal] = 1.0
        elif self.contrast == "findings":
            contrast[:, normal] = p[:, normal]
        return contrast

    def _prompt_stream(self, visual: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """Projected visual prompts [B, 1 + K, H] and finding probabilities [B, 14, 1] (None: no disease prompt) →
        one prompt stream [B, prompt_rows, H]: [visual, disease prompt, instruction + BOS, condition row if on]."""
        parts = [visual]
        if p is not None:
            parts.append(self._disease_block(p))
        instruction = self.decoder.get_input_embeddings()(self.instruction_ids).float()
        parts.append(instruction.unsqueeze(0).expand(len(visual), -1, -1))
        if self.disease_condition is not None:  # the last row: the condition, split off before the decoder
            condition = p * self.disease_condition[0] + (1 - p) * self.disease_condition[1]  # [B, 14, H]
            parts.append(condition.sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1)  # fp32; cast to the decoder's dtype where it enters the decoder

    def _streams(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prompt embeddings [B, S·prompt_rows, H] (one stream, or two with guidance) → (the decoder's prompt rows
        [B + M, P, H], their disease conditions [B + M, H] or None, the M guided rows' indices or None). Rows
        B… hold the contrast stream of the M images whose findings stream differs from it: where the head's
        findings are the contrast's the two are equal and ℓ_f + γ·(ℓ_f − ℓ_∅) = ℓ_f, so their second pass is
        skipped."""
        streams = prompts.split(self.prompt_rows, dim=1)
        if len(streams) > 2 or streams[-1].shape[1] != self.prompt_rows:
            raise ValueError(f"prompt embeddings of {prompts.shape[1]} rows: expected {self.prompt_rows} (one stream) "
                             f"or {2 * self.prompt_rows} (findings guidance); build them with prompt_embeddings")
        guided = None
        if len(streams) == 2:
            guided = torch.nonzero((streams[0] != streams[1]).flatten(1).any(dim=1)).squeeze(1)
            rows = torch.cat([streams[0], streams[1][guided]], dim=0)
        else:
            rows = streams[0]
        if self.disease_condition is None:
            return rows, None, guided
        return rows[:, :-1], rows[:, -1], guided

    def _guided(self, logits: torch.Tensor, guided: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits of _streams' rows [B + M, …] → the policy's [B, …]: the findings stream's own, and
        ℓ_f + γ·(ℓ_f − ℓ_∅) on the guided rows."""
        if guided is None:
            return logits
        findings, no_findings = logits[:len(logits) - len(guided)], logits[len(logits) - len(guided):]
        return findings.index_add(0, guided, self.guidance * (findings[guided] - no_findings))

    @contextmanager
    def _conditioned(self, condition: torch.Tensor | None):
        """While open, the decoder's word embedding adds `condition` [B, H] to every token it embeds: what a
        report token's input is during generation (the prompt itself enters as embeddings, not through it)."""
        if condition is None:
            yield
            return
        def add(module, inputs, output):
            return output + condition.unsqueeze(1).to(output.dtype)
        handle = self.decoder.get_input_embeddings().register_forward_hook(add)
        try:
            yield
        finally:
            handle.remove()

    @property
    def decoder_dtype(self) -> torch.dtype:
        return self.decoder.get_input_embeddings().weight.dtype

    @torch.no_grad()
    def fit_operating_points(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set each observation's decision threshold to the logit that maximises F1 of POSITIVE against the rest
        on the given pairs (the training pairs' head logits [N, 14] and labels [N, 14]); uncertain labels are left
        out. An observation without a positive keeps 0 (p ≥ ½). Rare findings are why: with 4.5 % effusions the
        head's p stays below ½ on most true effusions, and its F1 at ½ swung between 0.6 and 0 from one epoch to
        the next in the embedded world. Returns the thresholds [14]."""
        thresholds = torch.zeros(logits.shape[1])
        for c in range(logits.shape[1]):
            known = labels[:, c] != Label.UNCERTAIN
            scores, truth = logits[known, c].float().cpu(), (labels[known, c] == Label.POSITIVE).cpu()
            if not truth.any():
                continue
            order = torch.argsort(scores, descending=True)
            hits = truth[order].float().cumsum(0)  # predicting the top k as present: hits, k predicted
            f1 = 2 * hits / (torch.arange(1, len(order) + 1) + truth.sum())
            best = int(torch.argmax(f1))
            # halfway to the next score down, so the chosen top k (and no more) clear the threshold
            below = scores[order[best + 1]] if best + 1 < len(order) else scores[order[best]] - 1
            thresholds[c] = (scores[order[best]] + below) / 2
        self.decision_logits.copy_(thresholds.to(self.decision_logits.device))
        return thresholds

    def disease_logits(self, features: torch.Tensor) -> torch.Tensor:
        """visual_features [B, V, D] → [B, 14] logits of the CheXpert observations."""
        inputs = features[:, self.visual_prompts:] if self.head_reads_patches else features
        return self.disease_head(inputs.flatten(1))

    @torch.no_grad()
    def disease_decisions(self, images: torch.Tensor) -> torch.Tensor:
        """The head's present/absent decision per observation at its operating points, [B, 1, H, W] → bool [B, 14]:
        what a teacher-forced disease prompt tells the decoder."""
        return self.disease_logits(self.visual_features(images)) >= self.decision_logits

    # ------------------------------------------------------------------ text

    def encode_reports(self, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report texts → (token ids [B, T] ending in EOS, padded; mask [B, T]); BOS is part of the prompt."""
        if any(not r.strip() for r in reports):
            raise ValueError("an empty report text reached the report generator; drop empty reports from the data")
        encoded = self.tokenizer(reports, add_special_tokens=False, truncation=True,
                                 max_length=self.max_new_tokens - 1)["input_ids"]
        rows = [ids + [self.tokenizer.eos_token_id] for ids in encoded]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1.0
        device = self.instruction_ids.device
        return tokens.to(device), mask.to(device)

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        """Generated ids (EOS and padding masked or dropped) → report texts."""
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode([t for t, m in zip(row.tolist(), keep.tolist()) if m and t != eos],
                                      skip_special_tokens=True).strip()
                for row, keep in zip(tokens, mask)]

    def token_log_probs(self, prompts: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                        with_entropy: bool = False, temperature: float = 1.0
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """log p(token_t | prompt, tokens_<t) for every report token, teacher-forced → [B, T] (0 where masked);
        with_entropy: also the entropy of each position's next-token distribution [B, T] (not masked). At
        `temperature` T: the distribution softmax(logits / T) that `generate` samples at T."""
        logits = self.report_logits(prompts, tokens, mask) / temperature
        all_log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = all_log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
        if with_entropy:
            return log_probs, -(all_log_probs.exp() * all_log_probs).sum(dim=-1).detach()
        return log_probs

    def report_logits(self, prompts: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The policy's next-token logits at every report position, teacher-forced → [B, T, V] fp32 (guided
        when the prompt carries the no-findings stream)."""
        rows, condition, guided = self._streams(prompts)
        if guided is not None:
            tokens, mask = torch.cat([tokens, tokens[guided]]), torch.cat([mask, mask[guided]])
        with self._conditioned(condition):
            words = self.decoder.get_input_embeddings()(tokens)
        embeddings = torch.cat([rows.to(self.decoder_dtype), words], dim=1)
        attention = torch.cat([torch.ones(rows.shape[:2], device=mask.device), mask], dim=1)
        logits = self.decoder(inputs_embeds=embeddings, attention_mask=attention).logits
        # the logit at position p predicts position p + 1: the report's tokens are predicted from P − 1 on
        return self._guided(logits[:, rows.shape[1] - 1:-1].float(), guided)

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, greedy: bool, generator_seed: int | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """From prompt embeddings [B, P, H]: sample (at `temperature`, 1 by default; no top-k/top-p: the policy's
        own distribution) or greedy-decode reports. Returns (tokens [B, T], mask [B, T]); the mask covers
        the report and its EOS."""
        if generator_seed is not None:
            torch.manual_seed(generator_seed)  # transformers' sampler draws from the global generator
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows, condition, guided = self._streams(prompts)
        if guided is not None and len(guided):
            tokens = self._generate_guided(rows, condition, guided, greedy, temperature)
        else:  # with inputs_embeds only, transformers returns just the new tokens
            with self._conditioned(condition):
                tokens = self.decoder.generate(
                    inputs_embeds=rows.to(self.decoder_dtype),
                    attention_mask=torch.ones(rows.shape[:2], dtype=torch.long, device=rows.device),
                    max_new_tokens=self.max_new_tokens, do_sample=not greedy, top_k=None, top_p=None,
                    temperature=None if greedy or temperature == 1.0 else temperature,
                    num_beams=1, eos_token_id=eos, pad_token_id=pad, bos_token_id=self.tokenizer.bos_token_id,
                )
        ended = (tokens == eos).long()
        after_eos = (ended.cumsum(dim=1) - ended) > 0  # positions after the first EOS
        mask = (~after_eos).float()
        tokens = tokens.masked_fill(after_eos, pad)
        return tokens, mask

    def _generate_guided(self, rows: torch.Tensor, condition: torch.Tensor | None, guided: torch.Tensor,
                         greedy: bool, temperature: float) -> torch.Tensor:
        """Findings guidance's decoding: _streams' rows [B + M, P, H] step as one batch through the decoder's KV
        cache, and each image's token, drawn from the guided logits as transformers' sampler draws (softmax,
        multinomial on the global generator) or taken greedily, is fed to its findings row and its no-findings row
        alike. transformers' generate samples each row alone, which cannot share a token between two rows. Returns
        the new tokens [B, T], padding after EOS."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        embed = self.decoder.get_input_embeddings()
        attention = torch.ones(rows.shape[:2], dtype=torch.long, device=rows.device)
        inputs, cache, chosen = rows.to(self.decoder_dtype), None, []
        done = torch.zeros(len(rows) - len(guided), dtype=torch.bool, device=rows.device)
        for _ in range(self.max_new_tokens):
            out = self.decoder(inputs_embeds=inputs, attention_mask=attention, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, self._guided(out.logits[:, -1].float(), guided)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1).squeeze(1)
            token = token.masked_fill(done, pad)
            chosen.append(token)
            done |= token == eos
            if done.all():
                break
            with self._conditioned(condition):
                inputs = embed(torch.cat([token, token[guided]]).unsqueeze(1))
            attention = torch.cat([attention, attention.new_ones(len(attention), 1)], dim=1)
        return torch.stack(chosen, dim=1)

    def greedy_reports(self, images: torch.Tensor) -> list[str]:
        """Greedy-decoded report texts of images [B, 1, H, W] (evaluation)."""
        return self.decode(*self.generate(self.frozen_prompts(images), greedy=True))

    # ------------------------------------------------------------------ supervised loss

    @torch.no_grad()
    def report_nll(self, images: torch.Tensor, reports: list[str]) -> torch.Tensor:
        """Mean token negative log-likelihood of each report given its image → [B] (teacher-forced), under the
        findings stream (the head's decisions in the prompt): the likelihood the supervised stage fits. Findings
        guidance reshapes what is generated from it, not this loss."""
        tokens, mask = self.encode_reports(reports)
        prompts = self.prompt_embeddings(self.visual_features(images))[:, :self.prompt_rows]
        log_probs = self.token_log_probs(prompts, tokens, mask)
        return -log_probs.sum(dim=1) / mask.sum(dim=1)

    def supervised_loss(self, images: torch.Tensor, reports: list[str], labels: torch.Tensor,
                        disease_weight: float, pos_weight: torch.Tensor | None = None,
                        drop_visual: torch.Tensor | None = None, flip: torch.Tensor | None = None,
                        counterfactual_weight: float = 0.0, counterfactual_margin: float = 0.0
                        ) -> tuple[torch.Tensor, dict[str, float]]:
        """L = L_report (token cross-entropy) + λ · L_disease (BCE; uncertain / unmentioned labels masked; a
        positive label's term weighted by pos_weight [14], see disease_pos_weights) + μ · L_counterfactual.
        Rows where drop_visual (bool [B]) is set see zeros for their visual prompts in L_report
        (visual_prompt_dropout). With `flip` (one observation per row [B], see counterfactual_observations) and
        μ = counterfactual_weight > 0, each report is also scored under its teacher-forced prompt with that
        observation's state flipped, and L_counterfactual = mean over rows of max(0, m − (log p(report | prompt) −
        log p(report | flipped prompt))), m = counterfactual_margin nats per report: the report must be more likely
        under the findings it states than under a prompt that contradicts one of them."""
        features = self.visual_features(images)
        tokens, mask = self.encode_reports(reports)
        prompts = self.prompt_embeddings(features, labels)
        counterfactual = flip is not None and counterfactual_weight > 0
        if counterfactual:  # one decoder pass over [prompts; flipped prompts]
            prompts = torch.cat([prompts, self.prompt_embeddings(features, flipped_labels(labels, flip))])
            tokens, mask = tokens.repeat(2, 1), mask.repeat(2, 1)
            drop_visual = None if drop_visual is None else drop_visual.repeat(2)
        if drop_visual is not None:  # the first 1 + K prompt rows are the projected visual features
            keep = (~drop_visual).to(prompts.dtype).view(-1, 1, 1)
            visual = self.visual_prompts
            prompts = torch.cat([prompts[:, :visual] * keep, prompts[:, visual:]], dim=1)
        log_probs = self.token_log_probs(prompts, tokens, mask)
        parts = {}
        if counterfactual:
            rows = len(labels)
            gap = (log_probs[:rows] - log_probs[rows:]).sum(dim=1)  # nats per report
            counterfactual_loss = F.relu(counterfactual_margin - gap).mean()
            parts = {"counterfactual": float(counterfactual_loss.detach()),
                     "counterfactual_gap": float(gap.detach().mean())}
            log_probs, mask = log_probs[:rows], mask[:rows]
        report_loss = -log_probs.sum() / mask.sum()
        # labels: CheXpert codes; POSITIVE → 1, NEGATIVE → 0, UNCERTAIN left out of L_disease, NOT_MENTIONED → 0
        # (disease_unmentioned 'negative', the default) or left out ('ignore')
        known = (labels == Label.POSITIVE) | (labels == Label.NEGATIVE)
        if self.disease_unmentioned == "negative":
            known |= labels == Label.NOT_MENTIONED
        bce = F.binary_cross_entropy_with_logits(self.disease_logits(features), (labels == Label.POSITIVE).float(),
                                                 reduction="none", pos_weight=pos_weight)
        disease_loss = (bce * known).sum() / known.sum().clamp(min=1)
        loss = report_loss + disease_weight * disease_loss
        if counterfactual:
            loss = loss + counterfactual_weight * counterfactual_loss
        return loss, {"report": float(report_loss.detach()), "disease": float(disease_loss.detach()), **parts}


def counterfactual_observations(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row of reference labels [B, 14], the observation whose prompt state L_counterfactual flips [B]: one
    of the report's POSITIVE findings other than No Finding, drawn uniformly (its prompt then says absent); for a
    report without one, any observation but No Finding, drawn uniformly (its prompt then says present)."""
    findings = torch.ones(labels.shape[1], dtype=torch.bool)
    findings[CHEXPERT_OBSERVATIONS.index("No Finding")] = False
    positive = (labels.cpu() == Label.POSITIVE) & findings
    weights = torch.where(positive.any(dim=1, keepdim=True), positive, findings.expand_as(positive)).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(labels.device)


def flipped_labels(labels: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Labels [B, 14] with observation flip[i] of row i flipped: POSITIVE → NEGATIVE, anything else → POSITIVE
    (what the teacher-forced prompt reads: present or not)."""
    flipped = labels.clone()
    rows = torch.arange(len(labels), device=labels.device)
    was_positive = labels[rows, flip] == Label.POSITIVE
    flipped[rows, flip] = torch.where(was_positive, int(Label.NEGATIVE), int(Label.POSITIVE)).to(labels.dtype)
    return flipped


class ReportPolicy(nn.Module):
    """The report generator through its two stages, with the RL LoRA and its reference (adapters off)."""

    def __init__(self, generator: ReportGenerator, cfg: ExperimentConfig):
        super().__init__()
        self.generator = generator
        self.cfg = cfg
        self.stage = "supervised"
        self.low_precision = PRECISIONS[cfg.models.report_generator.precision]
        if self.low_precision != torch.float32:  # the frozen CLIP is stored and run in bf16
            nn.Module.to(generator.extractor.clip, self.low_precision)
        if cfg.models.report_generator.supervised_decoder == "lora":
            self._freeze_decoder_precision()
            generator.decoder = self._with_lora(generator.decoder)  # adapters in fp32 (peft's autocast)

    def _freeze_decoder_precision(self) -> None:
        """Store the (frozen) decoder in the configured precision, before a LoRA goes on it."""
        if self.low_precision != torch.float32:
            self.generator.decoder.to(self.low_precision)

    def _with_lora(self, decoder: nn.Module) -> nn.Module:
        """The decoder wrapped in a fresh LoRA (learner.lora_rank / lora_alpha on decoder_lora_targets)."""
        learner = self.cfg.learner
        lora = LoraConfig(r=learner.lora_rank, lora_alpha=learner.lora_alpha, lora_dropout=0.0,
                          target_modules=list(self.cfg.models.report_generator.decoder_lora_targets),
                          init_lora_weights=True)
        with warnings.catch_warnings():  # peft probes transformers' deprecated is_gradient_checkpointing: not ours
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(decoder, lora)

    def _supervised_named(self) -> dict[str, torch.Tensor]:
        named = {n: p for n, p in self.generator.named_parameters()
                 if p.requires_grad and not n.startswith("extractor.clip")}
        named["decision_logits"] = self.generator.decision_logits  # set from the data, not by the optimizer
        return named

    def supervised_parameters(self) -> list[nn.Parameter]:
        """What the supervised stage trains (frozen CLIP excluded)."""
        return [p for p in self._supervised_named().values() if isinstance(p, nn.Parameter)]

    def supervised_state(self) -> dict[str, torch.Tensor]:
        """The tensors the supervised stage trained, by name (broadcast once when the stage ends)."""
        return {n: p.detach() for n, p in self._supervised_named().items()}

    def load_supervised_state(self, state: dict) -> None:
        """Install supervised-stage tensors (numpy or torch, by `supervised_state` name)."""
        copy_named_tensors(self.generator, state, set(self.supervised_state()),
                           "supervised state does not match this model (different config?)")

    @torch.no_grad()
    def start_rl(self, supervised: dict | None = None) -> None:
        """Install the supervised tensors (if given), merge a supervised LoRA, freeze all, add the RL LoRA."""
        if self.stage == "rl":
            raise RuntimeError("the RL stage has already started")
        if supervised is not None:
            self.load_supervised_state(supervised)
        if self.cfg.models.report_generator.supervised_decoder == "lora":
            self.generator.decoder = self.generator.decoder.merge_and_unload()
        self.generator.requires_grad_(False)
        self._freeze_decoder_precision()
        self.generator.decoder = self._with_lora(self.generator.decoder)
        self.stage = "rl"

    def rl_parameters(self) -> list[nn.Parameter]:
        """The RL LoRA matrices: the only tensors CQRL trains."""
        return [p for n, p in self.generator.decoder.named_parameters() if "lora_" in n]

    def rl_state(self) -> dict[str, torch.Tensor]:
        """The RL LoRA tensors by name: what the learner broadcasts each version."""
        return {n: p.detach() for n, p in self.generator.decoder.named_parameters() if "lora_" in n}

    def load_rl_state(self, state: dict) -> None:
        """Install one version of the RL LoRA tensors (numpy or torch, by `rl_state` name)."""
        copy_named_tensors(self.generator.decoder, state, set(self.rl_state()),
                           "RL LoRA does not match this model (different config?)")

    @contextmanager
    def reference(self):
        """The frozen reference G_ref: the supervised model (RL LoRA disabled)."""
        with self.generator.decoder.disable_adapter():
            yield


def disease_pos_weights(labels: np.ndarray, form: str, unmentioned: str = "negative") -> np.ndarray | None:
    """Per observation, the weight of a positive label in L_disease (disease_pos_weight): None for 'none', else
    sqrt(n_negative / n_positive) ('sqrt') or n_negative / n_positive ('ratio') over the training labels [N, 14],
    the negatives counted as L_disease counts them (NOT_MENTIONED too unless `unmentioned` is 'ignore'); 1 for an
    observation without positives or negatives."""
    if form == "none":
        return None
    positive = (labels == Label.POSITIVE).sum(axis=0)
    negative = (labels == Label.NEGATIVE).sum(axis=0)
    if unmentioned == "negative":
        negative = negative + (labels == Label.NOT_MENTIONED).sum(axis=0)
    ratio = np.where((positive > 0) & (negative > 0), negative / np.maximum(positive, 1), 1.0)
    return np.sqrt(ratio) if form == "sqrt" else ratio


def build_report_generator(cfg: ExperimentConfig) -> ReportGenerator:
    """The config's report generator: its CLIP and decoder LM as the config names them, new extractor and prompts."""
    rg = cfg.models.report_generator
    return ReportGenerator(build_clip(cfg.models.clip), build_decoder(rg), rg.num_regions, rg.region_blocks,
                           rg.vtrans_layers, rg.instruction, rg.max_new_tokens, rg.region_grid,
                           rg.region_attention, rg.disease_prompt, rg.disease_unmentioned, rg.disease_prompt_form,
                           rg.disease_head_input, rg.disease_condition, rg.region_prior, rg.region_prior_floor,
                           rg.findings_guidance, rg.guidance_contrast)


def build_report_policy(cfg: ExperimentConfig, device: str) -> ReportPolicy:
    """The config's report generator (seeded: every copy starts identical), in its supervised stage."""
    torch.manual_seed(cfg.seed)
    return ReportPolicy(build_report_generator(cfg), cfg).to(device)
