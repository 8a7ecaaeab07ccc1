"""The method registry: names -> method classes, building and restoring methods.

A method module registers its class with ``@register_method`` (the class's
``name``); :mod:`nagl.methods` imports every module of the package, so a new
method file is all it takes for the method to be known.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nagl.errors import NaglError
from nagl.methods.base import Method, checkpoint_files, read_checkpoint_config
from nagl.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    METHODS.add(cls.name, cls)
    return cls


def list_methods() -> list[str]:
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def is_trainable(name: str) -> bool:
    return method_class(name).trainable


def create_method(name: str, dim: int, **config: Any) -> Method:
    """A fresh method for features of width ``dim``; ``config`` are its settings
    (``nagl``: ``proxies`` = 25, ``heads`` = 4 at most, ``seed`` for the initial weights)."""
    cls = method_class(name)
    try:
        return cls(dim, **config)
    except TypeError as error:
        raise NaglError(f"method {name!r}: bad settings {sorted(config)}: {error}") from error


def load_method(path: str | Path) -> Method:
    """A method restored from a checkpoint folder (or its ``weights.safetensors`` / ``model.json``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, _ = checkpoint_files(path)
    info = read_checkpoint_config(path)
    method = create_method(info["method"], info["dim"], **info.get("config", {}))
    if weights.is_file():
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as error:
            raise NaglError(f"checkpoint weights {weights} are unreadable: {error}; retrain or restore them") from error
        method.load_state_dict(state)
    elif method.trainable:
        raise NaglError(f"checkpoint {weights} is missing; {info['method']} needs its trained weights")
    return method


def feature_levels(methods: Sequence[str], backbone: Any) -> tuple[str, ...]:
    """The union of the cached levels the ``methods`` read on ``backbone`` (empty: the default grid only)."""
    return tuple(dict.fromkeys(level for name in methods for level in method_class(name).feature_levels(backbone)))
