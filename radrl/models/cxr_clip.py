"""The released CXR-CLIP checkpoints (kakaobrain/cxr-clip) as the consistency reward's CLIP, loaded as they are.

A release file (`r50_mc.tar`, …) is a torch checkpoint {"model": state dict, "config": training config}:
    image_encoder.resnet.*        torchvision ResNet-50 without its fc (2048-d pooled features)
    text_encoder.text_encoder.*   a Hugging Face BertModel (Bio_ClinicalBERT)
    image_projection.projection.* / text_projection.projection.*   linear heads to 512-d
The text feature is the last hidden state at the final attended token ("eos" pooling: [SEP] for BERT). Images are
resized and centre-cropped to base.image_size (224), replicated to RGB and ImageNet-normalised. BERT's config and
tokenizer are not in the release: they come from a Bio_ClinicalBERT folder or hub id (`models.clip.text_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50
from transformers import AutoConfig, AutoTokenizer, BertModel

from radrl.models.weights import MissingWeightsError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CXRClip(nn.Module):
    """CXR-CLIP (ResNet-50 + BERT, linear projections) with ImageReportClip's interface: grayscale images in [0, 1]
    and report strings → unit-norm embeddings."""

    def __init__(self, bert: BertModel, tokenizer, projection_dim: int, image_size: int = 224,
                 text_max_length: int = 256, pooling: str = "eos"):
        super().__init__()
        if pooling not in ("eos", "bos", "mean"):
            raise ValueError(f"CXR-CLIP text pooling {pooling!r}: expected eos, bos or mean")
        self.image_encoder = resnet50(weights=None)
        del self.image_encoder.fc
        self.text_encoder = bert
        self.image_projection = nn.Linear(2048, projection_dim)
        self.text_projection = nn.Linear(bert.config.hidden_size, projection_dim)
        self.tokenizer, self.image_size, self.text_max_length, self.pooling = tokenizer, image_size, text_max_length, pooling
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def load_release_state(self, state: dict[str, torch.Tensor]) -> None:
        """Install a release's state dict (its own names), refusing one of another layout."""
        renamed = {}
        for key, value in state.items():
            for theirs, ours in (("image_encoder.resnet.", "image_encoder."), ("text_encoder.text_encoder.",
                                                                               "text_encoder."),
                                 ("image_projection.projection.", "image_projection."),
                                 ("text_projection.projection.", "text_projection.")):
                if key.startswith(theirs):
                    renamed[ours + key.removeprefix(theirs)] = value
        missing, _ = self.load_state_dict(renamed, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or not renamed:
            raise MissingWeightsError(f"not a CXR-CLIP ResNet-50 checkpoint: {len(missing)} tensors missing "
                                      f"(e.g. {missing[:3]}); expected image_encoder.resnet.*, "
                                      "text_encoder.text_encoder.*, image_projection.projection.*, "
                                      "text_projection.projection.*")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W] in [0, 1] → [B, D], L2-normalised."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True) \
            if images.shape[-1] != self.image_size else images
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        net = self.image_encoder
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return F.normalize(self.image_projection(torch.flatten(net.avgpool(x), 1)), dim=-1)

    def encode_reports(self, reports: list[str]) -> torch.Tensor:
        """Report texts → [B, D], L2-normalised."""
        tokens = self.tokenizer(list(reports), padding="longest", truncation=True, max_length=self.text_max_length,
                                return_tensors="pt").to(self.mean.device)
        hidden = self.text_encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"]
        if self.pooling == "eos":
            features = hidden[torch.arange(len(hidden)), mask.sum(dim=-1) - 1]
        elif self.pooling == "bos":
            features = hidden[:, 0]
        else:
            features = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_projection(features), dim=-1)


def load_cxr_clip(path: str | Path, text_model: str | None) -> CXRClip:
    """A CXR-CLIP release file, with BERT's config and tokenizer from `text_model` (a Bio_ClinicalBERT folder or hub
    id in the local cache)."""
    path = Path(path).expanduser()
    if text_model is None:
        raise MissingWeightsError("models.clip.text_model is not set: a CXR-CLIP release holds no BERT config or "
                                  "tokenizer; point it at a Bio_ClinicalBERT folder (emilyalsentzer/Bio_ClinicalBERT)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as error:
        raise MissingWeightsError(f"models.clip.weights: cannot read the CXR-CLIP checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise MissingWeightsError(f"{path} is not a CXR-CLIP release file (expected a dict with 'model' and 'config')")
    config = checkpoint.get("config") or {}
    model_cfg, base = config.get("model", {}), config.get("base", {})
    if model_cfg.get("image_encoder", {}).get("name", "resnet") != "resnet":
        raise MissingWeightsError(f"{path}: only CXR-CLIP's ResNet-50 image encoder is supported, not "
                                  f"{model_cfg['image_encoder'].get('name')!r}")
    if model_cfg.get("projection_head", {}).get("name", "linear") != "linear":
        raise MissingWeightsError(f"{path}: only CXR-CLIP's linear projection head is supported")
    try:
        bert = BertModel(AutoConfig.from_pretrained(text_model), add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(text_model)
    except OSError as error:
        raise MissingWeightsError(f"models.clip.text_model '{text_model}': {error}") from error
    state = checkpoint["model"]
    model = CXRClip(bert, tokenizer, state["image_projection.projection.weight"].shape[0]
                    if "image_projection.projection.weight" in state else 512,
                    int(base.get("image_size", 224)), int(base.get("text_max_length", 256)),
                    model_cfg.get("text_encoder", {}).get("pooling", "eos"))
    model.load_release_state(state)
    return model.eval()
