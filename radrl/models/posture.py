"""The posture regressor of CXRL's r_align: a ResNet-18 predicting the affine warp ψ of a radiograph.

ψ = (s_x, s_y, t_x, t_y, Θ) is the posture the image was taken in (see
`radrl.data.phantom.posture_matrix`); warping the image by M(ψ)⁻¹ brings it back onto the
canonical upright chest. The paper trains the regressor with an L2 loss between that warped
image and the canonical image, with no posture labels; `alignment_loss` is that loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from radrl.config import EMBEDDED, RANDOM, PostureModelConfig
from radrl.data.phantom import posture_matrix
from radrl.models.weights import embedded_path, load_state, local_path

# ψ of an upright image; the network predicts bounded offsets from it, so a fresh head starts
# upright and the unsupervised alignment loss cannot run off to degenerate warps (e.g. zooming
# into a flat region), which it did in one of two seeds without the bound.
UPRIGHT = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
MAX_OFFSET = torch.tensor([0.5, 0.5, 0.5, 0.5, torch.pi / 4])  # scale ±0.5, shift ±0.5, rotation ±45°
BLOCKS = {"tiny": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}


class PostureRegressor(nn.Module):
    """Grayscale image [B, 1, H, W] in [0, 1] → ψ [B, 5] = (s_x, s_y, t_x, t_y, Θ)."""

    def __init__(self, arch: str = "resnet18"):
        super().__init__()
        self.arch = arch
        self.backbone = ResNet(BasicBlock, BLOCKS[arch], num_classes=5)  # torchvision's ResNet-18 (or 1 block per stage)
        self.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # grayscale input
        nn.init.zeros_(self.backbone.fc.weight)
        nn.init.zeros_(self.backbone.fc.bias)
        self.register_buffer("upright", UPRIGHT.clone(), persistent=False)
        self.register_buffer("max_offset", MAX_OFFSET.clone(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.upright + self.max_offset * torch.tanh(self.backbone(images * 2 - 1))


def r_align(posture: torch.Tensor) -> torch.Tensor:
    """CXRL Eq.: r_align(ψ) = −( max(|s_x−1|, |s_y−1|) + |Θ|/(2π) + sqrt(t_x² + t_y²) ), [B, 5] → [B]."""
    s_x, s_y, t_x, t_y, theta = posture.unbind(dim=-1)
    scale = torch.maximum((s_x - 1).abs(), (s_y - 1).abs())
    # clamped below at 1e-30 so that the gradient at t = 0 is 0, not NaN (reward backpropagation); every value
    # above it is sqrt(t_x² + t_y²) to the last bit, as before
    return -(scale + theta.abs() / (2 * torch.pi) + torch.sqrt((t_x**2 + t_y**2).clamp_min(1e-30)))


def align_to_canonical(images: torch.Tensor, posture: torch.Tensor) -> torch.Tensor:
    """Undo the posture: warp each image by M(ψ)⁻¹ (differentiable in ψ)."""
    matrix = posture_matrix(posture)  # [B, 2, 3]: upright coordinates of each output pixel
    linear, shift = matrix[:, :, :2], matrix[:, :, 2:]
    inverse = torch.linalg.inv(linear)
    inverse_matrix = torch.cat([inverse, -inverse @ shift], dim=2)
    grid = F.affine_grid(inverse_matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def alignment_loss(model: PostureRegressor, images: torch.Tensor, canonical: torch.Tensor) -> torch.Tensor:
    """The paper's training loss: L2 between the image warped by the predicted ψ and the canonical image."""
    aligned = align_to_canonical(images, model(images))
    return F.mse_loss(aligned, canonical.expand_as(aligned))


def alignment_step(model: PostureRegressor, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   canonical: torch.Tensor) -> torch.Tensor:
    """One optimizer step on the alignment loss, gradient norm clipped to 1; returns the batch's loss."""
    loss = alignment_loss(model, images, canonical)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach()


def build_posture(cfg: PostureModelConfig) -> PostureRegressor:
    """Build the regressor the config names (shipped tiny weights, random init, or a local file)."""
    if cfg.weights == RANDOM:
        return PostureRegressor(cfg.arch)
    if cfg.weights == EMBEDDED:
        return load_posture(embedded_path("posture.safetensors"), "tiny")
    path = local_path(cfg.weights, "models.posture.weights",
                      "Train one with `radrl bootstrap` or give a .safetensors file of a PostureRegressor state dict")
    return load_posture(path, cfg.arch)


def load_posture(path, arch: str) -> PostureRegressor:
    """A regressor of the given architecture from a state-dict file."""
    model = PostureRegressor(arch)
    model.load_state_dict(load_state(path))
    return model.eval()

