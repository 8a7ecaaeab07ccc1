"""Safety and durability (issue 14): archives that cannot escape, limits on extraction, confined
queries, ordinary permissions. docs/security.md names each test."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from concurrent_reader import Reader
from dataset_fixtures import write_tar, write_zip
from report_fixtures import build_results_db

from nagl.data.archives import ExtractionLimits, safe_extract
from nagl.errors import NaglError
from nagl.io import atomic_directory, atomic_path, atomic_write_text
from nagl.results.query import READ_PRAGMAS, query

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------- zip extraction --


def crafted_zip(path: Path, members: list[tuple[str, bytes, bool]]) -> Path:
    """A zip with members in the given order: (name, data, is_symlink)."""
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data, is_link in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = ((stat.S_IFLNK | 0o777) if is_link else (stat.S_IFREG | 0o644)) << 16
            zipped.writestr(info, data)
    return path


# Each link is harmless by its own name (it stays inside when read lexically), but the second
# one resolves through the first: a/b is the extraction folder, so a/b/c is its parent.
CHAINED_LINKS = [("a/b", b"..", True), ("a/b/c", b"..", True), ("a/b/c/escaped.txt", b"owned", False)]


@pytest.mark.parametrize("order", ["links first", "file first"])
def test_zip_links_cannot_carry_members_outside(tmp_path, order):
    members = CHAINED_LINKS if order == "links first" else CHAINED_LINKS[2:] + CHAINED_LINKS[:2]
    archive = crafted_zip(tmp_path / "crafted.zip", members)
    dest = tmp_path / "box" / "out"
    with pytest.raises(NaglError, match="refusing to extract this archive"):
        safe_extract(archive, dest)
    assert not (tmp_path / "box" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert not dest.exists()


def test_zip_link_to_a_regular_file_inside_is_kept(tmp_path):
    archive = crafted_zip(tmp_path / "ok.zip", [("d/link.txt", b"real.txt", True), ("d/real.txt", b"data", False)])
    dest = safe_extract(archive, tmp_path / "out")
    assert (dest / "d/link.txt").is_symlink() and (dest / "d/link.txt").read_bytes() == b"data"


def test_a_crafted_zip_placed_for_a_dataset_without_checksum_fails_prepare(project, downloads):
    from nagl.data.prepare import prepare_dataset

    registry = ("datasets:\n  crafted:\n    kind: mvtec\n    domain: industrial\n"
                "    filename: crafted.zip\n    url: https://example.org/crafted.zip\n")
    root = project(registry)
    crafted_zip(downloads / "crafted.zip", CHAINED_LINKS)
    with pytest.raises(NaglError, match="refusing to extract this archive"):
        prepare_dataset("crafted", version=False)
    written = [p for p in root.parent.rglob("escaped.txt")]
    assert written == []


# ------------------------------------------------------------ extraction limits --

LIMITS = ExtractionLimits(max_bytes=10_000, max_members=5, max_ratio=100.0)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extraction_limits_refuse_before_writing(tmp_path, kind):
    write = write_zip if kind == "zip" else write_tar
    too_big = write(tmp_path / f"big.{kind}", {"a.bin": bytes(6000), "b.bin": bytes(6000)})
    with pytest.raises(NaglError, match=r"more than 10000 bytes .*NAGL_EXTRACT_MAX_BYTES"):
        safe_extract(too_big, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()
    too_many = write(tmp_path / f"many.{kind}", {f"{i}.txt": b"x" for i in range(6)})
    with pytest.raises(NaglError, match="more than 5 members.*NAGL_EXTRACT_MAX_MEMBERS"):
        safe_extract(too_many, tmp_path / "out", LIMITS)
    within = write(tmp_path / f"fine.{kind}", {f"{i}.txt": b"x" * 100 for i in range(5)})
    assert len(list(safe_extract(within, tmp_path / "fine", LIMITS).iterdir())) == 5


def test_extraction_ratio_limit_stops_a_bomb(tmp_path, monkeypatch):
    # 200 KiB of zeros deflate to a few hundred bytes: past a ratio of 100 once over the floor.
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("zeros.bin", bytes(200 * 1024))
    monkeypatch.setattr("nagl.data.archives.RATIO_FLOOR", 1024)
    limits = ExtractionLimits(max_bytes=10**12, max_members=10, max_ratio=100.0)
    with pytest.raises(NaglError, match="more than 100 times its own size.*NAGL_EXTRACT_MAX_RATIO"):
        safe_extract(tmp_path / "bomb.zip", tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()


def test_extraction_limits_from_the_environment(monkeypatch):
    assert ExtractionLimits.from_env() == ExtractionLimits()
    monkeypatch.setenv("NAGL_EXTRACT_MAX_BYTES", "123")
    monkeypatch.setenv("NAGL_EXTRACT_MAX_RATIO", "2.5")
    assert ExtractionLimits.from_env() == ExtractionLimits(max_bytes=123, max_ratio=2.5)
    monkeypatch.setenv("NAGL_EXTRACT_MAX_MEMBERS", "many")
    with pytest.raises(NaglError, match="NAGL_EXTRACT_MAX_MEMBERS='many' is not a positive number"):
        ExtractionLimits.from_env()


def test_default_limits_hold_the_real_releases():
    # The largest releases of datasets.md / datasets-wave2.md: tens of GB, tens of thousands of files.
    limits = ExtractionLimits()
    assert limits.max_bytes >= 50 * 10**9 and limits.max_members >= 100_000 and limits.max_ratio >= 20


def test_tar_is_still_refused_when_a_link_leads_outside(tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        info = tarfile.TarInfo("a/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../x"
        tar.addfile(info)
    with pytest.raises(NaglError, match="points outside"):
        safe_extract(tmp_path / "t.tar", tmp_path / "out")


# --------------------------------------------------------------------- queries --


@pytest.fixture(scope="module")
def results_db(tmp_path_factory) -> Path:
    return build_results_db(tmp_path_factory.mktemp("safety-db") / "benchmark.duckdb")


SECRET = "secret-line-of-the-machine"

FILE_READERS = [
    "SELECT * FROM read_csv('{f}')", "SELECT * FROM read_csv_auto('{f}')", "SELECT * FROM read_text('{f}')",
    "SELECT * FROM read_blob('{f}')", "SELECT * FROM read_json('{f}')", "SELECT * FROM read_json_auto('{f}')",
    "SELECT * FROM read_ndjson_objects('{f}')", "SELECT * FROM read_parquet('{f}')", "SELECT * FROM glob('{d}/*')",
    "SELECT * FROM sniff_csv('{f}')", "SELECT * FROM parquet_metadata('{f}')", "SELECT * FROM '{f}'",
    "SELECT content FROM read_text('{d}/*.txt')",
]


@pytest.mark.parametrize("sql", FILE_READERS)
def test_query_cannot_read_other_files(results_db, tmp_path, sql):
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{SECRET}\n")
    with pytest.raises(NaglError) as error:
        frame = query(results_db, sql.format(f=secret, d=tmp_path))
        assert SECRET not in frame.to_string()  # pragma: no cover - reached only if the read succeeded
    assert SECRET not in str(error.value)


WRITING_PRAGMAS = [
    "PRAGMA import_database('{d}')", "PRAGMA enable_profiling", "PRAGMA profiling_output = '{d}/p.json'",
    "PRAGMA threads = 4", "PRAGMA enable_external_access", "PRAGMA memory_limit = '1GB'",
    "PRAGMA enable_checkpoint_on_shutdown",
]


@pytest.mark.parametrize("sql", WRITING_PRAGMAS)
def test_query_refuses_pragmas_outside_the_allow_list(results_db, tmp_path, sql):
    (tmp_path / "schema.sql").write_text("CREATE TABLE owned (a INTEGER);\n")
    (tmp_path / "load.sql").write_text("COPY (SELECT 1) TO 'owned.csv';\n")
    with pytest.raises(NaglError, match="nagl query is read-only"):
        query(results_db, sql.format(d=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["load.sql", "schema.sql"]


@pytest.mark.parametrize("sql", ["SET enable_external_access = true", "RESET enable_external_access",
                                 "SELECT * FROM duckdb_settings() WHERE name = 'lock_configuration'"])
def test_query_settings_are_locked(results_db, sql):
    if sql.startswith("SELECT"):
        assert query(results_db, sql)["value"].tolist() == ["true"]
    else:
        with pytest.raises(NaglError):
            query(results_db, sql)


@pytest.mark.parametrize("pragma", sorted(READ_PRAGMAS - {"table_info", "storage_info", "show"}))
def test_query_allows_the_read_pragmas(results_db, pragma):
    assert len(query(results_db, f"PRAGMA {pragma}")) >= 1


def test_query_allows_read_pragmas_with_arguments(results_db):
    assert "run_id" in set(query(results_db, "PRAGMA table_info('runs')")["name"])
    assert len(query(results_db, "PRAGMA storage_info('runs')")) >= 1


# ----------------------------------------------------------------- permissions --


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_helpers_give_ordinary_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    with atomic_directory(tmp_path / "folder") as staging:
        (staging / "inner.txt").write_text("z")
    assert [mode(tmp_path / n) for n in ("a.txt", "b.bin", "folder")] == [0o644, 0o644, 0o755]
    os.umask(0o077)
    atomic_write_text(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600  # the umask is respected, not overridden


def test_outputs_are_644_under_umask_022(tmp_path, umask_022, monkeypatch):
    from nagl.config import load_config, validate_config, write_effective_config
    from nagl.methods import create_method
    from nagl.report import build_report

    (tmp_path / "results").mkdir()
    db = build_results_db(tmp_path / "results" / "benchmark.duckdb")
    report = build_report(db, tmp_path / "reports" / "leaderboard.html")
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "config" / "config.yaml").as_dict()
    config["results"] = str(tmp_path / "results")
    run_config = Path(write_effective_config(validate_config(config)))
    checkpoint = create_method("nagl", 8, seed=0).save(tmp_path / "results" / "models" / "nagl")
    ingested = tmp_path / "ingested.duckdb"
    from nagl.results.ingest import ingest

    ingest(tmp_path / "empty-results", ingested, [], {"git_commit": "x"})
    outputs = [report, db, ingested, run_config, checkpoint / "weights.safetensors", checkpoint / "model.json"]
    assert run_config.parent == tmp_path / "results"
    assert {path.name: oct(mode(path)) for path in outputs} == {path.name: "0o644" for path in outputs}


# -------------------------------------------------------------------- datasets --


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` (8-bit grey) with no pixel data: opening it is enough."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def folder_registry(path: Path, **options: str) -> str:
    extra = "".join(f"    {key}: {value}\n" for key, value in options.items())
    return f"datasets:\n  mine:\n    kind: folder\n    domain: industrial\n    path: {path}\n    layout: mvtec\n{extra}"


@pytest.fixture
def user_data(tmp_path):
    from dataset_fixtures import canonical_dataset

    return canonical_dataset(tmp_path / "mydata")


def test_an_image_over_the_bomb_limit_is_a_problem_not_a_crash(user_data):
    from nagl.data.validate import validate_dataset

    png_header_only(user_data / "a/test/good/000.png", 14000, 14000)
    problems = validate_dataset(user_data)
    assert [(p.path, "too large" in p.message) for p in problems] == [("a/test/good/000.png", True)]


def test_prepare_names_the_users_file_of_a_bomb_image(project, user_data):
    from nagl.data.prepare import prepare_dataset

    (user_data / "a/test/good/000.png").unlink()
    png_header_only(user_data / "a/test/good/000.jpg", 14000, 14000)
    project(folder_registry(user_data))
    with pytest.raises(NaglError) as error:
        prepare_dataset("mine", version=False)
    text = str(error.value)
    assert str(user_data / "a/test/good/000.jpg") in text and "too large" in text
    assert "re-extract" not in text


def test_prepare_names_the_users_file_and_the_archive_member(project, user_data, downloads):
    from nagl.data.prepare import prepare_dataset

    (user_data / "b/train/good/001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    project(folder_registry(user_data))
    with pytest.raises(NaglError) as error:
        prepare_dataset("mine", version=False)
    assert f"b/train/good/001.png (from {user_data / 'b/train/good/001.png'})" in str(error.value)
    assert "re-extract" not in str(error.value)

    members = {p.relative_to(user_data).as_posix(): p.read_bytes() for p in user_data.rglob("*") if p.is_file()}
    write_zip(downloads / "mine.zip", {f"release/{name}": data for name, data in members.items()})
    registry = "datasets:\n  zipped:\n    kind: mvtec\n    domain: industrial\n    filename: mine.zip\n"
    (Path.cwd() / "config" / "datasets.yaml").write_text(registry)
    with pytest.raises(NaglError) as error:
        prepare_dataset("zipped", version=False)
    assert f"(from release/b/train/good/001.png in {downloads / 'mine.zip'})" in str(error.value)


@pytest.mark.parametrize("empty", ["no files at all", "empty train/good"])
def test_prepare_refuses_an_empty_category(project, user_data, empty):
    from nagl.data.prepare import is_prepared, prepare_dataset
    from nagl.data.validate import validate_dataset

    (user_data / "c").mkdir()
    if empty == "empty train/good":
        (user_data / "c/train/good").mkdir(parents=True)
    assert any(p.path == "c" for p in validate_dataset(user_data))  # what `datasets validate` says
    project(folder_registry(user_data))
    with pytest.raises(NaglError, match=r"(holds no images|has no train/good/ folder).*not left out silently"):
        prepare_dataset("mine", version=False)
    assert not is_prepared("mine")


def test_prepare_can_leave_out_an_empty_category_on_purpose(project, user_data):
    from nagl.data.prepare import prepare_dataset

    (user_data / "c").mkdir()
    project(folder_registry(user_data, categories="[a, b]"))
    assert sorted(p.name for p in prepare_dataset("mine", version=False).path.iterdir() if p.is_dir()) == ["a", "b"]


@pytest.mark.parametrize("leak", ["train image as an anomaly", "train image as a test normal",
                                  "normal test image as an anomaly"])
def test_validator_refuses_the_same_image_in_two_roles(user_data, leak):
    import shutil

    from nagl.data.validate import validate_dataset

    source, copy = {
        "train image as an anomaly": ("a/train/good/000.png", "a/test/scratch/001.png"),
        "train image as a test normal": ("b/train/good/001.png", "b/test/good/000.png"),
        "normal test image as an anomaly": ("a/test/good/000.png", "a/test/scratch/000.png"),
    }[leak]
    shutil.copy(user_data / source, user_data / copy)
    problems = validate_dataset(user_data)
    assert len(problems) == 1 and "the same image bytes appear" in problems[0].message
    assert {problems[0].path, problems[0].message.split("(also ")[1].rstrip(")")} == {source, copy}


def test_validator_allows_one_image_in_two_categories(user_data):
    # One-vs-all datasets: an image is normal in its own class's category and anomalous in another's.
    import shutil

    from nagl.data.validate import validate_dataset

    shutil.copy(user_data / "a/test/good/000.png", user_data / "b/test/scratch/009.png")
    problems = validate_dataset(user_data)
    assert not [p for p in problems if "the same image bytes" in p.message]


def test_validator_refuses_an_all_zero_mask(user_data):
    import numpy as np
    from PIL import Image

    from nagl.data.validate import validate_dataset

    Image.fromarray(np.zeros((6, 8), np.uint8), "L").save(user_data / "b/ground_truth/scratch/001_mask.png")
    problems = validate_dataset(user_data)
    assert [(p.path, "all zero" in p.message) for p in problems] == [("b/ground_truth/scratch/001_mask.png", True)]


# ------------------------------------------------------- durability (kill -9) --

INTERRUPTED_INGEST = """
import json, sys, time
from pathlib import Path
import nagl.results.ingest as ingest

