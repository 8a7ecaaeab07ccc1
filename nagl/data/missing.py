"""Which source archives a set of datasets still needs, read from the registry entries.

An entry names its archive with ``url``, ``filename``, ``sha256`` or ``md5``, optional
``size`` (bytes, or a text such as "~42 MB") and ``download: manual`` (a web page
or a login: Kaggle, SharePoint), or lists several as ``files: [{url, filename,
md5|sha256, size}, ...]``. An entry with neither ``filename`` nor ``files`` is
built without an archive (embedded data, installed packages, a user's folder).
A prepared dataset needs nothing; an archive already in the downloads folder is
not listed (its checksum is checked when the dataset is prepared).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nagl.data.prepare import is_prepared
from nagl.data.registry import DatasetSpec, load_registry
from nagl.errors import NaglError
from nagl.settings import downloads_dir


@dataclass(frozen=True)
class NeededArchive:
    dataset: str
    path: Path
    url: str | None
    checksum: tuple[str, str] | None  # (algorithm, hex digest)
    size: int | str | None
    manual: bool

    @property
    def checksum_text(self) -> str:
        if self.checksum is None:
            return "none published (sha256 recorded on first use)"
        return f"{self.checksum[0]}:{self.checksum[1]}"

    @property
    def size_text(self) -> str:
        if self.size is None:
            return "-"
        if isinstance(self.size, int):
            return f"{self.size:,} B ({self.size / 2**20:,.1f} MiB)"
        return str(self.size)


def archive_entries(spec: DatasetSpec) -> list[Mapping[str, Any]]:
    """The archives of a registry entry: its ``files:`` list, or the entry itself when it names a ``filename``."""
    where = f"config/datasets.yaml: dataset {spec.name!r}"
    files = spec.options.get("files")
    if files is None:
        return [spec.options] if spec.options.get("filename") else []
    if not isinstance(files, list) or not all(isinstance(f, Mapping) and f.get("filename") for f in files):
        raise NaglError(f"{where}: 'files' must be a list of {{url, filename, md5 or sha256}} entries, "
                        f"each with a filename")
    return files


def _checksum(entry: Mapping[str, Any]) -> tuple[str, str] | None:
    for algorithm in ("sha256", "md5"):
        if entry.get(algorithm):
            return algorithm, str(entry[algorithm]).strip().lower()
    return None


def needed_archives(names: list[str]) -> list[NeededArchive]:
    """The archives of ``names`` that are neither prepared nor placed in the downloads folder."""
    registry = load_registry()
    needs = []
    for name in names:
        spec = registry[name]
        if is_prepared(name):
            continue
        for entry in archive_entries(spec):
            path = downloads_dir().absolute() / str(entry["filename"])
            if path.is_file():
                continue
            manual = (entry.get("download") or spec.options.get("download")) == "manual"
            needs.append(NeededArchive(dataset=name, path=path, url=entry.get("url"), checksum=_checksum(entry),
                                       size=entry.get("size"), manual=manual))
    return needs
