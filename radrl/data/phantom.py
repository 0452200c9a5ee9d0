"""Procedural PA chest radiographs ("phantoms") drawn from a set of findings and a posture.

Every structure is an analytic density field over upright normalized coordinates
q = (x, y) in [-1, 1]^2 (x right, y down, as `affine_grid` uses; the patient's left is
image right, the standard PA display). An output pixel at p shows the anatomy at
q = M(psi) [p, 1], so a posture is exact at any resolution: no resampling.

Randomness comes from separate seeded streams (anatomy, each finding, pixel noise), so
adding a finding to a seed changes that finding's pixels and nothing else.
"""

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from radrl.data.observations import CHEXPERT_OBSERVATIONS

# Every CheXpert observation except the two with nothing to draw, in CheXpert order (the order
# also numbers each finding's random stream, so it must not change).
RENDERED_FINDINGS: tuple[str, ...] = tuple(
    name for name in CHEXPERT_OBSERVATIONS if name not in ("No Finding", "Pleural Other")
)

MIN_SIZE, MAX_SIZE = 32, 512
RIGHT, LEFT = -1, 1  # the patient's side, as the sign of x (patient's right is image left)

# Per-finding random streams are keyed by a fixed index, not by set order, so the same
# finding on the same seed is always drawn the same way.
_STREAM = {name: i + 1 for i, name in enumerate(RENDERED_FINDINGS)}
_NOISE_STREAM = 100


# ----------------------------------------------------------------------------- posture


@dataclass(frozen=True)
class Posture:
    """An affine mis-positioning psi: scale, translation (normalized units), rotation (radians)."""

    s_x: float = 1.0
    s_y: float = 1.0
    t_x: float = 0.0
    t_y: float = 0.0
    theta: float = 0.0

    def as_array(self) -> np.ndarray:
        """The five parameters as float32 [5] in the order (s_x, s_y, t_x, t_y, theta)."""
        return np.array([self.s_x, self.s_y, self.t_x, self.t_y, self.theta], dtype=np.float32)

    @classmethod
    def from_array(cls, a) -> "Posture":
        """Inverse of `as_array`; accepts anything numpy can read as five numbers."""
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        if a.shape != (5,):
            raise ValueError(f"a posture has 5 parameters (s_x, s_y, t_x, t_y, theta), got {a.size}")
        return cls(*(float(v) for v in a))

    @classmethod
    def sample(cls, rng: np.random.Generator, spread: float = 1.0) -> "Posture":
        """Random mis-positioning: scale 1 +- 0.12, translation +- 0.12, rotation +- 12 deg, times spread."""
        s_x, s_y = 1.0 + spread * rng.uniform(-0.12, 0.12, size=2)
        t_x, t_y = spread * rng.uniform(-0.12, 0.12, size=2)
        theta = spread * rng.uniform(-np.deg2rad(12.0), np.deg2rad(12.0))
        return cls(float(s_x), float(s_y), float(t_x), float(t_y), float(theta))

    def r_align(self) -> float:
        """CXRL alignment reward -(max(|s_x-1|, |s_y-1|) + |theta|/(2 pi) + |t|); 0 when upright."""
        scale = max(abs(self.s_x - 1.0), abs(self.s_y - 1.0))
        return -(scale + abs(self.theta) / (2.0 * np.pi) + float(np.hypot(self.t_x, self.t_y)))


