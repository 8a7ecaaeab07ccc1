"""The dataset builders package: importing it registers every builder.

Each module of this package registers one or more builders with
``@register_builder(kind)``; adding a module is all it takes for its kinds to be
known. The older builder modules (``converters``, ``embedded``) are imported here too.
"""

from __future__ import annotations

import importlib
import pkgutil

from nagl.data import converters, embedded  # noqa: F401  (their import registers builders)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
