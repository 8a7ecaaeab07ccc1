"""The feature cache: frozen-backbone patch features, computed once per image.

A key space is one (backbone identity, preprocessing) pair; it lives in
``root/<hash of the pair>/`` with a ``keyspace.json`` describing it. Inside, the
features of one image are ``<sha[:2]>/<sha>.npy``: a ``(G, C)`` float16 array,
where ``sha`` is the sha256 of the image file. A named level of the backbone (for
multi-level methods) is ``<sha>.<level>.npy`` beside it (``(G_l, C_l)``; the
embedding ``<sha>.embed.npy``, ``(D,)``); a level that is a channel range of the
default grid is read from ``<sha>.npy`` and never stored twice. A backbone with other weights, size,
layers or preprocessing gets another key space, so nothing stale is ever read.

Every file is written under a temporary name and renamed into place, so two
processes that compute the same image at once both leave a complete file and a
reader never sees a partial one.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nagl.data.images import load_rgb
from nagl.errors import NaglError
from nagl.io import atomic_path, atomic_write_json, read_json, sha256_file, stable_hash
from nagl.models.backbones import DEFAULT_LEVEL, Backbone
from nagl.settings import cache_dir

KEYSPACE_FILE = "keyspace.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def default_root() -> Path:
    """Where features are cached unless told otherwise: ``cache_dir() / "features"``."""
    return cache_dir() / "features"


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise NaglError(f"{sha!r} is not a sha256 (64 lower-case hex digits); take image_sha256 "
                        f"from the dataset manifest")
    return sha


def _directory_bytes(path: Path) -> tuple[int, int]:
    """(number of feature files, total bytes of all files) under ``path``."""
    files = total = 0
    for item in path.rglob("*"):
        if item.is_file():
            total += item.stat().st_size
            files += item.suffix == ".npy" and "." not in item.stem  # images, not their extra levels
    return files, total


class FeatureCache:
    """Patch features of one backbone, keyed by image sha256, on disk as float16."""

    def __init__(self, root: str | Path, backbone: Backbone):
        self.root = Path(root)
        self.backbone = backbone
        self.key = {"identity": backbone.identity, "preprocessing": backbone.preprocessing}
        self.directory = self.root / stable_hash(self.key)
        self.shape = (backbone.grid[0] * backbone.grid[1], backbone.dim)

    def path(self, sha256: str, level: str = DEFAULT_LEVEL) -> Path:
        """The file of one image's default grid, or of its stored level ``level``."""
        sha256 = _check_sha(sha256)
        suffix = "" if level == DEFAULT_LEVEL else f".{level}"
        return self.directory / sha256[:2] / f"{sha256}{suffix}.npy"

    def contains(self, sha256: str, level: str = DEFAULT_LEVEL) -> bool:
        return self.path(sha256, level).is_file()

    def missing(self, sha256s: Sequence[str], levels: Sequence[str] = ()) -> list[str]:
        """The distinct hashes among ``sha256s`` that lack the default grid or one of ``levels``, in order."""
        files = self._files(levels)
        return [sha for sha in dict.fromkeys(sha256s) if not all(self.contains(sha, f) for f in files)]

    def _files(self, levels: Sequence[str]) -> list[str]:
        """The arrays stored per image for ``levels``: the default grid, then each level not sliced from it."""
        for name in levels:
            self.backbone.level_shape(name)  # a clear error for a level the backbone lacks
        slices = self.backbone.default_slices
        return list(dict.fromkeys([DEFAULT_LEVEL, *(n for n in levels if n not in slices)]))

    def size_bytes(self) -> int:
        """Disk space used by this key space."""
        return _directory_bytes(self.directory)[1] if self.directory.exists() else 0

    def ensure(self, paths: Sequence[str | Path], sha256s: Sequence[str], batch_size: int = 16,
               progress: bool = True, levels: Sequence[str] = ()) -> int:
        """Compute and store the features of the images not cached yet; return how many.

        ``sha256s[i]`` must be the sha256 of the file ``paths[i]`` (checked for the
        images that are computed). An image listed twice is computed once. ``levels``:
        named levels of the backbone to store as well (``"embed"`` included); whatever
        an image lacks is computed in one backbone pass.
        """
        if len(paths) != len(sha256s):
            raise NaglError(f"FeatureCache.ensure: {len(paths)} paths but {len(sha256s)} sha256 values; "
                            f"pass one hash per image")
        if batch_size < 1:
            raise NaglError(f"batch_size must be at least 1, got {batch_size}")
        files = self._files(levels)
        todo: dict[str, tuple[Path, list[str]]] = {}
        for path, sha in zip(paths, sha256s, strict=False):
            if sha not in todo:
                absent = [f for f in files if not self.contains(sha, f)]
                if absent:
                    todo[sha] = (Path(path), absent)
        if not todo:
            return 0
        self._write_keyspace()
        items = list(todo.items())
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task(f"features {self.backbone.name}", total=len(items))
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                batch = torch.stack([self.backbone.preprocess(self._read(path, sha)) for sha, (path, _) in chunk])
                needed = list(dict.fromkeys(f for _, (_, absent) in chunk for f in absent))
                if needed == [DEFAULT_LEVEL]:
                    computed = {DEFAULT_LEVEL: self.backbone(batch)}  # the single-grid path, as ever
                else:
                    computed = self.backbone.extract_levels(batch, needed)
                arrays = {name: tensor.numpy().astype(np.float16) for name, tensor in computed.items()}
                for name, array in arrays.items():
                    if not np.isfinite(array).all():
                        raise RuntimeError(f"backbone {self.backbone.identity} gave features (level {name}) that "
                                           f"do not fit in float16 for images {[str(p) for _, (p, _) in chunk]}")
                for index, (sha, (_, absent)) in enumerate(chunk):
                    for name in absent:
                        self._write(sha, arrays[name][index], name)
                bar.advance(task, len(chunk))
        return len(items)

    def load(self, sha256s: Sequence[str]) -> torch.Tensor:
        """Cached features as a float32 tensor ``(N, G, C)``, in the order of ``sha256s``."""
        self._check_cached(sha256s, ())
        out = torch.empty((len(sha256s), *self.shape), dtype=torch.float32)
        for index, sha in enumerate(sha256s):
            out[index] = torch.from_numpy(self._read_array(self.path(sha)))
        return out

    def load_levels(self, sha256s: Sequence[str], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached levels ``{name: (N, G_l, C_l)}`` (``"embed"``: ``(N, D)``), in the order of ``sha256s``."""
        names = list(dict.fromkeys(names))
        self._check_cached(sha256s, names)
        slices = self.backbone.default_slices
        out = {name: torch.empty((len(sha256s), *self.backbone.level_shape(name)), dtype=torch.float32)
               for name in names}
        for index, sha in enumerate(sha256s):
            default = None
            for name in names:
                if name in slices:
                    if default is None:
                        default = self._read_array(self.path(sha))
                    begin, end = slices[name]
                    out[name][index] = torch.from_numpy(default[:, begin:end])
                else:
                    out[name][index] = torch.from_numpy(self._read_array(self.path(sha, name), name))
        return out

    def _check_cached(self, sha256s: Sequence[str], levels: Sequence[str]) -> None:
        absent = self.missing(sha256s, levels)
        if absent:
            what = f" (levels {', '.join(levels)})" if levels else ""
            raise NaglError(f"{len(absent)} of {len(sha256s)} images have no cached features{what} for backbone "
                            f"{self.backbone.identity} in {self.directory} (first: {absent[0]}); compute "
                            f"them first with FeatureCache.ensure. In the workflow (the cache was cleared or "
                            f"moved): delete the features job's summary <results>/features/{self.backbone.name}"
                            f".json and run again; the job recomputes only what the cache lacks")

    def _read(self, path: Path, sha: str) -> np.ndarray:
        if not path.is_file():
            raise NaglError(f"image {path} does not exist; re-run `nagl datasets prepare` for its dataset")
        actual = sha256_file(path)
        if actual != sha:
            raise NaglError(f"image {path} has sha256 {actual}, but {sha} was given for it; the dataset "
                            f"changed after its manifest was written: re-run `nagl datasets prepare`")
        return load_rgb(path)

    def _read_array(self, path: Path, level: str = DEFAULT_LEVEL) -> np.ndarray:
        expected = self.shape if level == DEFAULT_LEVEL else self.backbone.level_shape(level)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise NaglError(f"cached features {path} are unreadable ({error}); delete the file "
                            f"(or run `nagl cache clear`) and compute again") from error
        if array.shape != tuple(expected):
            raise NaglError(f"cached features {path} have shape {array.shape}, expected {tuple(expected)}; "
                            f"delete the file (or run `nagl cache clear`) and compute again")
        return array.astype(np.float32)

    def _write(self, sha: str, array: np.ndarray, level: str = DEFAULT_LEVEL) -> None:
        with atomic_path(self.path(sha, level)) as tmp:
            with open(tmp, "wb") as handle:  # a handle, so np.save adds no ".npy" to the name
                np.save(handle, array, allow_pickle=False)

    def _write_keyspace(self) -> None:
        target = self.directory / KEYSPACE_FILE
        if not target.is_file():
            backbone = self.backbone
            atomic_write_json(target, {
                **self.key,
                "backbone": backbone.name,
                "image_size": backbone.image_size,
                "grid": list(backbone.grid),
                "dim": backbone.dim,
                "dtype": "float16",
                "layout": "<sha256[:2]>/<sha256>.npy, one (G, C) array per image; "
                          "<sha256>.<level>.npy per named level",
            })


def cache_summary(root: str | Path | None = None) -> list[dict]:
    """One row per key space under ``root``: its key, number of images and bytes on disk.

    Only folders with a ``keyspace.json`` count, so nothing else under ``root`` is touched.
    """
    root = Path(root) if root is not None else default_root()
    rows = []
    if not root.is_dir():
        return rows
    for keyspace in sorted(root.glob(f"*/{KEYSPACE_FILE}")):
        info = read_json(keyspace)
        files, size = _directory_bytes(keyspace.parent)
        rows.append({"key": keyspace.parent.name, "backbone": info.get("backbone", "?"),
                     "identity": info.get("identity", "?"), "preprocessing": info.get("preprocessing", "?"),
                     "images": files, "bytes": size, "path": keyspace.parent})
    return rows


def clear_cache(root: str | Path | None = None, backbone: str | None = None) -> int:
    """Delete the key spaces under ``root`` (only ``backbone``'s when given); return bytes freed.

    Do not run it while features are being computed into the same root.
    """
    freed = 0
    for row in cache_summary(root):
        if backbone is None or row["backbone"] == backbone:
            freed += row["bytes"]
            shutil.rmtree(row["path"])
    return freed
