"""Specifications of the phantom chest-radiograph renderer (radrl.data.phantom)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radrl.data.observations import CHEXPERT_OBSERVATIONS
from radrl.data.phantom import (
    RENDERED_FINDINGS,
    Posture,
    canonical_image,
    posture_matrix,
    render_phantom,
)

SEEDS = (0, 1, 2, 3)
SIZE = 64


def grid(size=SIZE):
    """Normalized pixel-centre coordinates (x right, y down), as affine_grid(align_corners=False) uses."""
    p = (2.0 * np.arange(size) + 1.0) / size - 1.0
    return np.meshgrid(p, p)


def box(x_range, y_range, size=SIZE, lateral=True):
    """Mask of a box in normalized coordinates; with lateral=True, x_range is |x| (both hemithoraces)."""
    x, y = grid(size)
    xs = np.abs(x) if lateral else x
    return (xs >= x_range[0]) & (xs <= x_range[1]) & (y >= y_range[0]) & (y <= y_range[1])


def side_box(side, x_range, y_range, size=SIZE):
    """Like `box` for one side only: side -1 = patient's right (image left), +1 = patient's left."""
    x, _ = grid(size)
    return box(x_range, y_range, size) & (np.sign(x) == side)


def finding_diff(name, seed, size=SIZE):
    """Image with the finding minus the image without it (same seed: same anatomy and noise)."""
    return render_phantom([name], size=size, seed=seed) - render_phantom([], size=size, seed=seed)


LUNGS = dict(x_range=(0.05, 0.8), y_range=(-0.75, 0.65))

# finding -> (region where the change must concentrate, sign of the change)
EXPECTED = {
    "Cardiomegaly": (dict(x_range=(-0.45, 0.8), y_range=(-0.1, 0.65), lateral=False), +1),
    "Enlarged Cardiomediastinum": (dict(x_range=(0.0, 0.35), y_range=(-0.7, 0.15)), +1),
    "Pleural Effusion": (dict(x_range=(0.05, 0.8), y_range=(-0.1, 0.8)), +1),
    "Pneumothorax": (LUNGS, 0),  # darker pleural space, slightly denser collapsed lung
    "Consolidation": (LUNGS, +1),
    "Pneumonia": (LUNGS, +1),
    "Lung Opacity": (LUNGS, +1),
    "Lung Lesion": (LUNGS, +1),
    "Edema": (LUNGS, +1),
    "Atelectasis": (dict(x_range=(0.1, 0.8), y_range=(0.0, 0.7)), +1),
    "Support Devices": (dict(x_range=(0.0, 0.8), y_range=(-1.0, 0.5)), +1),
    "Fracture": (dict(x_range=(0.3, 0.85), y_range=(-0.6, 0.6)), 0),
}


# ----------------------------------------------------------------------------- basics


def test_rendered_findings_are_chexpert_names():
    assert set(RENDERED_FINDINGS) == set(EXPECTED)
    assert set(RENDERED_FINDINGS) <= set(CHEXPERT_OBSERVATIONS)


def test_deterministic_for_same_arguments():
    args = (["Edema", "Support Devices"], Posture(1.05, 0.95, 0.02, -0.03, 0.1), 64, 7)
    assert np.array_equal(render_phantom(*args), render_phantom(*args))


def test_different_seeds_differ():
    a, b = render_phantom([], seed=0), render_phantom([], seed=1)
    assert np.abs(a - b).mean() > 0.005


@pytest.mark.parametrize("size", [32, 64, 256, 512])
def test_shape_dtype_range(size):
    img = render_phantom(["Pleural Effusion", "Support Devices"], size=size, seed=3)
    assert img.shape == (size, size) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert img.max() - img.min() > 0.5  # a real dynamic range, not a flat image


def test_looks_like_a_chest_radiograph():
    img = render_phantom([], size=128, seed=0)

    def mean(x_range, y_range, lateral=True):
        return img[box(x_range, y_range, 128, lateral)].mean()

    background = img[:8, :8].mean()  # top-left corner, beside the neck
    lungs = mean((0.3, 0.55), (-0.45, 0.0))
    heart = mean((-0.05, 0.3), (0.15, 0.35), lateral=False)
    abdomen = mean((0.2, 0.5), (0.75, 0.95))
    assert background < 0.15 < lungs < 0.45 < abdomen and heart > 0.7


@pytest.mark.parametrize("size", [16, 1024])
def test_size_out_of_range_raises(size):
    with pytest.raises(ValueError, match="32 to 512"):
        render_phantom([], size=size)


def test_unknown_finding_raises_with_valid_names():
    with pytest.raises(ValueError, match="'Pleural Other'.*Cardiomegaly"):
        render_phantom(["Pleural Other"])
    with pytest.raises(ValueError, match="'Cardiomegally'"):
        render_phantom(["Cardiomegally"])


def test_no_finding_draws_nothing():
    assert np.array_equal(render_phantom(["No Finding"], seed=4), render_phantom([], seed=4))


def test_findings_do_not_disturb_each_other():
    """Adding a finding changes only its own pixels: the other finding is drawn identically."""
    both = render_phantom(["Lung Lesion", "Support Devices"], seed=5)
    devices = render_phantom(["Support Devices"], seed=5)
    lesion = render_phantom(["Lung Lesion"], seed=5)
    none = render_phantom([], seed=5)
    assert np.abs((both - devices) - (lesion - none)).mean() < 0.003


# ----------------------------------------------------------------------------- findings


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("seed", SEEDS)
def test_finding_changes_mainly_the_expected_region(name, seed):
    region_spec, sign = EXPECTED[name]
    diff = finding_diff(name, seed)
    region = box(**region_spec)
    weight = np.abs(diff)
    assert weight.sum() > 0, f"{name} changed nothing"
    inside = weight[region].sum() / weight.sum()
    assert inside > 0.85, f"{name}: only {inside:.0%} of the change is in the expected region"
    if sign:
        signed = (sign * diff)[region].sum() / weight[region].sum()
        assert signed > 0.6, f"{name}: change has the wrong sign ({signed:.2f})"


@pytest.mark.parametrize("seed", SEEDS)
def test_cardiomegaly_widens_the_heart(seed):
    diff = finding_diff("Cardiomegaly", seed)
    lateral_to_left_border = box((0.5, 0.62), (0.15, 0.4), lateral=False)
    upper_lungs = box((0.3, 0.6), (-0.6, -0.3))
    assert diff[lateral_to_left_border].mean() > 0.25
    assert np.abs(diff[upper_lungs]).mean() < 0.005


def cardiothoracic_ratio(img, size=256):
    """Widest bright run near the heart's level over the widest lung-to-lung span."""
    x, y = grid(size)
    rows = (y[:, 0] > 0.1) & (y[:, 0] < 0.4)
    heart_width = max(((img[r] > 0.6) & (np.abs(x[r]) < 0.7)).sum() for r in np.where(rows)[0])
    lungs = (img < 0.45) & (np.abs(x) < 0.85)
    thorax_width = max(np.ptp(np.where(lungs[r])[0]) for r in np.where(rows)[0] if lungs[r].any())
    return heart_width / thorax_width


