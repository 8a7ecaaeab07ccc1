"""Source archives: download with checksum, hand-placed files, the offline message, safe extraction.

An archive lives at ``downloads_dir()/<filename>``. It may have been placed
there by hand (machines without internet) or downloaded earlier; either way its
sha256 is checked before use. Where no checksum is published, the first file
seen is accepted and its sha256 recorded in ``<filename>.sha256`` beside it, so
later runs detect a changed file.
"""

from __future__ import annotations

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
from pathlib import Path, PurePosixPath

from nagl.errors import MissingDataError, NaglError
from nagl.io import atomic_directory, atomic_path, atomic_write_text, sha256_file
from nagl.settings import downloads_dir

log = logging.getLogger(__name__)

OFFLINE_ENV = "NAGL_OFFLINE"
TIMEOUT_S = 20  # connect and per-read timeout of a download
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def offline() -> bool:
    """True when ``NAGL_OFFLINE`` is set to anything but '', '0', 'false' or 'no'."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def archive_format(path: str | Path) -> str | None:
    """'zip' or 'tar' (any compression) judged by content, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, tarfile.TarError, EOFError):
        return None


def recorded_sha256_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256")


def missing_archive_message(dataset: str, path: Path, url: str | None, sha256: str | None,
                            reason: str, manual: bool = False) -> str:
    """What to place where, its checksum, where to get it, and the DVC alternative."""
    checksum = sha256 or (f"not published; it is recorded in {path.name}.sha256 the first time "
                          f"the file is used")
    source = url or "see docs/datasets.md"
    if manual:
        source += f" (a web page: download the archive in a browser and save it as {path.name})"
    return "\n".join([
        f"dataset {dataset!r} needs the archive {path.name}, which is not at {path} ({reason}).",
        "Place the file by hand:",
        f"  file:   {path}",
        f"  sha256: {checksum}",
        f"  get it: {source}",
        f"or, if the prepared dataset is in the DVC remote: dvc pull datasets/{dataset}",
        "(NAGL_DOWNLOADS sets the downloads folder; unset NAGL_OFFLINE to let nagl download.)",
    ])


def fetch_archive(dataset: str, url: str | None, sha256: str | None, filename: str,
                  *, manual: bool = False) -> Path:
    """The verified archive ``downloads_dir()/filename``, downloading it if allowed.

    ``manual``: the URL is a web page, not a file (nagl never downloads it).
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
    path = downloads_dir().absolute() / filename
    if path.is_file():
        return _verified(dataset, path, expected)
    if offline():
        reason = f"offline: {OFFLINE_ENV} is set"
    elif not url:
        reason = "no download URL is known"
    elif manual:
        reason = "this archive cannot be downloaded automatically"
    else:
        try:
            _download(dataset, url, path, expected)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            raise MissingDataError(missing_archive_message(
                dataset, path, url, expected, f"download failed: {error}")) from error
        return _verified(dataset, path, expected)
    raise MissingDataError(missing_archive_message(dataset, path, url, expected, reason, manual))


def _download(dataset: str, url: str, path: Path, expected: str | None) -> None:
    """Download to a temporary name beside ``path``; keep it only if the checksum matches."""
    log.warning("downloading %s for dataset %r to %s", url, dataset, path)
    request = urllib.request.Request(url, headers={"User-Agent": "nagl"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, atomic_path(path) as tmp:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for block in iter(lambda: response.read(_CHUNK), b""):
                out.write(block)
                digest.update(block)
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise NaglError(f"the download of {url} for dataset {dataset!r} has sha256 {actual}, "
                            f"expected {expected}; it was not kept. Try again later, or place the "
                            f"right file at {path} by hand")


def _verified(dataset: str, path: Path, expected: str | None) -> Path:
    actual = sha256_file(path)
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
        raise NaglError(f"{path} (dataset {dataset!r}) is not a tar or zip archive; delete it and "
                        f"place the right file there")
    atomic_write_text(record, f"{actual}  {path.name}\n")
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


def _extract_tar(archive: Path, staging: Path) -> None:
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
        # The 'data' filter re-checks every path against the real file system.
        tar.extractall(staging, members=members, filter="data")


def _extract_zip(archive: Path, staging: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        links = {}
        for info in zipped.infolist():
            _check_name(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                target = zipped.read(info).decode("utf-8")
                _check_link(info.filename.rstrip("/"), target, archive, relative_to_member=True)
                links[info.filename] = target
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise NaglError(f"{archive}: member {info.filename!r} is a device or special file; "
                                f"refusing to extract this archive")
        for info in zipped.infolist():
            if info.filename in links:
                link = staging / info.filename.rstrip("/")
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(links[info.filename], link)
            else:
                zipped.extract(info, staging)


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .tar/.tar.gz/.tar.xz/.zip archive into ``dest``, all or nothing.

    Members with absolute paths or '..', links leading outside ``dest`` and
    device files make it fail with a NaglError naming the member. Extraction
    happens in a staging folder that is renamed to ``dest`` at the end.
    """
    archive, dest = Path(archive), Path(dest)
    kind = archive_format(archive)
    if kind is None:
        raise NaglError(f"{archive} is not a readable tar or zip archive; delete it and download it "
                        f"again (or place the right file there)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise NaglError(f"cannot extract {archive.name} into {dest}: it exists and is not empty")
    try:
        with atomic_directory(dest) as staging:
            if kind == "zip":
                _extract_zip(archive, staging)
            else:
                _extract_tar(archive, staging)
    except tarfile.FilterError as error:
        raise NaglError(f"{archive}: {error}; refusing to extract this archive (delete it and get "
                        f"it from the official source)") from error
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise NaglError(f"cannot extract {archive}: {error}; the archive is probably incomplete or "
                        f"corrupt: delete it and download it again") from error
    return dest
