"""The image–report CLIP of CXRL's r_consist (and LM-RRG's visual/text encoders), via open_clip.

Every source is an open_clip model folder (`open_clip_config.json` + weights, plus tokenizer
files when the text tower uses an HF tokenizer), loaded with open_clip's own `local-dir:` /
`hf-hub:` schemes: BiomedCLIP's hub layout, or the shipped tiny model. A released CXR-CLIP checkpoint
(ResNet-50 + Bio_ClinicalBERT) loads as it is through `radrl.models.cxr_clip`.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from radrl.config import EMBEDDED, RANDOM, ClipConfig
from radrl.models.tokenizer import EOS_ID, PAD_ID
from radrl.models.weights import MissingWeightsError, embedded_path, looks_like_hub_id


def tiny_clip_config(vocab_size: int, image_size: int = 32) -> dict:
    """open_clip model_cfg of a small ViT + text transformer CLIP over the report tokenizer."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": image_size, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
        "text_cfg": {
            "context_length": 77, "vocab_size": vocab_size, "width": 128, "heads": 4, "layers": 3,
            # open_clip reads the tokenizer files from the model folder when this is set (local-dir:).
            "hf_tokenizer_name": "radrl-report-tokenizer",
            "pad_id": PAD_ID, "eos_id": EOS_ID, "pool_type": "eos",
        },
    }


# Real-size architectures for random-weight builds (the pretrained ones come from their folders).
REAL_CONFIGS = {
    # BiomedCLIP's image tower (ViT-B/16, 224 px, 512-d); the text tower here is open_clip's
    # transformer because PubMedBERT's config itself would have to come from the hub.
    "biomedclip": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                   "text_cfg": {"context_length": 256, "vocab_size": 30522, "width": 512, "heads": 8, "layers": 12}},
    # CXR-CLIP's ResNet-50 image tower.
    "cxr_clip": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
                 "text_cfg": {"context_length": 77, "vocab_size": 30522, "width": 512, "heads": 8, "layers": 12}},
}


class ImageReportClip(nn.Module):
    """Grayscale images in [0, 1] and report strings → unit-norm embeddings in one space."""

    def __init__(self, model: open_clip.CLIP, tokenizer, mean: tuple, std: tuple):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = _image_size(model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        images = (images.expand(-1, 3, -1, -1) - self.mean) / self.std  # RGB towers see a gray image
        return images.to(self.model.logit_scale.dtype)  # the towers' storage dtype (bf16 with precision=bf16)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] in [0, 1] → [B, D], L2-normalised."""
        return F.normalize(self.model.encode_image(self._prepare(images)), dim=-1)

    def encode_reports(self, reports: list[str]) -> torch.Tensor:
        """Report texts → [B, D], L2-normalised."""
        tokens = self.tokenizer(reports).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ViT patch features F_I [B, N, width] (before the projection), for the report generator."""
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # a timm tower (BiomedCLIP): its features minus the class/prefix tokens
            return visual.trunk.forward_features(self._prepare(images))[:, visual.trunk.num_prefix_tokens:]
        if not hasattr(visual, "output_tokens"):
            raise ValueError(f"the CLIP image tower {type(visual).__name__} gives no patch tokens; "
                             "the report generator needs a ViT tower (e.g. BiomedCLIP)")
        visual.output_tokens = True
        try:
            _, tokens = visual(self._prepare(images))
        finally:
            visual.output_tokens = False
        return tokens

    def save(self, folder: Path, model_cfg: dict, tokenizer_folder: Path | None = None) -> None:
        """Write an open_clip local-dir folder that `build_clip` (and open_clip itself) reads back."""
        folder.mkdir(parents=True, exist_ok=True)
        preprocess = {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
        state = {k: v.half().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "open_clip_model.safetensors"))
        if tokenizer_folder is not None:
            for file in tokenizer_folder.iterdir():
                (folder / file.name).write_bytes(file.read_bytes())


def _image_size(model: open_clip.CLIP) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, tuple | list) else int(size)


def from_model_cfg(model_cfg: dict, tokenizer) -> ImageReportClip:
    """A randomly initialised CLIP from an open_clip model_cfg dict."""
    model = open_clip.CLIP(**model_cfg)
    return ImageReportClip(model, tokenizer, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def load_clip(source: str) -> ImageReportClip:
    """Load an open_clip folder (local path) or 'hf-hub:org/name' (from the local HF cache only)."""
    if Path(source).expanduser().is_dir():
        folder = Path(source).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise MissingWeightsError(f"models.clip.weights: {folder} has no open_clip_config.json; "
                                      "expected an open_clip model folder (open_clip_config.json + weights)")
        name = f"local-dir:{folder}"
    elif source.startswith("hf-hub:") or looks_like_hub_id(source):
        name = source if source.startswith("hf-hub:") else f"hf-hub:{source}"
    else:
        raise MissingWeightsError(
            f"models.clip.weights: '{source}' does not exist. Give an open_clip model folder (e.g. BiomedCLIP "
            "downloaded where you have access), or 'embedded' for the shipped tiny CLIP"
        )
    try:
        model = open_clip.create_model(name)
    except (OSError, RuntimeError) as error:
        raise MissingWeightsError(f"could not load the CLIP '{source}': {error}") from error
    preprocess = model.visual.preprocess_cfg  # set by open_clip from the folder's preprocess_cfg
    return ImageReportClip(model, open_clip.get_tokenizer(name), tuple(preprocess["mean"]), tuple(preprocess["std"])).eval()


def build_clip(cfg: ClipConfig) -> ImageReportClip:
    """Build the CLIP the config names."""
    if cfg.weights == RANDOM:
        tokenizer_folder = embedded_path("tokenizer")
        tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_folder), context_length=77)
        if cfg.arch == "tiny":
            return from_model_cfg(tiny_clip_config(len(tokenizer.tokenizer)), tokenizer)
        real = REAL_CONFIGS[cfg.arch]
        tokenizer = open_clip.tokenizer.HFTokenizer(str(tokenizer_folder), context_length=real["text_cfg"]["context_length"])
        return from_model_cfg(real, tokenizer)
    source = str(embedded_path("clip")) if cfg.weights == EMBEDDED else cfg.weights
    if cfg.arch == "cxr_clip" and Path(source).expanduser().is_file():  # a release file, not an open_clip folder
        from radrl.models.cxr_clip import load_cxr_clip

        return load_cxr_clip(source, cfg.text_model)
    return load_clip(source)