def test_cardiothoracic_ratio():
    normal = [cardiothoracic_ratio(render_phantom([], size=256, seed=s)) for s in SEEDS]
    large = [cardiothoracic_ratio(render_phantom(["Cardiomegaly"], size=256, seed=s)) for s in SEEDS]
    assert max(normal) < 0.5 < min(large)


@pytest.mark.parametrize("seed", SEEDS)
def test_enlarged_cardiomediastinum_widens_the_upper_mediastinum(seed):
    diff = finding_diff("Enlarged Cardiomediastinum", seed)
    assert diff[box((0.13, 0.2), (-0.5, -0.1))].mean() > 0.2
    assert np.abs(diff[box((0.3, 0.7), (0.2, 0.5))]).mean() < 0.005


@pytest.mark.parametrize("seed", SEEDS)
def test_effusion_whitens_the_lateral_lung_base(seed):
    diff = finding_diff("Pleural Effusion", seed)
    base = max(diff[side_box(s, (0.45, 0.68), (0.25, 0.5))].mean() for s in (-1, 1))
    apex = np.abs(diff[box((0.3, 0.6), (-0.6, -0.3))]).mean()
    assert base > 0.2 and base > 10 * apex


@pytest.mark.parametrize("seed", SEEDS)
def test_pneumothorax_darkens_apex_and_lateral_wall(seed):
    diff = finding_diff("Pneumothorax", seed)
    apex_lateral = min(
        np.concatenate([diff[side_box(s, (0.3, 0.5), (-0.62, -0.5))], diff[side_box(s, (0.62, 0.72), (-0.3, 0.1))]]).mean()
        for s in (-1, 1)
    )
    assert apex_lateral < -0.04
    lower_medial = box((0.1, 0.3), (0.1, 0.35))
    assert np.abs(diff[lower_medial]).mean() < 0.5 * abs(apex_lateral)


