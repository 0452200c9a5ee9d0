"""Every model builder: tiny variants run forward with the right shapes, real-size ones build from
config with random weights (no download), and missing weights stop with an error naming the file."""

import pytest
import torch

from radrl.config import ClassifierConfig, ClipConfig, DiffusionModelConfig, PostureModelConfig, ReportGeneratorConfig
from radrl.data.phantom import Posture, render_phantom
from radrl.models.classifier import PAPER_CLASSES, build_classifier
from radrl.models.clip import build_clip
from radrl.models.diffusion import build_diffusion, load_diffusion
from radrl.models.posture import align_to_canonical, build_posture, r_align
from radrl.models.report_lm import build_decoder
from radrl.models.weights import MissingWeightsError

IMAGES = torch.rand(2, 1, 32, 32)


@pytest.mark.parametrize("weights", ["random", "embedded"])
def test_tiny_diffusion_denoises_report_conditioned_pixels(weights):
    models = build_diffusion(DiffusionModelConfig(weights=weights), image_size=32)
    cond = models.encode_reports(["Heart size is enlarged.", "No acute disease."])
    assert cond.shape == (2, 77, models.unet.config.cross_attention_dim)
    noise = models.unet(torch.randn(2, *models.latent_shape), 10, encoder_hidden_states=cond).sample
    assert noise.shape == (2, 1, 32, 32)
    images = models.to_images(torch.randn(2, 1, 32, 32))
    assert images.shape == (2, 1, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_diffusion_folder_round_trip(tmp_path):
    models = build_diffusion(DiffusionModelConfig(weights="random"), image_size=32)
    models.save(tmp_path / "sd")
    again = load_diffusion(tmp_path / "sd", use_vae=False)
    x, cond = torch.randn(1, 1, 32, 32), models.encode_reports(["Small left effusion."])
    saved, loaded = models.unet.state_dict(), again.unet.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():  # same weights; attention kernels may differ in the last bits
        before = models.unet.eval()(x, 5, encoder_hidden_states=cond).sample
        assert torch.allclose(before, again.unet(x, 5, encoder_hidden_states=cond).sample, atol=1e-5)


def test_embedded_diffusion_size_mismatch_is_explained():
    with pytest.raises(ValueError, match="set data.image_size=32"):
        build_diffusion(DiffusionModelConfig(), image_size=64)


def test_diffusion_folder_missing_parts_is_explained(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MissingWeightsError, match="lacks text_encoder, tokenizer, scheduler, vae"):
        build_diffusion(DiffusionModelConfig(weights=str(tmp_path), use_vae=True), image_size=512)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_diffusion(DiffusionModelConfig(weights=str(tmp_path / "roentgen")), image_size=512)


@pytest.mark.parametrize("weights", ["random", "embedded"])
def test_tiny_posture_regressor(weights):
    model = build_posture(PostureModelConfig(weights=weights))
    psi = model(IMAGES)
    assert psi.shape == (2, 5) and r_align(psi).shape == (2,)


def test_random_posture_head_starts_upright():
    psi = build_posture(PostureModelConfig(weights="random", arch="resnet18"))(IMAGES)
    assert torch.allclose(psi, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0]] * 2))
    assert torch.allclose(r_align(psi), torch.zeros(2))


def test_r_align_matches_the_paper_formula():
    posture = Posture(s_x=1.1, s_y=0.95, t_x=0.03, t_y=-0.04, theta=-0.2)
    expected = -(0.1 + 0.2 / (2 * torch.pi) + 0.05)
    assert r_align(torch.from_numpy(posture.as_array())[None]).item() == pytest.approx(expected, abs=1e-6)
    assert posture.r_align() == pytest.approx(expected, abs=1e-6)


def test_align_to_canonical_undoes_the_posture():
    posture = Posture(s_x=1.1, s_y=0.92, t_x=0.08, t_y=-0.05, theta=0.15)
    upright = torch.from_numpy(render_phantom([], Posture(), 64, seed=3))[None, None]
    posed = torch.from_numpy(render_phantom([], posture, 64, seed=3))[None, None]
    aligned = align_to_canonical(posed, torch.from_numpy(posture.as_array())[None])
    centre = slice(16, 48)
    assert (aligned - upright)[..., centre, centre].abs().mean() < 0.03
    assert (posed - upright)[..., centre, centre].abs().mean() > 3 * (aligned - upright)[..., centre, centre].abs().mean()


