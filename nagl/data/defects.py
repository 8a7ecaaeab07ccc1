"""Generated defects with exact pixel masks (the embedded benchmark's anomalies).

Every defect is drawn the same way: choose a *region* (a boolean mask), compute
the *content* the region should show, and blend it in with a weight ``alpha``
that is zero outside the region::

    out = round(clean + alpha * (content - clean))

so every pixel outside the mask is exactly the defect-free image, and the mask
is exactly the region the defect was painted into. A draw whose region is too
small or barely changes the pixels is redrawn (with the same generator, so the
result stays deterministic).

All randomness comes from the ``numpy.random.Generator`` passed in; nothing
here depends on global state, threads or iteration order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nagl.registry import Registry

# At least this share of a region's pixels must really change, by this much on
# average, else the defect is redrawn.
MIN_CHANGED_SHARE = 0.5
MIN_REGION_PIXELS = 12
MIN_MEAN_CHANGE = 3.0  # grey levels, averaged over the region and channels
MAX_TRIES = 50
# Defects are centred at least this far from the border (a defect cut by the frame is
# mostly outside the image).
MIN_MARGIN = 20


@dataclass(frozen=True)
class Context:
    """What a defect may use besides the clean image.

    ``allowed``: where a defect may sit (e.g. on the object, inside the fundus),
    or None for anywhere; centres are drawn inside it, and lesion, colour and
    missing-material regions are clipped to it. ``foreign``: a defect-free image of another
    material, same size as the clean one, for pasted-texture defects.
    ``scale``: multiplies every defect size (1.0 = the ranges below).
    ``contrast``: multiplies every defect strength (capped at full strength).
    """

    allowed: np.ndarray | None = None
    foreign: np.ndarray | None = None
    scale: float = 1.0
    contrast: float = 1.0


@dataclass(frozen=True)
class Paint:
    """One drawn defect before blending: region, per-pixel weight and content."""

    region: np.ndarray  # bool (H, W)
    alpha: np.ndarray  # float (H, W), 0 outside region, in (0, 1] inside
    content: np.ndarray  # float (H, W, 3)


DefectFn = Callable[[np.ndarray, np.random.Generator, Context], Paint]
DEFECTS: Registry[DefectFn] = Registry("defect")
register_defect = DEFECTS.register


def apply_defect(name: str, clean: np.ndarray, rng: np.random.Generator,
                 context: Context | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paint defect ``name`` into ``clean`` (HxWx3 uint8); return ``(image, mask)``.

    ``image`` equals ``clean`` at every pixel where ``mask`` is False.
    """
    paint_defect = DEFECTS.get(name)
    context = context or Context()
    base = clean.astype(np.float64)
    for _ in range(MAX_TRIES):
        paint = paint_defect(base, rng, context)
        if paint.region.sum() < MIN_REGION_PIXELS:
            continue
        alpha = np.where(paint.region, paint.alpha, 0.0)[..., None]
        out = np.clip(np.rint(base + alpha * (paint.content - base)), 0, 255).astype(np.uint8)
        changed = (out != clean).any(axis=-1)
        mean_change = np.abs(out[paint.region].astype(np.float64) - base[paint.region]).mean()
        if changed[paint.region].mean() >= MIN_CHANGED_SHARE and mean_change >= MIN_MEAN_CHANGE:
            return out, paint.region.copy()
    raise RuntimeError(f"defect {name!r}: no visible draw in {MAX_TRIES} tries")


# ---------------------------------------------------------------- regions


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return yy.astype(np.float64), xx.astype(np.float64)


def pick_center(shape: tuple[int, int], rng: np.random.Generator, allowed: np.ndarray | None,
                margin: int) -> tuple[float, float]:
    """A centre at least ``margin`` pixels from the border, inside ``allowed`` if given."""
    height, width = shape
    margin = min(max(margin, MIN_MARGIN), height // 4, width // 4)
    inner = np.zeros(shape, dtype=bool)
    inner[margin:height - margin, margin:width - margin] = True
    if allowed is not None and (allowed & inner).any():
        inner &= allowed
    ys, xs = np.nonzero(inner)
    k = int(rng.integers(len(ys)))
    return float(ys[k]) + rng.uniform(-0.5, 0.5), float(xs[k]) + rng.uniform(-0.5, 0.5)


def blob_region(shape: tuple[int, int], center: tuple[float, float], radius: float,
                rng: np.random.Generator, irregularity: float = 0.25,
                max_elongation: float = 1.8) -> np.ndarray:
    """An irregular, possibly elongated blob: a wobbly ellipse of mean ``radius``."""
    yy, xx = _grid(shape)
    dy, dx = yy - center[0], xx - center[1]
    angle = rng.uniform(0, np.pi)
    elongation = rng.uniform(1.0, max_elongation)
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / np.sqrt(elongation)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) * np.sqrt(elongation)
    theta = np.arctan2(v, u)
    boundary = np.ones(shape)
    for k in range(2, 6):
        boundary += rng.uniform(-irregularity, irregularity) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius * np.clip(boundary, 0.3, None)


