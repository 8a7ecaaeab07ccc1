"""Source archives: download with checksum, hand-placed files, the offline message, safe extraction.

An archive lives at ``downloads_dir()/<filename>``. It may have been placed
there by hand (machines without internet) or downloaded earlier; either way its
checksum is checked before use: the sha256 where one is published, else the md5
where the release publishes that. Where no sha256 is published, the first file
accepted has its sha256 recorded in ``<filename>.sha256`` beside it, so later
runs detect a changed file. A release of several files (``files:``) is fetched
with :func:`fetch_files`, each file by the same rules.

Formats: tar (any compression), zip, 7z (py7zr) and a bare gzip-compressed file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import posixpath
import re
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import py7zr

from nagl.errors import MissingDataError, NaglError
from nagl.io import atomic_directory, atomic_path, atomic_write_text
from nagl.settings import downloads_dir

log = logging.getLogger(__name__)

OFFLINE_ENV = "NAGL_OFFLINE"
TIMEOUT_S = 20  # connect and per-read timeout of a download
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")
_GZIP_MAGIC = b"\x1f\x8b"


def offline() -> bool:
    """True when ``NAGL_OFFLINE`` is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def archive_format(path: str | Path) -> str | None:
    """'zip', 'tar' (any compression), '7z' or 'gz' (one gzip-compressed file) judged by content, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        pass
    if py7zr.is_7zfile(path):
        return "7z"
    with open(path, "rb") as handle:
        return "gz" if handle.read(2) == _GZIP_MAGIC else None


def recorded_sha256_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def missing_archive_message(dataset: str, path: Path, url: str | None, sha256: str | None,
                            reason: str, manual: bool = False, md5: str | None = None) -> str:
    """What to place where, its checksum, where to get it, and the DVC alternative."""
    if sha256:
        checksum_line = f"  sha256: {sha256}"
    elif md5:
        checksum_line = f"  md5:    {md5}"
    else:
        checksum_line = (f"  sha256: not published; it is recorded in {path.name}.sha256 the first "
                         f"time the file is used")
    source = url or "see docs/datasets.md"
    if manual:
        source += f" (a web page: download the archive in a browser and save it as {path.name})"
    return "\n".join([
        f"dataset {dataset!r} needs the archive {path.name}, which is not at {path} ({reason}).",
        "Place the file by hand:",
        f"  file:   {path}",
        checksum_line,
        f"  get it: {source}",
        f"or, if the prepared dataset is in the DVC remote: dvc pull datasets/{dataset}",
        "(NAGL_DOWNLOADS sets the downloads folder; unset NAGL_OFFLINE to let nagl download.)",
    ])


def fetch_archive(dataset: str, url: str | None, sha256: str | None, filename: str,
                  *, manual: bool = False, md5: str | None = None) -> Path:
    """The verified archive ``downloads_dir()/filename``, downloading it if allowed.

    ``manual``: the URL is a web page, not a file (nagl never downloads it).
    ``md5``: the release's published md5, checked where no sha256 is given (the
    sha256 is then recorded beside the file, as for releases without checksum).
    Raises MissingDataError when the file is absent and cannot be downloaded,
    NaglError when its checksum does not match.
    """
    if not filename or Path(filename).name != filename:
        raise NaglError(f"dataset {dataset!r}: 'filename' must be a plain file name, got {filename!r}; "
                        f"fix its entry in config/datasets.yaml")
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not _SHA256.match(expected):
        raise NaglError(f"dataset {dataset!r}: sha256 {sha256!r} is not 64 hex digits; "
                        f"fix its entry in config/datasets.yaml")
    expected_md5 = md5.strip().lower() if md5 and expected is None else None
    if md5 and not _MD5.match(md5.strip().lower()):
        raise NaglError(f"dataset {dataset!r}: md5 {md5!r} is not 32 hex digits; "
                        f"fix its entry in config/datasets.yaml")
    path = downloads_dir().absolute() / filename
    if path.is_file():
        return _verified(dataset, path, expected, expected_md5)
    if offline():
        reason = f"offline: {OFFLINE_ENV} is set"
    elif not url:
        reason = "no download URL is known"
    elif manual:
        reason = "this archive cannot be downloaded automatically"
    else:
        try:
            _download(dataset, url, path, expected, expected_md5)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            raise MissingDataError(missing_archive_message(
                dataset, path, url, expected, f"download failed: {error}", md5=expected_md5)) from error
        return _verified(dataset, path, expected, expected_md5)
    raise MissingDataError(missing_archive_message(dataset, path, url, expected, reason, manual, md5=expected_md5))


def fetch_files(dataset: str, files: list, *, manual: bool = False) -> list[Path]:
    """Every file of a multi-file release, verified, in the order of ``files``.

    ``files`` is the ``files:`` option: a list of ``{url, filename, sha256 | md5}``.
    When several files are missing, one MissingDataError lists all of them.
    """
    if not isinstance(files, list) or not files:
        raise NaglError(f"dataset {dataset!r}: option 'files' must be a non-empty list of "
                        f"{{url, filename, sha256 or md5}}; fix its entry in config/datasets.yaml")
    paths, missing = [], []
    for number, entry in enumerate(files, start=1):
        if not isinstance(entry, dict) or not entry.get("filename"):
            raise NaglError(f"dataset {dataset!r}: entry {number} of 'files' needs at least 'filename' "
                            f"(and 'url', 'sha256' or 'md5'); fix it in config/datasets.yaml")
        try:
            paths.append(fetch_archive(dataset, entry.get("url"), entry.get("sha256"), entry["filename"],
                                       manual=manual, md5=entry.get("md5")))
        except MissingDataError as error:
            missing.append(str(error))
    if missing:
        raise MissingDataError(f"dataset {dataset!r} needs {len(files)} files; {len(missing)} missing:\n\n"
                               + "\n\n".join(missing))
    return paths


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, read once."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def _download(dataset: str, url: str, path: Path, expected: str | None, expected_md5: str | None = None) -> None:
    """Download to a temporary name beside ``path``; keep it only if the checksum matches."""
    log.warning("downloading %s for dataset %r to %s", url, dataset, path)
    request = urllib.request.Request(url, headers={"User-Agent": "nagl"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, atomic_path(path) as tmp:
        digest, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with open(tmp, "wb") as out:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                digest.update(block)
                md5.update(block)
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise NaglError(f"the download of {url} for dataset {dataset!r} has sha256 {actual}, "
                            f"expected {expected}; it was not kept. Try again later, or place the "
                            f"right file at {path} by hand")
        if expected_md5 is not None and md5.hexdigest() != expected_md5:
            raise NaglError(f"the download of {url} for dataset {dataset!r} has md5 {md5.hexdigest()}, "
                            f"expected {expected_md5}; it was not kept. Try again later, or place the "
                            f"right file at {path} by hand")


def _verified(dataset: str, path: Path, expected: str | None, expected_md5: str | None = None) -> Path:
    actual, actual_md5 = _digests(path)
    if expected_md5 is not None and actual_md5 != expected_md5:
        raise NaglError(f"{path} (dataset {dataset!r}) has md5 {actual_md5}, expected {expected_md5}: "
                        f"the file is incomplete, corrupt or another release. Delete it and "
                        f"download it again (or place the right file there)")
    if expected is not None:
        if actual != expected:
            raise NaglError(f"{path} (dataset {dataset!r}) has sha256 {actual}, expected {expected}: "
                            f"the file is incomplete, corrupt or another release. Delete it and "
                            f"download it again (or place the right file there)")
        return path
    record = recorded_sha256_path(path)
    if record.is_file():
        recorded = record.read_text().split()[0] if record.read_text().split() else ""
        if actual != recorded:
            raise NaglError(f"{path} (dataset {dataset!r}) has sha256 {actual}, but {record} recorded "
                            f"{recorded} when it was first used: the file changed. Delete both files "
                            f"and place the archive again, or delete {record.name} if you replaced "
                            f"the archive on purpose")
        return path
    if archive_format(path) is None:
        raise NaglError(f"{path} (dataset {dataset!r}) is not a tar, zip, 7z or gzip archive; delete it "
                        f"and place the right file there")
    atomic_write_text(record, f"{actual}  {path.name}\n")
    if expected_md5 is None:
        log.warning("%s: no checksum is published for dataset %r; accepted it and recorded its "
                    "sha256 %s in %s (later runs check against it)", path, dataset, actual, record)
    return path


def _check_name(name: str, archive: Path) -> None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise NaglError(f"{archive}: member {name!r} has an absolute path; refusing to extract "
                        f"this archive (delete it and get it from the official source)")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise NaglError(f"{archive}: member {name!r} points outside the extraction folder ('..'); "
                        f"refusing to extract this archive (delete it and get it from the official "
                        f"source)")


def _check_link(name: str, target: str, archive: Path, *, relative_to_member: bool) -> None:
    """A link must resolve, lexically, to a path inside the extraction folder."""
    base = posixpath.dirname(name) if relative_to_member else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
        raise NaglError(f"{archive}: link {name!r} -> {target!r} points outside the extraction "
                        f"folder; refusing to extract this archive (delete it and get it from the "
                        f"official source)")


@dataclass(frozen=True)
class ExtractionLimits:
    """Caps on what one archive may expand to; every extractor checks each member against them.

    The defaults leave room for the largest real releases (MVTec 3D-AD, ISIC 2018,
    VisA: tens of GB at most, tens of thousands of files) and stop archive bombs.
    ``max_ratio`` caps the expanded size at that multiple of the archive's size,
    but never below :data:`RATIO_FLOOR` (small archives may expand freely up to it).
    Each limit can be raised with an environment variable (:data:`LIMIT_ENV`).
    """

    max_bytes: int = 64 * 2**30
    max_members: int = 1_000_000
    max_ratio: float = 100.0

    @classmethod
    def from_env(cls) -> ExtractionLimits:
        """The defaults, each replaced by its environment variable where set."""
        values = {}
        for field, variable in LIMIT_ENV.items():
            text = os.environ.get(variable, "").strip()
            if not text:
                continue
            try:
                value = float(text) if field == "max_ratio" else int(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise NaglError(f"{variable}={text!r} is not a positive number; unset it or give e.g. "
                                f"{variable}={getattr(cls, field)}")
            values[field] = value
        return cls(**values)

    def budget(self, archive: Path) -> ExtractionBudget:
        """A counter for one extraction of ``archive``."""
        return ExtractionBudget(self, archive)


LIMIT_ENV = {"max_bytes": "NAGL_EXTRACT_MAX_BYTES", "max_members": "NAGL_EXTRACT_MAX_MEMBERS",
             "max_ratio": "NAGL_EXTRACT_MAX_RATIO"}
RATIO_FLOOR = 64 * 2**20


class ExtractionBudget:
    """What one extraction has used so far; :meth:`member` raises a NaglError past a limit.

    Call ``member(name, size)`` for every member before writing anything (declared
    sizes), and ``written(name, n)`` where sizes are only known while writing.
    """

    def __init__(self, limits: ExtractionLimits, archive: Path):
        self.limits, self.archive = limits, archive
        self.members = 0
        self.bytes = 0
        self.max_bytes = min(limits.max_bytes,
                             max(RATIO_FLOOR, int(limits.max_ratio * archive.stat().st_size)))

    def member(self, name: str, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            self._refuse(f"has more than {self.limits.max_members} members", "max_members")
        self.written(name, size)

    def written(self, name: str, size: int) -> None:
        self.bytes += max(0, int(size))
        if self.bytes > self.max_bytes:
            if self.max_bytes == self.limits.max_bytes:
                self._refuse(f"expands to more than {self.max_bytes} bytes (at member {name!r})", "max_bytes")
            self._refuse(f"expands to more than {self.limits.max_ratio:g} times its own size "
                         f"({self.max_bytes} bytes, at member {name!r})", "max_ratio")

    def _refuse(self, what: str, field: str) -> None:
        raise NaglError(f"{self.archive} {what}; refusing to extract it (an archive bomb, or not the "
                        f"expected file). If it is the right file, raise the limit with "
                        f"{LIMIT_ENV[field]}=<value> and prepare again")


def _extract_7z(archive: Path, staging: Path, limits: ExtractionLimits) -> None:
    """Plain files and folders only: 7z links are refused (no release needs them)."""
    budget = limits.budget(archive)
    with py7zr.SevenZipFile(archive) as seven:
        for info in seven.list():
            _check_name(info.filename, archive)
            if info.is_symlink or not (info.is_file or info.is_directory):
                raise NaglError(f"{archive}: member {info.filename!r} is a link or special file; "
                                f"refusing to extract this archive (delete it and get it from the "
                                f"official source)")
            budget.member(info.filename, info.uncompressed or 0)
        seven.extractall(staging)


def _extract_gz(archive: Path, staging: Path, limits: ExtractionLimits) -> None:
    """A bare gzip file becomes one file named like the archive without ``.gz``.

    The name stored in the gzip header is ignored, so it cannot lead anywhere. The
    header's size field is only the size modulo 2**32, so bytes are counted as written.
    """
    name = archive.name[:-3] if archive.name.lower().endswith(".gz") else archive.name + ".out"
    budget = limits.budget(archive)
    budget.member(name, 0)
    with gzip.open(archive, "rb") as source, open(staging / name, "wb") as target:
        for block in iter(lambda: source.read(_CHUNK), b""):
            budget.written(name, len(block))
            target.write(block)


def _extract_tar(archive: Path, staging: Path, limits: ExtractionLimits) -> None:
    budget = limits.budget(archive)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            _check_name(member.name, archive)
            if member.issym():
                _check_link(member.name, member.linkname, archive, relative_to_member=True)
            elif member.islnk():
                _check_link(member.name, member.linkname, archive, relative_to_member=False)
            elif not (member.isfile() or member.isdir()):
                raise NaglError(f"{archive}: member {member.name!r} is a device or special file; "
                                f"refusing to extract this archive")
            budget.member(member.name, member.size if member.isfile() else 0)
        # The 'data' filter re-checks every path against the real file system.
        tar.extractall(staging, members=members, filter="data")


def _inside(root: Path, name: str, archive: Path) -> Path:
    """Where member ``name`` goes: its resolved path, which must lie in ``root`` (itself resolved)."""
    path = (root / name.replace("\\", "/")).resolve()
    if path != root and root not in path.parents:
        raise NaglError(f"{archive}: member {name!r} would be written outside the extraction folder; "
                        f"refusing to extract this archive (delete it and get it from the official source)")
    return path


_MAX_LINK_TARGET = 4096


def _extract_zip(archive: Path, staging: Path, limits: ExtractionLimits) -> None:
    """Regular files and folders first, each into a resolved path checked against ``staging``;
    links last, and only those whose target resolves inside it (so nothing is ever written
    through a link)."""
    budget = limits.budget(archive)
    root = staging.resolve()
    with zipfile.ZipFile(archive) as zipped:
        infos = zipped.infolist()
        links: list[tuple[str, str]] = []
        for info in infos:
            _check_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                if info.file_size > _MAX_LINK_TARGET:
                    raise NaglError(f"{archive}: link {info.filename!r} has a {info.file_size}-byte target; "
                                    f"refusing to extract this archive")
                target = zipped.read(info).decode("utf-8", errors="replace")
                _check_link(info.filename.rstrip("/"), target, archive, relative_to_member=True)
                links.append((info.filename.rstrip("/"), target))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise NaglError(f"{archive}: member {info.filename!r} is a device or special file; "
                                f"refusing to extract this archive")
            budget.member(info.filename, info.file_size)
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                continue
            path = _inside(root, info.filename, archive)
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            _copy_member(zipped, info, path, archive)
        for name, target in links:
            link = _inside(root, posixpath.dirname(name), archive) / posixpath.basename(name)
            resolved = (link.parent / target).resolve()
            if resolved != root and root not in resolved.parents:
                raise NaglError(f"{archive}: link {name!r} -> {target!r} resolves outside the extraction "
                                f"folder; refusing to extract this archive")
            if link.exists() or link.is_symlink():
                raise NaglError(f"{archive}: link {name!r} would replace another member; refusing to "
                                f"extract this archive")
            os.symlink(target, link)


def _copy_member(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, archive: Path) -> None:
    """Copy one member, never more bytes than its header declares (checked against the limits)."""
    written = 0
    with zipped.open(info) as source, open(path, "wb") as out:
        for block in iter(lambda: source.read(_CHUNK), b""):
            written += len(block)
            if written > info.file_size:
                raise NaglError(f"{archive}: member {info.filename!r} holds more than the {info.file_size} "
                                f"bytes its header declares; refusing to extract this archive")
            out.write(block)


def safe_extract(archive: str | Path, dest: str | Path, limits: ExtractionLimits | None = None) -> Path:
    """Extract a .tar/.tar.gz/.tar.xz/.zip/.7z archive or a bare .gz file into ``dest``, all or nothing.

    Members with absolute paths or '..', links leading outside ``dest``, device
    files and archives past ``limits`` (default: :meth:`ExtractionLimits.from_env`)
    make it fail with a NaglError naming the member, before anything is written.
    Extraction happens in a staging folder that is renamed to ``dest`` at the end.
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractionLimits.from_env()
    kind = archive_format(archive)
    if kind is None:
        raise NaglError(f"{archive} is not a readable tar, zip, 7z or gzip archive; delete it and "
                        f"download it again (or place the right file there)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise NaglError(f"cannot extract {archive.name} into {dest}: it exists and is not empty")
    try:
        with atomic_directory(dest) as staging:
            extractor = {"zip": _extract_zip, "7z": _extract_7z, "gz": _extract_gz, "tar": _extract_tar}[kind]
            extractor(archive, staging, limits)
    except tarfile.FilterError as error:
        raise NaglError(f"{archive}: {error}; refusing to extract this archive (delete it and get "
                        f"it from the official source)") from error
    except (tarfile.TarError, zipfile.BadZipFile, py7zr.Bad7zFile, gzip.BadGzipFile, EOFError, OSError) as error:
        raise NaglError(f"cannot extract {archive}: {error}; the archive is probably incomplete or "
                        f"corrupt: delete it and download it again") from error
    return dest
