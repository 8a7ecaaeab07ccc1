"""The dataset builders package: importing it registers every builder.

Each module of this package registers one or more builders with
``@register_builder(kind)`` (:mod:`nagl.data.registry`); adding a module is all it
takes for its kinds to be known. The older builder modules (``converters``,
``embedded``) are imported here too. Look builders up with :func:`builder_for`.
"""

from __future__ import annotations

import importlib
import pkgutil

from nagl.data import converters, embedded  # noqa: F401  (their import registers builders)
from nagl.data.registry import BUILDERS, Builder

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def builder_for(kind: str) -> Builder:
    """The builder registered for datasets of ``kind``."""
    return BUILDERS.get(kind)
