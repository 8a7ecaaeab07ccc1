"""Archives: checksums, the offline message, downloads (file:// URLs, no network), safe extraction."""

from __future__ import annotations

import io
import logging
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from dataset_fixtures import write_tar, write_zip

from nagl.data.archives import fetch_archive, safe_extract
from nagl.errors import MissingDataError, NaglError
from nagl.io import sha256_file

URL = "https://example.org/data/toy.tar.gz"



def toy_archive(path: Path) -> Path:
    return write_tar(path, {"toy/a.txt": b"alpha", "toy/sub/b.txt": b"beta"})


def test_placed_file_with_the_right_checksum_is_used(downloads):
    archive = toy_archive(downloads / "toy.tar.gz")
    assert fetch_archive("toy", URL, sha256_file(archive), "toy.tar.gz") == archive


def test_checksum_mismatch_names_file_and_both_hashes(downloads):
    archive = toy_archive(downloads / "toy.tar.gz")
    wrong = "0" * 64
    with pytest.raises(NaglError) as error:
        fetch_archive("toy", URL, wrong, "toy.tar.gz")
    text = str(error.value)
    assert str(archive) in text and wrong in text and sha256_file(archive) in text
    assert "Delete it and download it again" in text


def test_offline_and_missing_says_what_to_place_where(downloads):
    sha = "ab" * 32
    with pytest.raises(MissingDataError) as error:
        fetch_archive("toy", URL, sha, "toy.tar.gz")
    text = str(error.value)
    assert str((downloads / "toy.tar.gz").absolute()) in text
    assert sha in text and URL in text
    assert "NAGL_OFFLINE is set" in text
    assert "dvc pull datasets/toy" in text


def test_unpublished_checksum_is_recorded_then_enforced(downloads, caplog):
    archive = toy_archive(downloads / "toy.tar.gz")
    with caplog.at_level(logging.WARNING):
        assert fetch_archive("toy", URL, None, "toy.tar.gz") == archive
    record = downloads / "toy.tar.gz.sha256"
    assert record.read_text().split()[0] == sha256_file(archive)
    assert "recorded its sha256" in caplog.text and str(record) in caplog.text
    assert fetch_archive("toy", URL, None, "toy.tar.gz") == archive  # matches the record
    write_tar(archive, {"toy/other.txt": b"changed"})
    with pytest.raises(NaglError, match="the file changed"):
        fetch_archive("toy", URL, None, "toy.tar.gz")


def test_unpublished_checksum_refuses_a_file_that_is_not_an_archive(downloads):
    (downloads / "toy.tar.gz").write_text("<html>a login page</html>")
    with pytest.raises(NaglError, match="is not a tar, zip, 7z or gzip archive"):
        fetch_archive("toy", URL, None, "toy.tar.gz")
    assert not (downloads / "toy.tar.gz.sha256").exists()


def test_download_verifies_and_keeps_the_file(downloads, tmp_path, monkeypatch):
    monkeypatch.delenv("NAGL_OFFLINE")
    source = toy_archive(tmp_path / "served.tar.gz")
    path = fetch_archive("toy", source.as_uri(), sha256_file(source), "toy.tar.gz")
    assert path == downloads / "toy.tar.gz"
    assert path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in downloads.iterdir()) == ["toy.tar.gz"]  # no temporary left


def test_download_with_a_wrong_checksum_is_not_kept(downloads, tmp_path, monkeypatch):
    monkeypatch.delenv("NAGL_OFFLINE")
    source = toy_archive(tmp_path / "served.tar.gz")
    with pytest.raises(NaglError, match="it was not kept"):
        fetch_archive("toy", source.as_uri(), "1" * 64, "toy.tar.gz")
    assert list(downloads.iterdir()) == []


def test_network_failure_gives_the_placement_message(downloads, monkeypatch):
    monkeypatch.delenv("NAGL_OFFLINE")
    url = "http://127.0.0.1:9/toy.tar.gz"  # nothing listens on the discard port
    with pytest.raises(MissingDataError) as error:
        fetch_archive("toy", url, "ab" * 32, "toy.tar.gz")
    assert "download failed" in str(error.value) and url in str(error.value)
    assert list(downloads.iterdir()) == []