def posture_matrix(posture_params: torch.Tensor) -> torch.Tensor:
    """[B, 5] (s_x, s_y, t_x, t_y, theta) -> [B, 2, 3] affine M = [R(theta) diag(s_x, s_y) | t]; differentiable."""
    if posture_params.ndim != 2 or posture_params.shape[1] != 5:
        raise ValueError(f"posture_params must be [B, 5], got {tuple(posture_params.shape)}")
    s_x, s_y, t_x, t_y, theta = posture_params.unbind(dim=1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    row0 = torch.stack([cos * s_x, -sin * s_y, t_x], dim=1)
    row1 = torch.stack([sin * s_x, cos * s_y, t_y], dim=1)
    return torch.stack([row0, row1], dim=1)


# ----------------------------------------------------------------------------- field helpers


def _soft(sdf: np.ndarray, width: float) -> np.ndarray:
    """1 inside (sdf < 0), 0 outside, with a smoothstep edge 4 * `width` wide (normalized units)."""
    # A cubic, not tanh: a few times cheaper, and this runs ~100 times per image.
    t = np.clip(0.5 - sdf * (0.25 / width), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_sdf(x, y, cx, cy, rx, ry, angle=0.0):
    """Approximate signed distance to a rotated ellipse (exact for circles)."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / rx
    v = (-(x - cx) * s + (y - cy) * c) / ry
    return (np.sqrt(u * u + v * v) - 1.0) * min(rx, ry)


def _polyline_distance(x, y, points) -> np.ndarray:
    """Distance from every (x, y) to a polyline through `points` [(x, y), ...]."""
    best = np.full(np.shape(x), np.inf)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        dx, dy = bx - ax, by - ay
        h = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        best = np.minimum(best, np.hypot(x - ax - h * dx, y - ay - h * dy))
    return best


class _ValueNoise:
    """Smooth random field on a fixed lattice over [-extent, extent]^2: a function of q, so posture-exact."""

    def __init__(self, rng: np.random.Generator, cells: int, extent: float = 1.8):
        self.cells, self.extent = cells, extent
        self.grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)

    def __call__(self, x, y):
        def cell(v):
            t = np.clip((v + self.extent) / (2 * self.extent) * self.cells, 0.0, self.cells - 1e-6)
            i = t.astype(np.int64)
            f = t - i
            return i, f * f * (3.0 - 2.0 * f)  # smoothstep: no visible lattice creases

        i, fx = cell(x)
        j, fy = cell(y)
        g = self.grid
        top = g[j, i] * (1 - fx) + g[j, i + 1] * fx
        bottom = g[j + 1, i] * (1 - fx) + g[j + 1, i + 1] * fx
        return top * (1 - fy) + bottom * fy


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    """Per-seed normal variation; each render owns its instance, which findings edit (cardiomegaly widens the heart)."""

    body_w: float  # torso half-width scale
    lung_w: float  # lung width scale
    lung_h: float  # lung height scale
    dome_y: dict  # diaphragm dome peak height per side (right higher than left)
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    mediastinum_w: float  # upper mediastinum half-width
    knob_r: float  # aortic knob radius
    rib_start: float
    rib_step: float
    contrast: float
    brightness: float
    noise_std: float
    markings: _ValueNoise
    reticular: _ValueNoise


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Normal anatomy for one seed: jitters kept small so findings stay the dominant signal."""
    right_dome = 0.40 + rng.uniform(-0.04, 0.04)
    return _Anatomy(
        body_w=rng.uniform(0.95, 1.04),
        lung_w=rng.uniform(0.95, 1.04),
        lung_h=rng.uniform(0.95, 1.04),
        dome_y={RIGHT: right_dome, LEFT: right_dome + rng.uniform(0.04, 0.08)},
        heart_cx=0.13 + rng.uniform(-0.025, 0.025),
        heart_cy=0.24 + rng.uniform(-0.02, 0.02),
        heart_rx=0.33 * rng.uniform(0.95, 1.05),
        heart_ry=0.22 * rng.uniform(0.95, 1.05),
        mediastinum_w=0.10 + rng.uniform(-0.01, 0.01),
        knob_r=0.06 + rng.uniform(-0.008, 0.008),
        rib_start=-0.70 + rng.uniform(-0.02, 0.02),
        rib_step=rng.uniform(0.105, 0.125),
        contrast=rng.uniform(0.93, 1.07),
        brightness=rng.uniform(-0.03, 0.03),
        noise_std=rng.uniform(0.006, 0.018),
        markings=_ValueNoise(rng, 80, extent=6.0),
        reticular=_ValueNoise(rng, 70),
    )


def _nominal_anatomy() -> _Anatomy:
    """The mean anatomy (no jitter), used to place findings where they can be seen."""
    return _Anatomy(
        body_w=1.0, lung_w=1.0, lung_h=1.0, dome_y={RIGHT: 0.40, LEFT: 0.46}, heart_cx=0.13, heart_cy=0.24,
        heart_rx=0.33, heart_ry=0.22, mediastinum_w=0.10, knob_r=0.06, rib_start=-0.70, rib_step=0.115,
        contrast=1.0, brightness=0.0, noise_std=0.0, markings=None, reticular=None,
    )


def _body(x, y, a: _Anatomy):
    """Soft-tissue silhouette: torso with rounded shoulders, neck, and the upper arms beside the chest."""
    torso = _ellipse_sdf(x, y, 0.0, 0.32, 0.86 * a.body_w, 1.12)
    neck = np.maximum(np.abs(x) - 0.22, y + 0.6)
    arms = np.minimum(
        _ellipse_sdf(x, y, -1.02 * a.body_w, 0.05, 0.12, 0.85),
        _ellipse_sdf(x, y, 1.02 * a.body_w, 0.05, 0.12, 0.85),
    )
    return _soft(np.minimum(np.minimum(torso, neck), arms), 0.015)


def _humeral_heads(x, y, a: _Anatomy):
    """The humeral heads at the top corners, partly cut by the frame as on a real film."""
    return sum(_soft(_ellipse_sdf(x, y, side * 0.98 * a.body_w, -0.62, 0.13, 0.15), 0.015) for side in (RIGHT, LEFT))


def _lung_ellipse(side, a: _Anatomy):
    """(cx, cy, rx, ry) of the ellipse bounding one hemithorax's lung (apex up, widest near the base)."""
    return side * 0.40 * a.lung_w, 0.22, 0.34 * a.lung_w, 0.88 * a.lung_h


def _dome(x, side, a: _Anatomy, elevation=0.0):
    """Height of the diaphragm under one lung: a dome, steep laterally (deep costophrenic angle)."""
    dx = side * (x - side * 0.36 * a.lung_w)  # > 0 laterally
    lateral = np.maximum(dx - 0.12, 0.0)
    medial = np.maximum(-dx - 0.15, 0.0)
    return a.dome_y[side] - elevation + 1.0 * dx * dx + 4.0 * lateral**2 + 1.5 * medial**2


def _lung_sdf(x, y, side, a: _Anatomy, elevation=0.0):
    """Signed field of one lung: the hemithorax ellipse cut by the diaphragm dome."""
    ellipse = _ellipse_sdf(x, y, *_lung_ellipse(side, a))
    return np.maximum(ellipse, y - _dome(x, side, a, elevation))


def _heart(x, y, a: _Anatomy):
    """Heart shadow: a tilted ellipse left of midline with its apex down and to image right."""
    return _soft(_ellipse_sdf(x, y, a.heart_cx, a.heart_cy, a.heart_rx, a.heart_ry, angle=0.3), 0.012)


def _mediastinum(x, y, a: _Anatomy):
    """Upper mediastinum (a vertical band above the heart) plus the aortic knob on the left."""
    widening = 0.04 * np.clip((y + 0.2) / 0.3, 0.0, 1.0)  # broadens toward the heart
    band = np.maximum(np.abs(x - 0.01) - a.mediastinum_w - widening, y - a.heart_cy)
    knob = _ellipse_sdf(x, y, a.mediastinum_w + 0.01, -0.27, a.knob_r, a.knob_r * 0.9)
    inlet = _soft(-0.62 - y, 0.06)  # fades out above the thoracic inlet into the neck
    return _soft(np.minimum(band, knob), 0.012) * inlet


def _trachea(x, y):
    """Air column of the trachea down to the carina, then the two main bronchi."""
    carina = (-0.01, -0.22)
    d = np.minimum(
        _polyline_distance(x, y, [(-0.01, -1.2), carina, (-0.08, -0.14)]),
        _polyline_distance(x, y, [carina, (0.07, -0.13)]),
    )
    return _soft(d - 0.038, 0.01)


def _vessels(x, y, side, a: _Anatomy):
    """Lung markings: ridged noise in polar coordinates about the hilum, so vessels fan out and taper."""
    hx, hy = side * 0.18, -0.02
    r = np.hypot(x - hx, y - hy) + 1e-3
    angle = np.arctan2(y - hy, side * (x - hx))  # 0 points laterally; the branch cut hides medially
    # Fast in angle, slow in log-radius: the ridges run radially, like vessels leaving the hilum.
    n = a.markings(1.5 * angle + 0.5 * side, 0.25 * np.log(r))
    ridge = np.clip(1.0 - 1.8 * np.abs(n), 0.0, 1.0) ** 2
    return ridge * np.exp(-r / 0.5) * (1.0 - np.exp(-((r / 0.12) ** 2)))  # the hilum itself is a blob


def _spine(x, y, a: _Anatomy):
    """Vertebral column: bodies separated by darker disc spaces, with paired pedicles."""
    column = _soft(np.abs(x) - 0.065, 0.01)
    phase = (y - a.rib_start) / (a.rib_step * 0.9)
    bodies = 0.7 + 0.3 * np.cos(2 * np.pi * phase) ** 2
    frac = phase - np.floor(phase) - 0.5
    pedicles = _soft(np.hypot((np.abs(x) - 0.045) / 0.018, frac / 0.18) - 1.0, 0.15)
    return column * bodies + 0.6 * pedicles


def _clavicles(x, y):
    """Both clavicles: S-curved bars from the sternal notch up to the shoulders."""
    s = np.abs(x)
    centre = -0.60 - 0.30 * s + 0.22 * s * s
    along = _soft(0.05 - s, 0.01) * _soft(s - 0.74, 0.02)
    return _soft(np.abs(y - centre) - 0.028, 0.008) * along


def _rib_band(s, y, y0, s_max, half_thickness=0.021, fracture=None):
    """One posterior rib arching laterally and down from the spine; `fracture` = (s_f, step) breaks it."""
    dy, gap, callus = 0.0, 1.0, 0.0
    if fracture is not None:
        s_f, step = fracture
        lateral = _soft(s_f - s, 0.004)  # 1 lateral of the break
        dy = step * lateral * (1.0 + 2.0 * np.maximum(s - s_f, 0.0))  # displaced and angulated
        gap = 1.0 - _soft(np.abs(s - s_f) - 0.028, 0.004)
        # A fusiform callus around the break: what keeps it visible at 64 px, where a rib is 1-2 px thick.
        c_f = y0 - 0.12 * s_f + 0.75 * s_f * s_f + 0.5 * step
        callus = 0.9 * _soft(_ellipse_sdf(s, y, s_f, c_f, 0.06, 0.05), 0.01)
    centre = y0 - 0.12 * s + 0.75 * s * s + dy
    d = np.abs(y - centre)
    cortex = _soft(d - half_thickness, 0.006) * (0.75 + 0.25 * (d / half_thickness) ** 2)
    return np.maximum(cortex * gap, callus) * _soft(0.07 - s, 0.01) * _soft(s - s_max, 0.02)


def _ribs(x, y, a: _Anatomy, fracture=None):
    """Ten posterior ribs per side (bright over the lungs) and fainter anterior ribs."""
    total = np.zeros_like(x)
    s = np.abs(x)  # the rib cage is symmetric, so both sides are drawn at once
    for k in range(10):
        y0 = a.rib_start + k * a.rib_step
        s_max = 0.62 + 0.16 * min(k, 4) / 4  # upper ribs are shorter
        band = _rib_band(s, y, y0, s_max)
        total += band
        if fracture is not None and fracture["rib"] == k:
            broken = _rib_band(s, y, y0, s_max, fracture=(fracture["s"], fracture["step"]))
            total += (broken - band) * (np.sign(x) == fracture["side"])
    for k in range(6):  # anterior ribs run down and medially from the lateral wall
        y_lat = a.rib_start + 0.12 + k * 1.2 * a.rib_step
        centre = y_lat + 0.35 * (0.78 - s)
        along = _soft(0.28 - s, 0.04) * _soft(s - 0.78, 0.02)
        total += 0.35 * _soft(np.abs(y - centre) - 0.018, 0.01) * along
    return total


# ----------------------------------------------------------------------------- findings


def _pick_sides(rng, p_bilateral):
    """One side at random, or both with probability p_bilateral."""
    if rng.random() < p_bilateral:
        return (RIGHT, LEFT)
    return (RIGHT,) if rng.random() < 0.5 else (LEFT,)


def _sample_findings(findings: frozenset, seed: int) -> dict:
    """Side, severity and placement of each requested finding, each from its own stream."""
    params = {}
    for name in findings:
        rng = np.random.default_rng([seed, _STREAM[name]])
        params[name] = _SAMPLERS[name](rng)
    return params


def _sample_effusion(rng):
    # severity = how far the fluid climbs above the dome (normalized units)
    return {side: rng.uniform(0.18, 0.55) for side in _pick_sides(rng, 0.25)}


def _sample_pneumothorax(rng):
    # lung scaled toward its inferomedial corner: 0.55 = large collapse, 0.78 = small rim
    return {side: rng.uniform(0.55, 0.78) for side in _pick_sides(rng, 0.1)}


def _visible_lung_point(rng, x_range, y_range, margin):
    """A random (x, y) at least `margin` inside a nominal lung and clear of a large heart."""
    nominal = _nominal_anatomy()
    while True:
        x, y = rng.uniform(*x_range) * (RIGHT if rng.random() < 0.5 else LEFT), rng.uniform(*y_range)
        inside = _lung_sdf(x, y, int(np.sign(x)), nominal) < -margin
        clear_of_heart = _ellipse_sdf(x, y, 0.18, 0.26, 0.46, 0.26, angle=0.3) > margin
        if inside and clear_of_heart:
            return float(x), float(y)


def _sample_patch(rng):
    zone_y = rng.choice([-0.35, -0.05, 0.22])  # upper, middle/lingula, lower zone
    cx, cy = _visible_lung_point(rng, (0.30, 0.50), (zone_y - 0.06, zone_y + 0.06), 0.05)
    return {
        "cx": cx,
        "cy": cy,
        "rx": rng.uniform(0.18, 0.26),
        "ry": rng.uniform(0.14, 0.2),
        "strength": rng.uniform(0.9, 1.0),
        "edge": 0.015,
        "noise": _ValueNoise(rng, 24),
    }


def _sample_opacity(rng):
    p = _sample_patch(rng)
    p["strength"] = rng.uniform(0.45, 0.6)
    p["edge"] = 0.05
    p["rx"] *= 1.4
    p["ry"] *= 1.4
    return p


def _sample_lesion(rng):
    r = rng.uniform(0.06, 0.10)
    cx, cy = _visible_lung_point(rng, (0.25, 0.55), (-0.45, 0.25), r + 0.02)
    return {"cx": cx, "cy": cy, "r": r}


def _sample_edema(rng):
    return {"strength": rng.uniform(0.7, 0.85)}


def _sample_atelectasis(rng):
    side = RIGHT if rng.random() < 0.5 else LEFT
    return {
        "side": side,
        "elevation": rng.uniform(0.06, 0.10),
        "length": rng.uniform(0.36, 0.46),
        "thickness": rng.uniform(0.07, 0.09),
        "tilt": rng.uniform(-0.25, 0.25),
    }


def _sample_devices(rng):
    kinds = [k for k, p in (("ett", 0.6), ("line", 0.5), ("pacer", 0.35)) if rng.random() < p]
    return {
        "kinds": kinds or ["ett"],
        "ett_tip": rng.uniform(-0.45, -0.32),
        "line_side": RIGHT if rng.random() < 0.5 else LEFT,
    }


def _sample_fracture(rng):
    return {
        "side": RIGHT if rng.random() < 0.5 else LEFT,
        "rib": int(rng.integers(3, 8)),
        "s": rng.uniform(0.45, 0.62),
        "step": rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.08),
    }


_SAMPLERS = {
    "Pleural Effusion": _sample_effusion,
    "Pneumothorax": _sample_pneumothorax,
    "Consolidation": _sample_patch,
    "Pneumonia": _sample_patch,
    "Lung Opacity": _sample_opacity,
    "Lung Lesion": _sample_lesion,
    "Edema": _sample_edema,
    "Atelectasis": _sample_atelectasis,
    "Support Devices": _sample_devices,
    "Fracture": _sample_fracture,
    "Cardiomegaly": lambda rng: {"widen": rng.uniform(1.45, 1.65), "taller": rng.uniform(1.1, 1.2)},
    "Enlarged Cardiomediastinum": lambda rng: {"widen": rng.uniform(0.08, 0.13)},
}


def _patch(x, y, p, lung):
    """Opacity patch: a blob broken up by noise, confined to the lung; `edge` sets how hazy its border is."""
    blob = _soft(_ellipse_sdf(x, y, p["cx"], p["cy"], p["rx"], p["ry"]), p["edge"])
    patchy = np.clip(0.85 + 0.45 * p["noise"](x, y), 0.0, 1.0)
    return p["strength"] * blob * patchy * lung


def _effusion(x, y, side, height, a: _Anatomy):
    """Fluid in the hemithorax base: level `height` above the dome, climbing laterally (meniscus)."""
    lateral = np.clip(side * x / (0.74 * a.lung_w), 0.0, 1.0)
    level = a.dome_y[side] - height + 0.06 - 0.22 * lateral**2
    hemithorax = _soft(_ellipse_sdf(x, y, *_lung_ellipse(side, a)), 0.01)
    return _soft(level - y, 0.03) * hemithorax


def _edema(x, y, strength, a: _Anatomy, lung):
    """Bilateral perihilar 'bat wing' haze plus fine interstitial lines and basal Kerley B lines."""
    haze = sum(np.exp(-(((x - side * 0.3) / 0.22) ** 2) - ((y + 0.0) / 0.34) ** 2) for side in (RIGHT, LEFT))
    reticular = np.clip(1.0 - np.abs(a.reticular(x, y)) * 3.0, 0.0, 1.0) ** 2
    lateral_base = _soft(0.6 - np.abs(x), 0.04) * _soft(0.1 - y, 0.04) * _soft(np.abs(x) - 0.52, 0.04)
    kerley = lateral_base * (np.cos(2 * np.pi * y / 0.045) > 0.6)
    return strength * np.clip(haze + 0.3 * reticular + 0.5 * kerley, 0.0, 1.0) * lung


def _atelectasis_band(x, y, p, a: _Anatomy):
    """Plate-like band just above the (elevated) dome."""
    side = p["side"]
    cy = a.dome_y[side] - p["elevation"] - 0.10
    # On the left the base beside the heart is narrow: a shorter plate, further out.
    cx, length = (0.42, p["length"]) if side == RIGHT else (0.60, 0.7 * p["length"])
    sdf = _ellipse_sdf(x, y, side * cx, cy, length / 2, p["thickness"] / 2, p["tilt"])
    return _soft(sdf, 0.008)


def _devices(x, y, p):
    """Radiopaque devices: endotracheal tube, central venous line, pacemaker with its lead."""
    out = np.zeros_like(x)
    if "ett" in p["kinds"]:
        tube = _soft(np.abs(x + 0.01) - 0.011, 0.004) * _soft(y - p["ett_tip"], 0.004)
        out += 0.9 * tube
    if "line" in p["kinds"]:
        sd = p["line_side"]
        path = [(sd * 0.75, -0.72), (sd * 0.45, -0.62), (sd * 0.18, -0.55), (-0.06, -0.40), (-0.07, -0.05)]
        out += 0.8 * _soft(_polyline_distance(x, y, path) - 0.007, 0.003)
    if "pacer" in p["kinds"]:
        box = np.maximum(np.abs(x - 0.52) - 0.08, np.abs(y + 0.55) - 0.055)
        out += 1.4 * _soft(box, 0.006)
        lead = [(0.46, -0.52), (0.25, -0.45), (0.0, -0.35), (-0.05, 0.05), (0.15, 0.30), (0.28, 0.36)]
        out += 0.8 * _soft(_polyline_distance(x, y, lead) - 0.006, 0.003)
    return out


# ----------------------------------------------------------------------------- composition


def _density(x, y, a: _Anatomy, f: dict) -> np.ndarray:
    """Total attenuation at upright coordinates (x, y): soft tissue + organs + bone - air + findings."""
    if "Cardiomegaly" in f:
        a.heart_rx *= f["Cardiomegaly"]["widen"]
        a.heart_ry *= f["Cardiomegaly"]["taller"]
        a.heart_cx += 0.05
        a.heart_cy += 0.02
    if "Enlarged Cardiomediastinum" in f:
        a.mediastinum_w += f["Enlarged Cardiomediastinum"]["widen"]
        a.knob_r *= 1.35

    body = _body(x, y, a)
    heart = _heart(x, y, a)
    mediastinum = _mediastinum(x, y, a)
    hidden = np.maximum(heart, mediastinum)  # the lung behind the heart barely shows on PA
    # Below the domes X-rays cross liver and spleen: as white as the heart.
    abdomen = _soft(np.minimum(_dome(x, RIGHT, a), _dome(x, LEFT, a)) + 0.03 - y, 0.02)

    elevation = {RIGHT: 0.0, LEFT: 0.0}
    if "Atelectasis" in f:
        elevation[f["Atelectasis"]["side"]] = f["Atelectasis"]["elevation"]

    air = np.zeros_like(x)  # 1 where X-rays cross aerated lung
    markings = np.zeros_like(x)  # vessels, only where lung tissue (not free pleural air) is
    extra = np.zeros_like(x)  # densities added by findings
    for side in (RIGHT, LEFT):
        lung_sdf = _lung_sdf(x, y, side, a, elevation[side])
        lung = _soft(lung_sdf, 0.01) * (1.0 - hidden)
        tissue = lung
        if side in f.get("Pneumothorax", {}):
            rho = f["Pneumothorax"][side]
            ax, ay = side * 0.12, 0.38  # the lung retracts toward its inferomedial corner
            col_sdf = rho * _lung_sdf(ax + (x - ax) / rho, ay + (y - ay) / rho, side, a, elevation[side])
            tissue = _soft(col_sdf, 0.01) * lung
            pleural_line = np.exp(-((col_sdf / 0.007) ** 2)) * lung
            extra += 0.10 * pleural_line + 0.03 * tissue - 0.13 * (lung - tissue)
        markings += tissue * _vessels(x, y, side, a)
        extra += 0.20 * np.exp(-(((x - side * 0.19) / 0.07) ** 2) - ((y + 0.02) / 0.12) ** 2) * (1 - hidden)
        if side in f.get("Pleural Effusion", {}):
            fluid = _effusion(x, y, side, f["Pleural Effusion"][side], a)
            lung = lung * (1.0 - fluid)
            extra += 0.08 * fluid
        air += lung

    opacity = np.zeros_like(x)  # fraction of lung air replaced by fluid/tissue
    lung_any = np.clip(air, 0.0, 1.0)
    for name in ("Consolidation", "Pneumonia", "Lung Opacity"):
        if name in f:
            opacity = np.maximum(opacity, _patch(x, y, f[name], lung_any))
    if "Lung Lesion" in f:
        p = f["Lung Lesion"]
        nodule = _soft(_ellipse_sdf(x, y, p["cx"], p["cy"], p["r"], p["r"]), 0.006)
        opacity = np.maximum(opacity, 0.95 * nodule)
        extra += 0.1 * nodule
    if "Edema" in f:
        opacity = np.maximum(opacity, _edema(x, y, f["Edema"]["strength"], a, lung_any))
    if "Atelectasis" in f:
        opacity = np.maximum(opacity, 0.95 * _atelectasis_band(x, y, f["Atelectasis"], a) * lung_any)
    air = air * (1.0 - opacity)
    extra += 0.05 * opacity

    fracture = f.get("Fracture")
    density = (
        0.55 * body
        + 0.26 * hidden
        + 0.12 * body * abdomen
        - 0.40 * air
        + 0.12 * markings * air
        + body * (1.0 - 0.5 * hidden) * (0.11 * _ribs(x, y, a, fracture) + 0.08 * _spine(x, y, a))
        + body * 0.16 * _clavicles(x, y)
        + 0.12 * _humeral_heads(x, y, a)
        - 0.25 * _trachea(x, y)
        + extra
    )
    if "Support Devices" in f:
        density += _devices(x, y, f["Support Devices"])
    return density


def _check(findings: Collection[str], size: int) -> frozenset:
    """Validate the arguments of `render_phantom`; 'No Finding' is accepted and draws nothing."""
    if isinstance(findings, str):
        raise ValueError(f"findings must be a collection of names, got the string {findings!r}")
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}")
    for name in findings:
        if name != "No Finding" and name not in RENDERED_FINDINGS:
            raise ValueError(
                f"unknown or unrendered finding {name!r}; valid names: {', '.join(RENDERED_FINDINGS)} (or 'No Finding')"
            )
    return frozenset(findings) - {"No Finding"}


