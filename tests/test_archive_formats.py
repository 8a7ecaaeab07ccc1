"""Archive formats and checksums the reference benchmarks' releases need: md5, multi-file releases,
.7z and bare .gz, and the safe-extraction rules in every format."""

from __future__ import annotations

import gzip
import io
import logging
import os
import tarfile

import py7zr
import pytest
from dataset_fixtures import write_tar, write_zip
from wave2_fixtures import md5_file, seven_zip_with_name, write_7z

from nagl.data.archives import archive_format, fetch_archive, fetch_files, safe_extract
from nagl.errors import MissingDataError, NaglError
from nagl.io import sha256_file

URL = "https://example.org/data/toy.tar.gz"


def toy(path):
    return write_tar(path, {"toy/a.txt": b"alpha"})


# md5 ----------------------------------------------------------------------------------------------

def test_md5_is_checked_and_the_sha256_recorded(downloads, caplog):
    archive = toy(downloads / "toy.tar.gz")
    with caplog.at_level(logging.WARNING):
        assert fetch_archive("toy", URL, None, "toy.tar.gz", md5=md5_file(archive).upper()) == archive
    assert (downloads / "toy.tar.gz.sha256").read_text().split()[0] == sha256_file(archive)
    assert "no checksum is published" not in caplog.text
    write_tar(archive, {"toy/b.txt": b"changed"})
    with pytest.raises(NaglError) as error:
        fetch_archive("toy", URL, None, "toy.tar.gz", md5="0" * 32)
    text = str(error.value)
    assert f"has md5 {md5_file(archive)}, expected {'0' * 32}" in text and str(archive) in text
    assert "Delete it and download it again" in text


def test_md5_mismatch_keeps_no_record(downloads):
    toy(downloads / "toy.tar.gz")
    with pytest.raises(NaglError, match="has md5"):
        fetch_archive("toy", URL, None, "toy.tar.gz", md5="f" * 32)
    assert not (downloads / "toy.tar.gz.sha256").exists()


def test_a_published_sha256_wins_over_the_md5(downloads):
    archive = toy(downloads / "toy.tar.gz")
    with pytest.raises(NaglError, match="has sha256"):
        fetch_archive("toy", URL, "0" * 64, "toy.tar.gz", md5=md5_file(archive))


def test_malformed_md5(downloads):
    with pytest.raises(NaglError, match="md5 'abc' is not 32 hex digits"):
        fetch_archive("toy", URL, None, "toy.tar.gz", md5="abc")


def test_download_with_wrong_md5_is_not_kept(downloads, tmp_path, monkeypatch):
    monkeypatch.delenv("NAGL_OFFLINE")
    source = toy(tmp_path / "served.tar.gz")
    with pytest.raises(NaglError, match=f"has md5 {md5_file(source)}, expected {'1' * 32}; it was not kept"):
        fetch_archive("toy", source.as_uri(), None, "toy.tar.gz", md5="1" * 32)
    assert list(downloads.iterdir()) == []
    assert fetch_archive("toy", source.as_uri(), None, "toy.tar.gz", md5=md5_file(source)).is_file()


def test_offline_message_gives_the_md5(downloads):
    with pytest.raises(MissingDataError) as error:
        fetch_archive("toy", URL, None, "toy.tar.gz", md5="ab" * 16)
    text = str(error.value)
    assert f"md5:    {'ab' * 16}" in text and str(downloads.absolute() / "toy.tar.gz") in text
    assert URL in text and "NAGL_OFFLINE is set" in text


# files: -------------------------------------------------------------------------------------------

def test_fetch_files_checks_each_file(downloads):
    first = toy(downloads / "one.tar.gz")
    second = write_zip(downloads / "two.zip", {"b.txt": b"beta"})
    files = [{"url": "https://example.org/one.tar.gz", "filename": "one.tar.gz", "md5": md5_file(first)},
             {"url": "https://example.org/two.zip", "filename": "two.zip", "sha256": sha256_file(second)}]
    assert fetch_files("toy", files) == [first, second]
    files[1]["sha256"] = "0" * 64
    with pytest.raises(NaglError, match="two.zip .* has sha256"):
        fetch_files("toy", files)
    with pytest.raises(NaglError, match="option 'files' must be a non-empty list"):
        fetch_files("toy", {"filename": "one.tar.gz"})
    with pytest.raises(NaglError, match="entry 2 of 'files' needs at least 'filename'"):
        fetch_files("toy", [files[0], {"url": "https://example.org/x"}])


