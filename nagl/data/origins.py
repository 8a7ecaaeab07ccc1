"""Where each file of a dataset being prepared came from, so that errors name the user's file.

A builder writes into a staging folder, from a scratch copy of an archive or
from the user's folder, and normalisation may turn ``x.jpg`` into ``x.png``: a
path in the staging folder means nothing to the user. While
:func:`recording` is active, builders :func:`record` each file they place and
archive extraction registers its scratch folder (:func:`extracted_from`);
``prepare`` then names, for each problem, the source file: a path in the
user's folder, or a member of the archive.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path, PurePosixPath


class Origins:
    """Staged file (relative, without its extension) -> description of its source."""

    def __init__(self, staging: Path):
        self.staging = Path(staging)
        self.sources: dict[str, str] = {}
        self.archives: dict[Path, Path] = {}  # scratch folder of an extracted archive -> the archive

    def describe(self, source: Path) -> str:
        """``source`` as the user knows it: a member of an archive, or the path itself."""
        source = Path(source)
        for root, archive in self.archives.items():
            if source == root or root in source.parents:
                return f"{source.relative_to(root).as_posix()} in {archive}"
        return str(source)

    def of(self, staged: str) -> str | None:
        """The source of a staged file given relative to the staging folder, or None if unknown."""
        return self.sources.get(_key(staged))


def _key(relative: str) -> str:
    return PurePosixPath(relative).with_suffix("").as_posix()


_CURRENT: contextvars.ContextVar[Origins | None] = contextvars.ContextVar("nagl_origins", default=None)


@contextlib.contextmanager
def recording(staging: Path) -> Iterator[Origins]:
    """Collect the origins of the files placed in ``staging`` during the ``with`` block."""
    origins = Origins(staging)
    token = _CURRENT.set(origins)
    try:
        yield origins
    finally:
        _CURRENT.reset(token)


def record(staged: Path, source: Path) -> None:
    """Note that ``staged`` (a path in the staging folder) was made from ``source``."""
    origins = _CURRENT.get()
    if origins is None:
        return
    try:
        relative = Path(staged).relative_to(origins.staging).as_posix()
    except ValueError:
        return
    origins.sources[_key(relative)] = origins.describe(source)


def extracted_from(root: Path, archive: Path) -> None:
    """Files under ``root`` are members of ``archive``."""
    origins = _CURRENT.get()
    if origins is not None:
        origins.archives[Path(root)] = Path(archive)


def describe(source: Path) -> str:
    """``source`` as the user knows it (see :meth:`Origins.describe`); the path itself outside prepare."""
    origins = _CURRENT.get()
    return origins.describe(source) if origins is not None else str(source)