@pytest.mark.parametrize("seed", SEEDS)
def test_edema_is_bilateral_and_perihilar(seed):
    diff = finding_diff("Edema", seed)
    for s in (-1, 1):
        assert diff[side_box(s, (0.2, 0.45), (-0.25, 0.15))].mean() > 0.08
    assert diff[box((0.2, 0.45), (-0.25, 0.15))].mean() > 2 * diff[box((0.3, 0.6), (-0.65, -0.5))].mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_opacities_are_localised_and_ordered_by_density(seed):
    """Consolidation is a dense patch, Lung Opacity a fainter one, Lung Lesion a small round one."""
    lungs = box(**LUNGS)
    consolidation = finding_diff("Consolidation", seed)
    opacity = finding_diff("Lung Opacity", seed)
    lesion = finding_diff("Lung Lesion", seed)
    for diff in (consolidation, opacity, lesion):
        assert (diff[lungs] > 0.05).mean() < 0.3  # one zone, not the whole lung
    dense, hazy = consolidation[consolidation > 0.05].mean(), opacity[opacity > 0.05].mean()
    assert dense > 0.2 and dense > hazy + 0.03
    lesion_area = (lesion > 0.1).sum() * (2.0 / SIZE) ** 2  # normalized units
    assert math.pi * 0.04**2 < lesion_area < math.pi * 0.12**2


@pytest.mark.parametrize("seed", SEEDS)
def test_atelectasis_is_basal(seed):
    diff = finding_diff("Atelectasis", seed)
    assert max(diff[side_box(s, (0.25, 0.7), (0.05, 0.45))].mean() for s in (-1, 1)) > 0.03
    assert np.abs(diff[box((0.2, 0.7), (-0.7, -0.2))]).mean() < 0.003


@pytest.mark.parametrize("seed", SEEDS)
def test_support_devices_add_bright_pixels(seed):
    diff = finding_diff("Support Devices", seed)
    assert (diff > 0.15).sum() >= 10


@pytest.mark.parametrize("seed", SEEDS)
def test_fracture_breaks_one_rib(seed):
    diff = finding_diff("Fracture", seed, size=256)
    changed = np.abs(diff) > 0.03
    assert changed.sum() > 20
    ys, xs = np.nonzero(changed)
    # one local break: everything that changed lies within a small window
    assert np.ptp(xs) * 2 / 256 < 0.45 and np.ptp(ys) * 2 / 256 < 0.45


# ----------------------------------------------------------------------------- posture


