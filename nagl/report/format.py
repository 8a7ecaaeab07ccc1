"""How numbers are written in the report. A missing value is always "—", never 0."""

from __future__ import annotations

MISSING = "—"


def fmt_stat(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``mean ± std``; the std is left out when undefined (a single seed)."""
    if mean is None:
        return MISSING
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_number(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:,.{digits}f}"


def fmt_params(value: int | None) -> str:
    """Parameter counts: exact below 10 000, else in thousands or millions."""
    if value is None:
        return MISSING
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f} M"
    if value >= 10_000:
        return f"{value / 1_000:.1f} k"
    return f"{value:,}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 3600:
        return f"{value / 3600:.2f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def shot_label(k_normal: int, k_abnormal: int) -> str:
    """A shot setting as shown everywhere: ``4N + 1A`` (normal + abnormal references)."""
    return f"{k_normal}N + {k_abnormal}A"


def sort_key(value: float | int | None) -> str:
    """The ``data-sort`` attribute of a numeric cell; empty for missing (sorted last)."""
    return "" if value is None else repr(round(float(value), 9))
