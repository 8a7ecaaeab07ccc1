"""Anomaly-detection methods behind one interface.

``create_method(name, dim, **config)`` builds a method for features of width
``dim``; ``load_method(path)`` restores one from a checkpoint folder. Names:
``nagl`` (trainable), ``knn-normal`` and ``knn-naive`` (training-free).
"""

from __future__ import annotations

from typing import Any

from nagl.errors import NaglError
from nagl.methods.base import Method, anomaly_maps, image_scores, load_method
from nagl.methods.knn import KnnNaive, KnnNormal
from nagl.methods.nagl import NaglMethod

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (NaglMethod, KnnNormal, KnnNaive)}


def list_methods() -> list[str]:
    return list(METHODS)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise NaglError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def create_method(name: str, dim: int, **config: Any) -> Method:
    """A fresh method for features of width ``dim``; ``config`` are its settings
    (``nagl``: ``proxies`` = 25, ``heads`` = 4 at most, ``seed`` for the initial weights)."""
    cls = method_class(name)
    try:
        return cls(dim, **config)
    except TypeError as error:
        raise NaglError(f"method {name!r}: bad settings {sorted(config)}: {error}") from error


__all__ = ["Method", "METHODS", "anomaly_maps", "create_method", "image_scores", "list_methods",
           "load_method", "method_class"]
