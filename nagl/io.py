"""Small, shared file helpers: atomic writes and content hashes.

Every file the platform produces is written under a temporary name in the same
directory and then renamed, so a reader never sees half a file and an interrupted
run leaves either the old file or nothing. Outputs get ordinary permissions
(0666 for files and 0777 for folders, less the umask), the same as a file the
user creates: ``tempfile`` would leave them private (0600/0700).

The temporary names follow :data:`TEMP_PATTERNS`; :mod:`nagl.cleanup` removes
the ones an interrupted run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20

# Names of the temporaries made here (tempfile adds 8 characters of [a-z0-9_]):
# ``.<name>.XXXXXXXX.tmp`` (plus DuckDB's ``.wal`` beside it), ``.<name>.XXXXXXXX.staging``
# and ``.<name>.old-<pid>``.
TEMP_PATTERNS = (
    re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.wal)?$"),
    re.compile(r"^\..+\.[a-z0-9_]{8}\.staging$"),
    re.compile(r"^\..+\.old-[0-9]+$"),
)


def is_temporary_name(name: str) -> bool:
    """True for a name that only the atomic-write helpers of this module create."""
    return any(pattern.match(name) for pattern in TEMP_PATTERNS)


def current_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Give a file 0666 and a folder 0777, less the umask: what open() and mkdir() would give."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every config hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(canonical_json(obj).encode())[:length]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    ordinary_permissions(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``path`` whole.

    The staging directory sits beside ``path`` (same file system, so the final
    rename is atomic). An old ``path`` is moved aside first and deleted after the
    new one is in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    ordinary_permissions(staging)
    try:
        yield staging
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def stamp_path(product: str | os.PathLike) -> Path:
    """The workflow's record that ``product`` (the database, the report) was rebuilt.

    The stamp, not the product, is the Snakemake rule's output: Snakemake deletes
    a job's outputs before running it, so the product itself must not be one.
    The step replaces the product by a rename and then writes the stamp.
    """
    product = Path(product)
    return product.with_name(f".{product.name}.built")


def forget_stamp_without_product(product: str | os.PathLike) -> None:
    """Remove the stamp of a product that was deleted, so the workflow rebuilds it."""
    if not Path(product).exists():
        stamp_path(product).unlink(missing_ok=True)