def test_posture_array_round_trip_and_sample():
    p = Posture(1.1, 0.9, 0.05, -0.07, 0.2)
    a = p.as_array()
    assert a.dtype == np.float32 and a.shape == (5,)
    assert Posture.from_array(a).as_array().tolist() == a.tolist()
    assert Posture.sample(np.random.default_rng(0), spread=0.0) == Posture()
    rng = np.random.default_rng(0)
    for _ in range(100):
        q = Posture.sample(rng)
        assert abs(q.s_x - 1) <= 0.12 and abs(q.s_y - 1) <= 0.12
        assert abs(q.t_x) <= 0.12 and abs(q.t_y) <= 0.12 and abs(q.theta) <= math.radians(12)


def test_r_align():
    assert Posture().r_align() == 0.0
    # max(|1.1-1|, |0.95-1|) + (pi/2)/(2 pi) + |(0.3, 0.4)| = 0.1 + 0.25 + 0.5
    assert Posture(1.1, 0.95, 0.3, 0.4, math.pi / 2).r_align() == pytest.approx(-0.85)
    assert Posture(0.8, 1.0, 0.0, 0.0, -math.pi).r_align() == pytest.approx(-0.7)


def test_posture_matrix_values_and_gradient():
    params = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [2.0, 3.0, 0.1, -0.2, math.pi / 2]], requires_grad=True)
    m = posture_matrix(params)
    assert m.shape == (2, 2, 3)
    torch.testing.assert_close(m[0], torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # R(pi/2) diag(2, 3) = [[0, -3], [2, 0]]
    torch.testing.assert_close(m[1], torch.tensor([[0.0, -3.0, 0.1], [2.0, 0.0, -0.2]]), atol=1e-6, rtol=0)
    m.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all() and params.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[B, 5\]"):
        posture_matrix(torch.zeros(5))


def warp(image, matrix):
    """grid_sample an image [H, W] through a [2, 3] affine (output pixel p shows the input at M p)."""
    img = torch.from_numpy(image)[None, None].double()
    g = F.affine_grid(matrix[None].double(), list(img.shape), align_corners=False)
    return F.grid_sample(img, g, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_posture_matches_affine_grid_warp(seed):
    size = 128
    posture = Posture.sample(np.random.default_rng(seed + 10))
    m = posture_matrix(torch.tensor(posture.as_array()[None]))[0]
    upright = render_phantom(["Pleural Effusion"], size=size, seed=seed)
    posed = render_phantom(["Pleural Effusion"], posture=posture, size=size, seed=seed)
    centre = box((0.0, 0.7), (-0.7, 0.7), size) & box((0.0, 0.7), (-0.7, 0.7), size, lateral=False)
    # upright warped by M(psi) ~ rendered in psi
    assert np.abs(warp(upright, m) - posed)[centre].mean() < 0.03
    # rendered in psi warped by the inverse affine ~ upright
    a, t = m[:, :2].double(), m[:, 2:].double()
    inverse = torch.cat([torch.linalg.inv(a), -torch.linalg.inv(a) @ t], dim=1)
    assert np.abs(warp(posed, inverse) - upright)[centre].mean() < 0.03
    # and the posture really moved things
    assert np.abs(posed - upright)[centre].mean() > 0.03


# ----------------------------------------------------------------------------- canonical image


def high_pass_std(img):
    """Std of the image minus its 3x3 box blur: how much pixel-scale texture it has."""
    padded = np.pad(img, 1, mode="edge")
    blur = sum(padded[i : i + img.shape[0], j : j + img.shape[1]] for i in range(3) for j in range(3)) / 9
    return float((img - blur).std())


def test_canonical_image_is_a_smooth_mean():
    canon = canonical_image(size=64, n=16, seed=0)
    assert canon.shape == (64, 64) and canon.dtype == np.float32
    single = render_phantom([], size=64, seed=0)
    assert high_pass_std(canon) < 0.7 * high_pass_std(single)
    assert np.allclose(canonical_image(size=32, n=2, seed=3), (render_phantom([], size=32, seed=3) + render_phantom([], size=32, seed=4)) / 2, atol=1e-6)
