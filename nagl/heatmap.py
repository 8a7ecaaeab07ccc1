"""The colour ramp of every rendered anomaly map (report gallery, `nagl predict` overlays)."""

from __future__ import annotations

import numpy as np

# Dark to bright (five stops of the "inferno" palette), interpolated linearly.
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], float)


def heat_rgb(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` ``(H, W)`` scaled to [low, high] and coloured with the ramp, uint8 RGB."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(RAMP) - 1)
    lower = np.floor(scaled).astype(int).clip(0, len(RAMP) - 2)
    frac = (scaled - lower)[..., None]
    return (RAMP[lower] * (1 - frac) + RAMP[lower + 1] * frac).round().astype(np.uint8)