def test_fetch_files_lists_every_missing_file(downloads):
    files = [{"url": f"https://example.org/{n}", "filename": n, "md5": "ab" * 16} for n in ("a.7z", "b.7z")]
    with pytest.raises(MissingDataError) as error:
        fetch_files("toy", files, manual=True)
    text = str(error.value)
    assert "needs 2 files; 2 missing" in text
    assert str(downloads.absolute() / "a.7z") in text and str(downloads.absolute() / "b.7z") in text


# .7z and .gz --------------------------------------------------------------------------------------

def test_7z_extracts(tmp_path):
    archive = write_7z(tmp_path / "x.7z", {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"})
    assert archive_format(archive) == "7z"
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "top/a.txt").read_bytes() == b"alpha" and (dest / "top/sub/b.txt").read_bytes() == b"beta"


def test_bare_gz_becomes_one_file_named_after_the_archive(tmp_path):
    archive = tmp_path / "train-labels-idx1-ubyte.gz"
    with open(archive, "wb") as raw, gzip.GzipFile(filename="../../evil", mode="wb", fileobj=raw, mtime=0) as packed:
        packed.write(b"\x00\x00\x08\x01" + bytes(100))  # the header names '../../evil': ignored
    assert archive_format(archive) == "gz"
    dest = safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["train-labels-idx1-ubyte"]
    assert (dest / "train-labels-idx1-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "train-labels-idx1-ubyte.gz"]


def test_tar_gz_is_still_a_tar(tmp_path):
    assert archive_format(toy(tmp_path / "t.tar.gz")) == "tar"


@pytest.mark.parametrize("suffix", [".7z", ".gz"])
def test_truncated_7z_and_gz_are_reported_as_corrupt(tmp_path, suffix):
    source = tmp_path / f"source{suffix}"
    if suffix == ".7z":
        write_7z(source, {"a.bin": os.urandom(5000)})
    else:
        source.write_bytes(gzip.compress(os.urandom(5000)))
    truncated = tmp_path / f"cut{suffix}"
    truncated.write_bytes(source.read_bytes()[:-300])
    with pytest.raises(NaglError, match="cannot extract .*probably incomplete or corrupt|not a readable"):
        safe_extract(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# Traversal in every format ------------------------------------------------------------------------

def traversal_archive(tmp_path, fmt: str, name: str):
    path = tmp_path / f"bad.{fmt}"
    if fmt == "7z":
        return seven_zip_with_name(path, _placeholder(name), name)
    if fmt == "zip":
        return write_zip(path, {"ok.txt": b"", name: b"evil"})
    with tarfile.open(path, {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[fmt]) as tar:
        for member, data in (("ok.txt", b""), (name, b"evil")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _placeholder(name: str) -> str:
    """A harmless member name as long as ``name`` (py7zr writes no '..' or absolute names itself)."""
    return "p" * (len(name) - len("/evil.txt")) + "/evil.txt"


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "tar.xz", "zip", "7z"])
@pytest.mark.parametrize("name,what", [("../evil.txt", "points outside"), ("a/../../evil.txt", "points outside"),
                                       ("/tmp/evil.txt", "has an absolute path")])
def test_no_member_escapes_in_any_format(tmp_path, fmt, name, what):
    archive = traversal_archive(tmp_path, fmt, name)
    with pytest.raises(NaglError, match="refusing") as error:
        safe_extract(archive, tmp_path / "box" / "out")
    assert f"{name!r} {what}" in str(error.value)
    assert not (tmp_path / "box" / "out").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "evil.txt").exists()


def test_7z_links_are_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink("../outside.txt", tmp_path / "src" / "link")  # py7zr stores only links whose target exists
    archive = tmp_path / "links.7z"
    with py7zr.SevenZipFile(archive, "w") as seven:
        seven.write(tmp_path / "src" / "link", "data/link")
    with pytest.raises(NaglError, match="'data/link' is a link or special file; refusing"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