results, db, marker, datasets = sys.argv[1:5]
write_table = ingest._insert

def insert_then_hang(con, table, data):
    write_table(con, table, data)
    if table == "scores":  # half the tables are in the new file: the moment to be killed
        Path(marker).write_text("writing")
        time.sleep(600)

ingest._insert = insert_then_hang
ingest.ingest(results, db, json.loads(datasets), {"git_commit": "next"})
"""

INTERRUPTED_REPORT = """
import sys, time
from pathlib import Path
import nagl.report.build as build
from nagl.io import atomic_path

db, out, marker = sys.argv[1:4]

def write_half_then_hang(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text[: len(text) // 2])
        Path(marker).write_text("writing")
        time.sleep(600)

build.atomic_write_text = write_half_then_hang
build.build_report(db, out)
"""


def kill_when_marked(script: str, args: list[str], marker: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", script, *args, ], env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        while not marker.exists():  # the script marks the moment; no timing is asserted
            assert process.poll() is None, "the step ended before it was killed"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_kill_9_during_ingest_keeps_the_old_database_readable(tmp_path):
    import json

    from test_db import DATASETS, PROVENANCE, build_results

    from nagl.cleanup import stale_temporaries
    from nagl.results.ingest import ingest

    results = tmp_path / "results"
    n_cells = build_results(results)
    db = results / "benchmark.duckdb"
    ingest(results, db, DATASETS, PROVENANCE)
    reader = Reader(lambda: int(query(db, "SELECT count(*) AS n FROM runs")["n"][0]))
    kill_when_marked(INTERRUPTED_INGEST, [str(results), str(db), str(tmp_path / "marker"), json.dumps(DATASETS)],
                     tmp_path / "marker")
    reader.finish()
    assert reader.failures == [] and reader.values and set(reader.values) == {n_cells}
    assert query(db, "SELECT value FROM provenance WHERE key = 'git_commit'")["value"].tolist() == ["abc123"]
    left = stale_temporaries([results])  # the half-built file (and its write-ahead log): for the cleanup
    assert left and {p.name.startswith(".benchmark.duckdb.") for p in left} == {True}


def test_kill_9_during_the_report_keeps_the_old_report(tmp_path):
    from nagl.report import build_report

    db = build_results_db(tmp_path / "benchmark.duckdb")
    out = build_report(db, tmp_path / "reports" / "leaderboard.html")
    before = out.read_bytes()
    reader = Reader(out.read_bytes)
    kill_when_marked(INTERRUPTED_REPORT, [str(db), str(out), str(tmp_path / "marker")], tmp_path / "marker")
    reader.finish()
    assert reader.failures == [] and reader.values and set(reader.values) == {before}
    assert out.read_bytes() == before


def test_workflow_outputs_are_stamps_not_the_database_or_report():
    """Snakemake deletes a rule's outputs before the job runs: the database and the report must not be outputs."""
    import re

    rules = (REPO / "workflow" / "rules" / "results.smk").read_text() + (REPO / "Snakefile").read_text()
    outputs = re.findall(r"output:\s*\n\s*([^\n]+)", rules)
    assert outputs == ["DB_STAMP,", "REPORT_STAMP,"]


# ------------------------------------------------------- stale temporaries --


def test_cleanup_removes_only_the_platforms_temporaries(project, monkeypatch, tmp_path):
    from nagl.cleanup import clean_before_run

    root = project()
    monkeypatch.setenv("NAGL_CACHE", str(root / ".cache" / "nagl"))
    shared = tmp_path / "shared-weights" / ".vit.safetensors.a1b2c3d4.tmp"  # another project's, maybe running
    shared.parent.mkdir()
    shared.write_bytes(b"x")
    monkeypatch.setenv("NAGL_WEIGHTS", str(shared.parent))
    stale = [
        "datasets/.mine.k2j4h5g6.staging/cat/train/good/000.png",
        "datasets/.mine-extract.ab12cd34.staging/archive/x.png",
        "datasets/.mine.old-4242/cat/x.png",
        "results/.benchmark.duckdb.q1w2e3r4.tmp",
        "results/.benchmark.duckdb.q1w2e3r4.tmp.wal",
        "results/cells/nagl/bb/a/b/c/n1a0s0/.run.json.zx9_8y7w.tmp",
        ".cache/nagl/features/.ab.12345678.tmp",
        "reports/.leaderboard.html.abcdefgh.tmp",
    ]
    kept = [
        "datasets/mine/cat/train/good/000.png", "datasets/notes.tmp", "datasets/.mine.staging",
        "results/my.tmp", "results/.hidden", "results/.benchmark.duckdb.built", "reports/leaderboard.html",
        "results/.benchmark.duckdb.tmp", "results/.x.TOOLONGNAME.tmp",
    ]
    for name in stale + kept:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    # clean_before_run reads the run config's two folders only
    removed = clean_before_run(SimpleNamespace(results="results", report="reports/leaderboard.html"), root)
    assert not [name for name in stale if (root / name).exists()]
    assert [name for name in kept if (root / name).exists()] == kept
    assert len(removed) == len(stale) and shared.exists()


def test_prepare_cleans_stale_staging_only_when_no_run_holds_the_lock(project, user_data):
    from typer.testing import CliRunner

    from nagl.cleanup import try_run_lock
    from nagl.cli.main import _app

    root = project(folder_registry(user_data))
    stale = root / "datasets" / ".mine.k2j4h5g6.staging"
    (stale / "cat").mkdir(parents=True)
    with try_run_lock(root) as held:  # a run is going: its staging must survive
        assert held
        result = CliRunner().invoke(_app, ["datasets", "prepare", "mine", "--no-version"])
        assert result.exit_code == 0, result.output
        assert stale.is_dir()
    (root / "datasets" / "mine").rename(root / "datasets" / ".keep")
    result = CliRunner().invoke(_app, ["datasets", "prepare", "mine", "--no-version"])
    assert result.exit_code == 0, result.output
    assert not stale.exists()


# --------------------------------------------------------------------- weights --


class _Planted:
    """Unpickling this object would run code: it creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_weights_are_loaded_without_running_pickled_code(tmp_path):
    import torch

    from nagl.models.weights import read_state_dict

    checkpoint = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Planted(tmp_path / "ran")}, checkpoint)
    with pytest.raises(NaglError, match="cannot read weights file"):
        read_state_dict(checkpoint)
    assert not (tmp_path / "ran").exists()


def test_extraction_limits_hold_for_7z_and_gz(tmp_path, monkeypatch):
    # The formats added for AITEX (.7z) and MNIST (bare .gz) go through the same budget.
    import gzip

    import py7zr

    with py7zr.SevenZipFile(tmp_path / "big.7z", "w") as seven:
        seven.writestr(bytes(6000), "a.bin")
        seven.writestr(bytes(6000), "b.bin")
    with pytest.raises(NaglError, match=r"more than 10000 bytes .*NAGL_EXTRACT_MAX_BYTES"):
        safe_extract(tmp_path / "big.7z", tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()
    # (not zeros: a gzip of zeros reads as an empty tar archive)
    (tmp_path / "zeros.gz").write_bytes(gzip.compress(b"ab" * 100 * 1024))
    monkeypatch.setattr("nagl.data.archives.RATIO_FLOOR", 1024)
    limits = ExtractionLimits(max_bytes=10**12, max_members=10, max_ratio=100.0)
    with pytest.raises(NaglError, match="more than 100 times its own size.*NAGL_EXTRACT_MAX_RATIO"):
        safe_extract(tmp_path / "zeros.gz", tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()