def test_posture_missing_file_names_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="nope.safetensors"):
        build_posture(PostureModelConfig(weights=str(tmp_path / "nope.safetensors"), arch="resnet18"))


@pytest.mark.parametrize("weights", ["random", "embedded"])
def test_tiny_classifier(weights):
    model = build_classifier(ClassifierConfig(weights=weights))
    assert model(IMAGES).shape == (2, len(PAPER_CLASSES))
    assert "Pleural Effusion" in model.chexpert_names()


def test_xrv_named_weights_not_in_cache_are_explained():
    with pytest.raises(MissingWeightsError, match=r"densenet121-res224-all.*models_data.*cannot be downloaded"):
        build_classifier(ClassifierConfig(weights="densenet121-res224-all", arch="densenet121"))


@pytest.mark.parametrize("weights", ["random", "embedded"])
def test_tiny_clip(weights):
    clip = build_clip(ClipConfig(weights=weights))
    images, reports = clip.encode_images(IMAGES), clip.encode_reports(["No effusion.", "Cardiomegaly."])
    assert images.shape == reports.shape == (2, 128)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert clip.patch_tokens(IMAGES).shape == (2, 64, 128)  # (32 / 4)² patches of width 128


def test_clip_folder_without_config_is_explained(tmp_path):
    with pytest.raises(MissingWeightsError, match="no open_clip_config.json"):
        build_clip(ClipConfig(weights=str(tmp_path)))


@pytest.mark.parametrize("weights", ["random", "embedded"])
def test_tiny_decoder_generates(weights):
    lm = build_decoder(ReportGeneratorConfig(decoder_weights=weights))
    prompt = lm.tokenizer(["the heart"], return_tensors="pt")
    out = lm.model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert out.shape[1] <= prompt.input_ids.shape[1] + 5


def test_decoder_missing_folder_is_explained(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_decoder(ReportGeneratorConfig(decoder_weights=str(tmp_path / "blip2-opt")))


# ------------------------------------------------------------------- real-size architectures


def _params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_real_posture_classifier_and_decoder_shapes():
    posture = build_posture(PostureModelConfig(weights="random", arch="resnet18"))
    assert 11.0 < _params(posture) < 11.3  # ResNet-18
    classifier = build_classifier(ClassifierConfig(weights="random", arch="densenet121"))
    assert classifier(torch.rand(1, 1, 224, 224)).shape == (1, 18)
    assert 6.9 < _params(classifier) < 7.0  # DenseNet-121 with 18 outputs
    decoder = build_decoder(ReportGeneratorConfig(decoder_weights="random", decoder_arch="opt2.7b"))
    assert 2600 < _params(decoder.model) < 2700  # OPT-2.7B, built on the meta device


@pytest.mark.slow
@pytest.mark.parametrize("arch, image_params", [("biomedclip", (85, 88)), ("cxr_clip", (37, 38))])
def test_real_clip_image_towers(arch, image_params):
    clip = build_clip(ClipConfig(weights="random", arch=arch))
    assert image_params[0] < _params(clip.model.visual) < image_params[1]
    with torch.no_grad():
        assert clip.encode_images(torch.rand(1, 1, 64, 64)).shape == (1, 512)


@pytest.mark.slow
def test_real_sd1_generator_builds_with_random_weights():
    models = build_diffusion(DiffusionModelConfig(weights="random", arch="sd1"), image_size=512)
    assert 859 < _params(models.unet) < 860  # SD 1.x UNet
    assert 83 < _params(models.vae) < 84.5
    assert models.latent_shape == (4, 64, 64)
    assert models.text_encoder.config.hidden_size == 768


def test_vae_decodes_one_image_at_a_time_with_the_same_images():
    """decode_in_slices (diffusers' VAE slicing): what keeps a 27-image call at 512 px within a GPU's memory."""
    from diffusers import AutoencoderKL

    from radrl.models.diffusion import DiffusionModels, decode_in_slices

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, sample_size=32)
    models = DiffusionModels(None, None, None, None, vae)
    latents = torch.randn(3, 4, 16, 16)
    whole = models.to_images(latents)
    assert decode_in_slices(models).vae.use_slicing
    torch.testing.assert_close(models.to_images(latents), whole, atol=1e-5, rtol=0)
