"""One small registry type for everything found by name: datasets kinds, backbones,
methods, defects.

A registry only stores entries and looks them up; the modules that define the
entries register them (``@REGISTRY.register("name")``), and a package that wants
all of them known imports its modules. So a registry never imports what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nagl.errors import NaglError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; ``what`` names the kind in error messages."""

    def __init__(self, what: str):
        self.what = what
        self.entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (once)."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate

    def add(self, name: str, entry: T) -> None:
        if name in self.entries:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self.entries[name] = entry

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise NaglError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        return self.entries[name]

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)