def curve_points(center: tuple[float, float], length: float, bend: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Points (N, 2) along a quadratic Bezier curve through ``center``."""
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([direction[1], -direction[0]])
    c = np.asarray(center)
    p0, p2 = c - direction * length / 2, c + direction * length / 2
    p1 = c + normal * bend * length * rng.uniform(-1, 1)
    t = np.linspace(0, 1, max(8, int(length * 3)))[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def curve_region(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    """Pixels within ``width / 2`` of a polyline's sample points."""
    seeds = np.ones(shape, dtype=bool)
    ij = np.rint(points).astype(int)
    inside = (ij[:, 0] >= 0) & (ij[:, 0] < shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < shape[1])
    ij = ij[inside]
    if len(ij) == 0:
        return np.zeros(shape, dtype=bool)
    seeds[ij[:, 0], ij[:, 1]] = False
    return ndimage.distance_transform_edt(seeds) <= max(width / 2, 0.5)


def feathered(region: np.ndarray, feather: float) -> np.ndarray:
    """Weight rising from the region's edge to 1 over ``feather`` pixels (0 outside)."""
    if feather <= 0:
        return region.astype(np.float64)
    depth = ndimage.distance_transform_edt(region)
    return np.where(region, np.clip((depth + 0.5) / feather, 0.0, 1.0), 0.0)


def smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Low-frequency noise in [0, 1] (Gaussian-filtered white noise, rescaled)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    low, high = field.min(), field.max()
    return (field - low) / (high - low + 1e-12)


def _grain(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Sensor-like noise so painted content does not look unnaturally smooth."""
    return rng.normal(0.0, sigma, size=shape)


def _strength(rng: np.random.Generator, low: float, high: float, context: Context) -> float:
    return float(min(1.0, rng.uniform(low, high) * context.contrast))


def _size(rng: np.random.Generator, low: float, high: float, context: Context) -> float:
    """Log-uniform size, so small and large defects are equally common."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high)))) * context.scale


# ---------------------------------------------------------------- defects


@register_defect("scratch")
def scratch(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A thin curved line, darker or lighter than the surface."""
    shape = clean.shape[:2]
    length = _size(rng, 30, 140, context)
    center = pick_center(shape, rng, context.allowed, margin=int(length / 4))
    points = curve_points(center, length, bend=0.3, rng=rng)
    region = curve_region(shape, points, width=rng.uniform(1.5, 4.5))
    strength = _strength(rng, 0.3, 0.8, context)
    target = rng.uniform(0, 40) if rng.random() < 0.6 else rng.uniform(215, 255)
    content = np.full_like(clean, target) + _grain(clean.shape, rng, 3.0)
    return Paint(region, feathered(region, 1.5) * strength, content)


@register_defect("hole")
def hole(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """Missing material: a dark cavity with a lit rim on one side."""
    shape = clean.shape[:2]
    radius = _size(rng, 5, 28, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius))
    region = blob_region(shape, center, radius, rng, irregularity=0.35)
    yy, xx = _grid(shape)
    light = rng.uniform(0, 2 * np.pi)
    slope = ((yy - center[0]) * np.sin(light) + (xx - center[1]) * np.cos(light)) / max(radius, 1.0)
    depth = rng.uniform(0.1, 0.45)
    shade = np.clip(depth + 0.25 * slope, 0.05, 1.0)[..., None]
    content = ndimage.gaussian_filter(clean, (3.0, 3.0, 0)) * shade + _grain(clean.shape, rng, 2.0)
    strength = _strength(rng, 0.6, 1.0, context)
    return Paint(region, feathered(region, 2.0) * strength, content)


@register_defect("stain")
def stain(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A soft-edged discolouration (liquid, dirt, uneven staining)."""
    shape = clean.shape[:2]
    radius = _size(rng, 10, 45, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius / 2))
    region = blob_region(shape, center, radius, rng, irregularity=0.4)
    tint = rng.uniform(0.3, 1.2, size=3)
    tint /= max(tint.max(), 1.0)
    content = clean * tint
    strength = _strength(rng, 0.5, 1.0, context)
    alpha = feathered(region, radius * 0.5) * (0.6 + 0.4 * smooth_noise(shape, rng, radius / 4))
    return Paint(region, alpha * strength, content)


@register_defect("foreign")
def foreign(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A patch of another material pasted in, brightness matched to its surroundings."""
    if context.foreign is None:
        raise ValueError("defect 'foreign' needs context.foreign (an image of another material)")
    shape = clean.shape[:2]
    radius = _size(rng, 14, 45, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius / 2))
    region = blob_region(shape, center, radius, rng, irregularity=0.3)
    other = context.foreign.astype(np.float64)
    # Pull the pasted patch's mean colour part of the way to the surface it covers.
    if region.any():
        other = other + rng.uniform(0.3, 0.8) * (clean[region].mean(axis=0) - other[region].mean(axis=0))
    strength = _strength(rng, 0.65, 1.0, context)
    return Paint(region, feathered(region, 2.5) * strength, other)


@register_defect("dark_lesion")
def dark_lesion(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A dark, mottled spot (haemorrhage, necrosis, debris)."""
    return _lesion(clean, rng, context, dark=True)


@register_defect("bright_lesion")
def bright_lesion(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A bright, yellowish, mottled spot (exudate, deposit, inclusion)."""
    return _lesion(clean, rng, context, dark=False)


def _lesion(clean: np.ndarray, rng: np.random.Generator, context: Context, dark: bool) -> Paint:
    shape = clean.shape[:2]
    radius = _size(rng, 4, 22, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius))
    region = blob_region(shape, center, radius, rng, irregularity=0.45)
    if context.allowed is not None:
        region &= context.allowed
    if dark:
        content = clean * rng.uniform(0.3, 0.65) * np.array([1.0, rng.uniform(0.6, 0.95), rng.uniform(0.6, 0.95)])
    else:
        content = clean + (255.0 - clean) * rng.uniform(0.35, 0.8) * np.array([1.0, 0.95, rng.uniform(0.3, 0.8)])
    mottle = 0.55 + 0.45 * smooth_noise(shape, rng, max(radius / 5, 1.0))
    strength = _strength(rng, 0.7, 1.0, context)
    return Paint(region, feathered(region, max(radius * 0.35, 1.0)) * mottle * strength, content)


@register_defect("colour")
def colour(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A sharp-edged patch of wrong colour (paint, print or dye fault)."""
    shape = clean.shape[:2]
    radius = _size(rng, 8, 35, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius / 2))
    region = blob_region(shape, center, radius, rng, irregularity=0.2)
    if context.allowed is not None:
        region &= context.allowed
    gray = clean.mean(axis=-1, keepdims=True)
    hue = rng.uniform(40, 215, size=3)
    content = gray * 0.5 + hue * (gray / 255.0 + 0.5) * 0.5
    strength = _strength(rng, 0.3, 0.8, context)
    return Paint(region, feathered(region, 1.5) * strength, content)


@register_defect("missing")
def missing(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A chipped-off piece: the detail is gone and the area is smeared flat."""
    shape = clean.shape[:2]
    radius = _size(rng, 8, 32, context)
    center = pick_center(shape, rng, context.allowed, margin=int(radius))
    region = blob_region(shape, center, radius, rng, irregularity=0.4)
    if context.allowed is not None:
        region &= context.allowed
    smeared = ndimage.gaussian_filter(clean, (radius * 0.6, radius * 0.6, 0), mode="reflect")
    content = smeared * rng.uniform(0.75, 1.15) + _grain(clean.shape, rng, 2.0)
    strength = _strength(rng, 0.7, 1.0, context)
    return Paint(region, feathered(region, 2.0) * strength, content)


@register_defect("deformation")
def deformation(clean: np.ndarray, rng: np.random.Generator, context: Context) -> Paint:
    """A local swirl or bulge of the surface. The mask is where pixels moved >= 0.5 px."""
    shape = clean.shape[:2]
    radius = _size(rng, 18, 50, context)
    # Bend something: centre the warp where the image has structure (edges, vessels).
    gray = clean.mean(axis=-1)
    energy = ndimage.gaussian_filter(np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)), radius / 4)
    structured = energy >= np.quantile(energy, 0.7)
    if context.allowed is not None:
        structured &= context.allowed
    center = pick_center(shape, rng, structured, margin=int(radius / 2))
    yy, xx = _grid(shape)
    dy, dx = yy - center[0], xx - center[1]
    r = np.hypot(dy, dx)
    falloff = np.clip(1.0 - r / radius, 0.0, 1.0) ** 2
    if rng.random() < 0.5:  # swirl
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.2) * min(1.0, context.contrast) * falloff
        src_y = center[0] + dy * np.cos(turn) - dx * np.sin(turn)
        src_x = center[1] + dy * np.sin(turn) + dx * np.cos(turn)
    else:  # bulge (magnify) or pinch
        amount = rng.choice([-1.0, 1.0]) * rng.uniform(0.45, 0.8) * min(1.0, context.contrast) * falloff
        src_y = center[0] + dy * (1.0 - amount)
        src_x = center[1] + dx * (1.0 - amount)
    region = np.hypot(src_y - yy, src_x - xx) >= 0.5
    warped = np.stack([ndimage.map_coordinates(clean[..., c], [src_y, src_x], order=1, mode="reflect")
                       for c in range(clean.shape[2])], axis=-1)
    return Paint(region, region.astype(np.float64), warped)