def test_manual_archives_are_never_downloaded(downloads, monkeypatch):
    monkeypatch.delenv("NAGL_OFFLINE")
    with pytest.raises(MissingDataError, match="cannot be downloaded automatically") as error:
        fetch_archive("toy", "https://example.org/share-page", None, "toy.zip", manual=True)
    assert "download the archive in a browser and save it as toy.zip" in str(error.value)


def test_filename_must_be_a_plain_name(downloads):
    with pytest.raises(NaglError, match="plain file name"):
        fetch_archive("toy", URL, None, "../toy.tar.gz")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.xz", ".zip"])
def test_safe_extract_formats(tmp_path, suffix):
    members = {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"}
    archive = tmp_path / f"x{suffix}"
    (write_zip if suffix == ".zip" else write_tar)(archive, members)
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.txt").read_bytes() == b"beta"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", f"x{suffix}"]  # no staging left


def tar_with(path: Path, *infos: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarfile.TarInfo("ok.txt"), io.BytesIO(b""))
        for info in infos:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def member(name: str, kind=tarfile.REGTYPE, linkname: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("bad,what", [
    (member("../evil.txt"), "'../evil.txt' points outside"),
    (member("a/../../evil.txt"), "'a/../../evil.txt' points outside"),
    (member("/tmp/evil.txt"), "'/tmp/evil.txt' has an absolute path"),
    (member("link", tarfile.SYMTYPE, "../../outside"), "link 'link' -> '../../outside' points outside"),
    (member("a/link", tarfile.SYMTYPE, "/etc"), "link 'a/link' -> '/etc' points outside"),
    (member("hard", tarfile.LNKTYPE, "../outside"), "link 'hard' -> '../outside' points outside"),
    (member("dev", tarfile.CHRTYPE), "'dev' is a device or special file"),
    (member("pipe", tarfile.FIFOTYPE), "'pipe' is a device or special file"),
])
def test_safe_extract_refuses_dangerous_tar_members(tmp_path, bad, what):
    archive = tar_with(tmp_path / "bad.tar", bad)
    with pytest.raises(NaglError, match="refusing") as error:
        safe_extract(archive, tmp_path / "box" / "out")
    assert what in str(error.value)
    assert not (tmp_path / "box" / "out").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "box" / "evil.txt").exists()


def test_safe_extract_keeps_links_that_stay_inside(tmp_path):
    archive = tar_with(tmp_path / "ok.tar", member("a/real.txt"), member("a/link.txt", tarfile.SYMTYPE, "real.txt"))
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "a/link.txt").is_symlink() and (dest / "a/link.txt").read_bytes() == b"x"


def zip_symlink(path: Path, name: str, target: str) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        zipped.writestr("ok.txt", b"")
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(info, target)
    return path


def test_safe_extract_refuses_zip_traversal_and_escaping_symlink(tmp_path):
    traversal = write_zip(tmp_path / "t.zip", {"../evil.txt": b"x"})
    with pytest.raises(NaglError, match="'../evil.txt' points outside"):
        safe_extract(traversal, tmp_path / "out")
    escaping = zip_symlink(tmp_path / "s.zip", "data/link", "../../../etc/passwd")
    with pytest.raises(NaglError, match="link 'data/link' -> '../../../etc/passwd' points outside"):
        safe_extract(escaping, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_rejects_non_archives_corrupt_archives_and_full_targets(tmp_path):
    text = tmp_path / "x.tar.gz"
    text.write_text("not an archive")
    with pytest.raises(NaglError, match="not a readable tar, zip, 7z or gzip archive"):
        safe_extract(text, tmp_path / "out")
    good = toy_archive(tmp_path / "good.tar")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(NaglError, match="probably incomplete or corrupt: delete it and download it again"):
        safe_extract(truncated, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(NaglError, match="exists and is not empty"):
        safe_extract(good, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
