"""The report-to-image diffusion generator: UNet, text encoder, tokenizer, DDIM scheduler, optional VAE.

One folder layout for every source: the Stable Diffusion 1.x layout diffusers uses
(`unet/`, `text_encoder/`, `tokenizer/`, `scheduler/`, optionally `vae/`). RoentGen is such a
folder; so is the shipped tiny model, which denoises 1-channel pixels instead of VAE latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from radrl.config import EMBEDDED, RANDOM, DiffusionModelConfig
from radrl.models.tokenizer import BOS_ID, EOS_ID, PAD_ID
from radrl.models.weights import MissingWeightsError, embedded_path, looks_like_hub_id

SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


@dataclass
class DiffusionModels:
    """The parts of a text-conditioned diffusion generator, as diffusers and transformers objects."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDIMScheduler
    vae: AutoencoderKL | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the UNet denoises."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2^(VAE levels − 1) as diffusers computes it (8 for SD 1.x), 1 without VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @torch.no_grad()
    def encode_reports(self, reports: list[str]) -> torch.Tensor:
        """Frozen text-encoder features c_p of each report, [B, M, d] with M = the tokenizer's max length."""
        tokens = self.tokenizer(
            reports, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length, return_tensors="pt"
        )
        device = self.text_encoder.device
        return self.text_encoder(tokens.input_ids.to(device)).last_hidden_state

    def truncated(self, reports: list[str]) -> int:
        """How many reports are longer than the text encoder reads (encode_reports keeps their first tokens)."""
        limit = self.tokenizer.model_max_length
        lengths = self.tokenizer(list(reports), truncation=True, max_length=limit + 1).input_ids  # one over: cut
        return sum(len(ids) > limit for ids in lengths)

    @torch.no_grad()
    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """Denoised samples (pixels or latents) → grayscale images [B, 1, H, W] in [0, 1]."""
        return self.decode(samples)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """`to_images`, differentiable (reward backpropagation through the VAE decoder)."""
        if self.vae is not None:
            samples = self.vae.decode(samples.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        images = (samples.float().clamp(-1, 1) + 1) / 2
        return images.mean(dim=1, keepdim=True)  # an RGB SD decoder gives three near-equal channels

    def save(self, folder: Path) -> None:
        """Write the SD 1.x folder layout that `build_diffusion` reads back."""
        self.unet.save_pretrained(folder / "unet")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        self.scheduler.save_pretrained(folder / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")


def tiny_unet_config(image_size: int, cross_attention_dim: int = 128) -> dict:
    """A small pixel-space UNet2DConditionModel (~2.8M parameters) for 1-channel phantoms.

    Attention only below full resolution: self-attention over every pixel is what makes
    a UNet slow on a CPU.
    """
    return dict(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' name for the number of heads here
        norm_num_groups=8,
    )


def sd1_unet_config() -> dict:
    """Stable Diffusion 1.x UNet (RoentGen's architecture): 4×64×64 latents, 768-d text features."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def tiny_text_encoder_config(vocab_size: int, hidden_size: int = 128) -> CLIPTextConfig:
    """A two-layer CLIP text transformer over the report tokenizer (77-token context, as SD)."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def sd1_text_encoder_config(vocab_size: int = 49408) -> CLIPTextConfig:
    """CLIP ViT-L/14's text transformer, SD 1.x's frozen text encoder."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def pixel_scheduler() -> DDIMScheduler:
    """DDIM over the DDPM linear schedule, with x0 clipped to the pixel range."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        clip_sample=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def latent_scheduler() -> DDIMScheduler:
    """The DDIM settings of SD 1.x (scaled-linear betas, no clipping of latents)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def random_diffusion(arch: str, image_size: int, tokenizer: PreTrainedTokenizerBase) -> DiffusionModels:
    """Randomly initialised generator of the given architecture ('tiny' or 'sd1')."""
    if arch == "tiny":
        text_config = tiny_text_encoder_config(len(tokenizer))
        return DiffusionModels(
            unet=UNet2DConditionModel(**tiny_unet_config(image_size, text_config.hidden_size)),
            text_encoder=CLIPTextModel(text_config),
            tokenizer=tokenizer,
            scheduler=pixel_scheduler(),
        )
    return DiffusionModels(
        unet=UNet2DConditionModel(**sd1_unet_config()),
        text_encoder=CLIPTextModel(sd1_text_encoder_config(max(len(tokenizer), 49408))),
        tokenizer=tokenizer,
        scheduler=latent_scheduler(),
        vae=AutoencoderKL(  # SD 1.x VAE: 8× downsampling, 4 latent channels
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, scaling_factor=0.18215,
        ),
    )


def load_diffusion(source: str | Path, use_vae: bool) -> DiffusionModels:
    """Load an SD 1.x-layout folder (local path, or a hub id present in the local HF cache)."""
    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        missing = [s for s in SUBFOLDERS + (("vae",) if use_vae else ()) if not (local / s).is_dir()]
        if missing:
            raise MissingWeightsError(
                f"diffusion model folder {local} lacks {', '.join(missing)}/: expected the Stable Diffusion 1.x layout "
                "(unet/, text_encoder/, tokenizer/, scheduler/, vae/) as written by diffusers' save_pretrained"
            )
    elif not looks_like_hub_id(source):
        raise MissingWeightsError(
            f"models.diffusion.weights: '{source}' does not exist. Point it at a local RoentGen / SD 1.x folder "
            "(e.g. the RoentGen release unpacked), or use 'embedded' for the shipped tiny model"
        )
    try:
        return DiffusionModels(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae") if use_vae else None,
        )
    except OSError as error:  # hub id not in the local cache (no network here), or a damaged file
        raise MissingWeightsError(
            f"could not load the diffusion model '{source}': {error}. Download it where you have access and set "
            "models.diffusion.weights to the local folder"
        ) from error


def decode_in_slices(models: DiffusionModels) -> DiffusionModels:
    """The VAE decodes one image at a time (diffusers' slicing: the same images). At 512 px its decoder's activations
    take a few GB per image, so a whole sampling call of 27 decoded at once would not fit an 80 GB GPU."""
    if models.vae is not None:
        models.vae.enable_slicing()
    return models


def build_diffusion(cfg: DiffusionModelConfig, image_size: int) -> DiffusionModels:
    """Build the generator the config names; the embedded one must match `image_size`."""
    if cfg.weights == RANDOM:
        tokenizer = AutoTokenizer.from_pretrained(str(embedded_path("tokenizer")))
        return decode_in_slices(random_diffusion(cfg.arch, image_size, tokenizer))
    source = embedded_path("diffusion") if cfg.weights == EMBEDDED else cfg.weights
    models = decode_in_slices(load_diffusion(source, cfg.use_vae))
    pixels = models.unet.config.sample_size * models.vae_scale_factor
    if pixels != image_size:
        raise ValueError(
            f"data.image_size = {image_size} but the diffusion model '{cfg.weights}' makes {pixels} px images; "
            f"set data.image_size={pixels}"
        )
    return models
