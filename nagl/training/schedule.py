"""Training schedules: how long and how a method is trained, and which epoch is kept.

The generic profiles below serve every method; a method may register its own
schedule for a profile name (``register_profile(method, name, Schedule)``, next to
its class), which :func:`schedule_for` then prefers. A method's own hyper-parameters
(losses, head size) live with the method in ``nagl/methods/<name>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from nagl.errors import NaglError


@dataclass(frozen=True)
class Schedule:
    """Everything the loop needs to know (hashed into the checkpoint's metadata).

    An epoch is ``episodes`` episodes, in optimiser steps (AdamW) of ``batch``
    episodes; the learning rate is multiplied by ``gamma`` at each of ``milestones``.
    ``normal_shots`` / ``abnormal_shots``: the shot counts the model is trained for
    (one model serves them all). ``select``: ``last`` (the last epoch), ``best``
    (lowest loss on ``val_episodes`` episodes whose queries are a held-out share
    ``val_fraction`` of the source) or ``auroc`` (highest image AUROC of the held-out
    source images against ``val_references`` reference draws per category,
    :mod:`nagl.training.selection`).
    """

    profile: str
    epochs: int
    episodes: int
    batch: int
    lr: float
    weight_decay: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    normal_shots: tuple[int, ...] = (1, 2, 4)
    abnormal_shots: tuple[int, ...] = (1,)
    select: str = "last"
    val_fraction: float = 0.0
    val_episodes: int = 0
    val_references: int = 0

    def check(self) -> None:
        where = f"training profile {self.profile!r}"
        for name in ("epochs", "episodes", "batch"):
            if int(getattr(self, name)) < 1:
                raise NaglError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("normal_shots", "abnormal_shots"):
            counts = getattr(self, name)
            if not counts or min(counts) < 1:
                raise NaglError(f"{where}: {name} must be a non-empty list of counts >= 1, got {list(counts)}")
        if self.select not in SELECTIONS:
            raise NaglError(f"{where}: select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise NaglError(f"{where}: val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.select == "best" and (self.val_fraction <= 0 or self.val_episodes < 1):
            raise NaglError(f"{where}: select='best' needs val_fraction > 0 and val_episodes >= 1")
        if self.select == "auroc" and (self.val_fraction <= 0 or self.val_references < 1):
            raise NaglError(f"{where}: select='auroc' needs val_fraction > 0 and val_references >= 1")
        if self.lr <= 0:
            raise NaglError(f"{where}: lr must be > 0, got {self.lr}")


# How the checkpoint is chosen: the last epoch, the lowest validation loss, the highest
# held-out source image AUROC.
SELECTIONS = ("last", "best", "auroc")

PROFILES: dict[str, Schedule] = {
    # About a minute of compute on 2 CPU cores with cached effnet-lite0 features
    # (80 steps of 8 episodes); see docs/methods.md for how it was chosen. The checkpoint
    # is the epoch with the highest image AUROC of the held-out 20 % of the source
    # against 4 reference draws per category (180 scored episodes per epoch on an
    # embedded source; cost in docs/methods.md).
    "embedded": Schedule(profile="embedded", epochs=10, episodes=64, batch=8, lr=1e-3,
                         weight_decay=0.01, milestones=(8,), select="auroc",
                         val_fraction=0.2, val_references=4),
    # The paper's schedule.
    "paper": Schedule(profile="paper", epochs=20, episodes=500, batch=8, lr=1e-5,
                      weight_decay=0.01, milestones=(10, 15), select="last"),
    # A few episodes: checks the workflow end to end, learns nothing useful.
    "smoke": Schedule(profile="smoke", epochs=1, episodes=4, batch=2, lr=1e-3,
                      weight_decay=0.01, select="last"),
}


# (method, profile name) -> the method's own schedule for that profile.
METHOD_PROFILES: dict[tuple[str, str], Schedule] = {}


def register_profile(method: str, name: str, schedule: Schedule) -> Schedule:
    """Register ``method``'s own schedule for the profile ``name`` (its ``profile`` field must be ``name``)."""
    if schedule.profile != name:
        raise ValueError(f"schedule of profile {schedule.profile!r} registered as {name!r} for {method!r}")
    schedule.check()
    METHOD_PROFILES[(method, name)] = schedule
    return schedule


def list_profiles(method: str | None = None) -> list[str]:
    """The generic profiles, plus ``method``'s own (every method's own when ``method`` is None)."""
    own = [name for (m, name) in METHOD_PROFILES if method is None or m == method]
    return list(dict.fromkeys([*PROFILES, *own]))


def schedule_for(profile: str = "embedded", method: str = "nagl", **overrides: Any) -> Schedule:
    """``method``'s schedule for ``profile`` (its own, else the generic one) with ``overrides``
    (field names of :class:`Schedule`)."""
    base = METHOD_PROFILES.get((method, profile), PROFILES.get(profile))
    if base is None:
        raise NaglError(f"unknown training profile {profile!r} for method {method!r}; choose one of: "
                        f"{', '.join(list_profiles(method))}")
    known = set(Schedule.__dataclass_fields__) - {"profile"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NaglError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("milestones", "normal_shots", "abnormal_shots"):
        if key in overrides:
            overrides[key] = tuple(int(v) for v in overrides[key])
    schedule = replace(base, **overrides)
    schedule.check()
    return schedule
