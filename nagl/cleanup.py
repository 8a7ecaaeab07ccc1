"""Removing the temporaries that an interrupted run left behind.

Only names that the atomic-write helpers of :mod:`nagl.io` create
(:data:`nagl.io.TEMP_PATTERNS`) are removed, only under the platform's own
folders, and only by a process that holds the run lock: `nagl run` holds it for
the whole run, and `nagl datasets prepare` takes it when it is free (when it is
not, a run is going, and that run cleaned up when it started). So a temporary of
a run that is still going is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nagl.io import is_temporary_name

if TYPE_CHECKING:
    from nagl.config import RunConfig

log = logging.getLogger(__name__)


def run_lock_path(workdir: str | os.PathLike) -> Path:
    """The lock that one `nagl run` (or a standalone `nagl datasets prepare`) holds."""
    return Path(workdir) / ".snakemake" / "nagl-run.lock"


@contextlib.contextmanager
def try_run_lock(workdir: str | os.PathLike) -> Iterator[bool]:
    """Hold the run lock for the ``with`` block if it is free; yield whether it is held."""
    path = run_lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def stale_temporaries(roots: Iterable[str | os.PathLike], prefixes: Iterable[str] | None = None,
                      recursive: bool = True) -> list[Path]:
    """Every temporary of :mod:`nagl.io` under ``roots`` (a temporary folder is listed, not entered).

    ``prefixes``: keep only names starting with one of them (e.g. ``.<dataset>.``);
    ``recursive=False``: look only at the entries of each root itself.
    """
    prefixes = tuple(prefixes) if prefixes is not None else None
    found = []
    for root in roots:
        if not Path(root).is_dir():
            continue
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                if is_temporary_name(name) and (prefixes is None or name.startswith(prefixes)):
                    found.append(Path(folder) / name)
            dirs[:] = [d for d in dirs if recursive and not is_temporary_name(d)]
    return sorted(set(found))


def remove_stale_temporaries(roots: Iterable[str | os.PathLike], prefixes: Iterable[str] | None = None,
                             recursive: bool = True) -> list[Path]:
    """Delete :func:`stale_temporaries`; call only while holding the run lock. Returns what was removed."""
    removed = []
    for path in stale_temporaries(roots, prefixes, recursive):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.warning("removed %d temporary file(s)/folder(s) left by an interrupted run, e.g. %s",
                    len(removed), removed[0])
    return removed


def platform_folders(config: RunConfig, workdir: str | os.PathLike) -> list[Path]:
    """The project's folders whose temporaries the platform owns: datasets, downloads, cache, results, report.

    A folder outside the project (``NAGL_CACHE``, the weights in the home folder)
    may be shared with another project's run, which this project's lock does not
    cover, so it is left alone.
    """
    from nagl.settings import cache_dir, datasets_dir, downloads_dir

    workdir = Path(workdir).resolve()
    folders = [datasets_dir(), downloads_dir(), cache_dir(), workdir / config.results,
               (workdir / config.report).parent]
    inside = []
    for folder in folders:
        folder = (workdir / folder).resolve()
        if workdir in folder.parents and folder not in inside:
            inside.append(folder)
    return inside


def clean_before_run(config: RunConfig, workdir: str | os.PathLike) -> list[Path]:
    """At the start of `nagl run`, under its lock: every stale temporary of the project's folders."""
    return remove_stale_temporaries(platform_folders(config, workdir))


def clean_before_prepare(names: Iterable[str]) -> list[Path]:
    """At the start of `nagl datasets prepare` holding the run lock: the stale staging of these datasets.

    Only the top level of the datasets folder: that is where prepare stages a dataset.
    """
    from nagl.settings import datasets_dir

    prefixes = [prefix for name in names for prefix in (f".{name}.", f".{name}-extract.")]
    return remove_stale_temporaries([datasets_dir()], prefixes, recursive=False)
