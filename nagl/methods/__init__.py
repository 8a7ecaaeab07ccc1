"""Anomaly-detection methods behind one interface.

``create_method(name, dim, **config)`` builds a method for features of width
``dim``; ``load_method(path)`` restores one from a checkpoint folder. Each module
of this package defines a method and registers it with ``@register_method``;
importing the package imports them all. Today: ``nagl`` (trainable),
``knn-normal`` and ``knn-naive`` (training-free).
"""

from __future__ import annotations

import importlib
import pkgutil

from nagl.methods.base import Method, TrainableMethod, anomaly_maps, image_scores
from nagl.methods.registry import (
    METHODS,
    create_method,
    feature_levels,
    is_trainable,
    list_methods,
    load_method,
    method_class,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "TrainableMethod", "anomaly_maps", "create_method", "feature_levels", "image_scores",
           "is_trainable", "list_methods", "load_method", "method_class", "register_method"]