def render_phantom(
    findings: Collection[str], posture: Posture = Posture(), size: int = 64, seed: int = 0
) -> np.ndarray:
    """A PA chest radiograph with `findings` seen in `posture`: float32 [size, size] in [0, 1]."""
    wanted = _check(findings, size)
    anatomy = _sample_anatomy(np.random.default_rng([seed, 0]))

    # Pixel centres in [-1, 1] as affine_grid(align_corners=False) places them, then q = M p.
    p = (2.0 * np.arange(size) + 1.0) / size - 1.0
    px, py = np.meshgrid(p, p)
    m = posture_matrix(torch.tensor(posture.as_array()[None], dtype=torch.float64))[0].numpy()
    # float32 fields: half the memory traffic of float64, far more precision than 8-bit images need
    x = (m[0, 0] * px + m[0, 1] * py + m[0, 2]).astype(np.float32)
    y = (m[1, 0] * px + m[1, 1] * py + m[1, 2]).astype(np.float32)

    density = _density(x, y, anatomy, _sample_findings(wanted, seed))
    # Film response: roughly linear for tissue, saturating for bone and metal.
    image = (1.0 - np.exp(-1.8 * density)) / (1.0 - np.exp(-1.8 * 1.5))
    image = anatomy.brightness + anatomy.contrast * image
    noise_rng = np.random.default_rng([seed, _NOISE_STREAM])
    image = image + anatomy.noise_std * noise_rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def canonical_image(size: int = 64, n: int = 500, seed: int = 0) -> np.ndarray:
    """Mean of n upright 'No Finding' phantoms (seeds seed .. seed+n-1): the CXRL alignment target."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    total = np.zeros((size, size), dtype=np.float64)
    for s in range(seed, seed + n):
        total += render_phantom((), Posture(), size=size, seed=s)
    return (total / n).astype(np.float32)
