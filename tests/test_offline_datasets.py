"""The offline real datasets (ELPV from elpv-dataset, scikit-learn digits), image-level targets end
to end (NULL pixel metrics, pseudo-masks counted per cell), registry flags and `datasets missing`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from nagl.cli.main import _app
from nagl.data.builders import digits as digits_builder
from nagl.data.builders import elpv as elpv_builder
from nagl.data.builders.subsets import capped, read_caps, split_normals
from nagl.data.layout import read_manifest
from nagl.data.missing import needed_archives
from nagl.data.prepare import prepare_dataset
from nagl.data.registry import DatasetSpec, load_registry
from nagl.errors import NaglError
from nagl.methods.base import pseudo_mask_count

REGISTRY = """
datasets:
  elpv-mini:
    kind: elpv-package
    domain: industrial
    masks: false
    licence: CC BY-NC-SA 4.0
    max_images: {train_good: 6, test_good: 4, test_anomalous: 5}
  digits-mini:
    kind: sklearn-digits
    domain: semantic
    masks: false
    anomaly: semantic
    size: 16
    max_categories: 2
    max_images: {train_good: 5, test_good: 3, test_anomalous: 4}
  zenodo-set:
    kind: medianomaly
    domain: medical
    url: https://example.org/Set.tar.gz
    md5: 0123456789abcdef0123456789abcdef
    size: 70262263
    filename: Set.tar.gz
  kaggle-set:
    kind: folder
    domain: medical
    download: manual
    files:
      - {url: https://example.org/a.zip, filename: a.zip, sha256: null}
      - {url: https://example.org/b.zip, filename: b.zip, md5: ffffffffffffffffffffffffffffffff}
"""


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


# ------------------------------------------------------------------ splits ---

def test_split_normals_puts_ceil_quarter_in_test_whatever_the_input_order():
    names = [f"n{i:03d}" for i in range(10)]
    train, test = split_normals(names, seed=3)
    assert len(test) == math.ceil(0.25 * 10) == 3 and len(train) == 7
    assert sorted(train + test) == names
    assert split_normals(list(reversed(names)), seed=3) == (train, test)
    assert split_normals(names, seed=4) != (train, test)


def test_capped_is_a_seeded_subset_and_the_caps_are_checked():
    items = list(range(50))
    first = capped(items, 10, seed=0, stream=1)
    assert len(first) == 10 and set(first) <= set(items)
    assert capped(list(reversed(items)), 10, seed=0, stream=1) == first
    assert capped(items, 10, seed=0, stream=2) != first
    assert capped(items, None, seed=0, stream=1) == items
    with pytest.raises(NaglError, match="max_images.test_good"):
        read_caps({"max_images": {"test_good": 0}}, "here")
    with pytest.raises(NaglError, match="max_images"):
        read_caps({"max_images": {"validation": 3}}, "here")


# -------------------------------------------------------------------- ELPV ---

def _elpv_labels() -> dict[str, tuple[float, str]]:
    return elpv_builder.read_labels(elpv_builder.package_data_dir() / "labels.csv")


def test_elpv_follows_inctrl_protocol_and_caps_are_subsets_of_the_full_split(tmp_path):
    labels = _elpv_labels()
    assert len(labels) == 2624
    caps = {"train_good": 7, "test_good": 5, "test_anomalous": 9}
    out = tmp_path / "elpv"
    elpv_builder.convert_elpv(elpv_builder.package_data_dir(), out, seed=0, caps=caps)
    category = out / elpv_builder.CATEGORY
    found = {split: sorted(p.name for p in (category / split).rglob("*.png"))
             for split in ("train/good", "test/good", "test/mono", "test/poly")}
    assert len(found["train/good"]) == 7 and len(found["test/good"]) == 5
    assert len(found["test/mono"]) + len(found["test/poly"]) == 9

    full_train, full_test = split_normals([p for p, (q, _) in labels.items() if q == 0], seed=0)
    assert {f"images/{n}" for n in found["train/good"]} <= set(full_train)
    assert {f"images/{n}" for n in found["test/good"]} <= set(full_test)
    for cell_type in ("mono", "poly"):
        for name in found[f"test/{cell_type}"]:
            assert labels[f"images/{name}"] == (1.0, cell_type)  # only probability 1, of its own type
    # The same seed gives the same bytes; the images are the package's, unchanged.
    again = tmp_path / "again"
    elpv_builder.convert_elpv(elpv_builder.package_data_dir(), again, seed=0, caps=caps)
    assert _files(out) == _files(again)
    name = found["test/good"][0]
    assert (category / "test/good" / name).read_bytes() == (elpv_builder.package_data_dir() / "images" / name).read_bytes()


def test_elpv_counts_are_checked_against_the_release(tmp_path):
    release = tmp_path / "release"
    (release / "images").mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(release / "images" / f"cell{i:04d}.png")
        lines.append(f"images/cell{i:04d}.png  {[0.0, 1.0, 0.3333333333333333][i % 3]}  mono")
    (release / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(NaglError, match=r"labels\.csv: the ELPV conversion gives .*'train_good': 2.*1131"):
        elpv_builder.convert_elpv(release, tmp_path / "out", seed=0, caps=read_caps({}, "x"))
    (release / "labels.csv").write_text("images/cell0000.png  0.0  amorphous\n")
    with pytest.raises(NaglError, match="line 1: type must be mono or poly"):
        elpv_builder.convert_elpv(release, tmp_path / "out2", seed=0, caps=read_caps({}, "x"))


# ------------------------------------------------------------------ digits ---

def test_digits_one_vs_all_full_category_counts_and_upsampling(tmp_path):
    spec = DatasetSpec("d", "sklearn-digits", "semantic", {"size": 16, "max_categories": 1, "seed": 2})
    digits_builder.build_digits(spec, tmp_path)
    (category,) = [p for p in tmp_path.iterdir()]
    c = int(category.name.removeprefix("digit-"))
    n_class = digits_builder.CLASS_COUNTS[c]
    train = list((category / "train" / "good").glob("*.png"))
    test_good = list((category / "test" / "good").glob("*.png"))
    anomalous = [p for d in (category / "test").iterdir() if d.name != "good" for p in d.glob("*.png")]
    assert len(test_good) == math.ceil(0.25 * n_class) and len(train) + len(test_good) == n_class
    assert len(anomalous) == 1797 - n_class
    assert f"digit-{c}" not in {p.parent.name for p in anomalous}

    from sklearn.datasets import load_digits

    data = load_digits()
    for path in train[:3] + anomalous[:3]:
        index = int(path.stem)
        image = np.asarray(Image.open(path))
        assert image.shape == (16, 16)
        expected_class = c if path.parent.name == "good" else int(path.parent.name.removeprefix("digit-"))
        assert data.target[index] == expected_class
        scaled = np.rint(data.images[index] * 255 / 16).astype(np.uint8)
        assert np.array_equal(image, np.asarray(Image.fromarray(scaled).resize((16, 16), Image.BILINEAR)))


def test_digits_options_are_checked(tmp_path):
    with pytest.raises(NaglError, match="max_categories"):
        digits_builder.build_digits(DatasetSpec("d", "sklearn-digits", "semantic", {"max_categories": 11}), tmp_path)
    with pytest.raises(NaglError, match="'size'"):
        digits_builder.build_digits(DatasetSpec("d", "sklearn-digits", "semantic", {"size": 4}), tmp_path)


# --------------------------------------------------------- registry flags ---

def test_registry_flags_are_read_and_checked(tmp_path):
    specs = load_registry(_write(tmp_path / "r.yaml", REGISTRY))
    assert (specs["elpv-mini"].masks, specs["elpv-mini"].anomaly, specs["elpv-mini"].licence) == \
        (False, "defect", "CC BY-NC-SA 4.0")
    assert specs["digits-mini"].anomaly == "semantic" and "anomaly" not in specs["digits-mini"].options
    assert specs["zenodo-set"].masks is None and specs["zenodo-set"].licence is None
    bad = REGISTRY.replace("anomaly: semantic", "anomaly: novelty")
    with pytest.raises(NaglError, match="'digits-mini': 'anomaly' must be one of defect, semantic"):
        load_registry(_write(tmp_path / "bad.yaml", bad))
    with pytest.raises(NaglError, match="'masks' must be true or false"):
        load_registry(_write(tmp_path / "bad2.yaml", REGISTRY.replace("masks: false", "masks: maybe", 1)))
    # A key given twice in one entry (DVC refuses such a file, PyYAML would keep the last).
    twice = REGISTRY.replace("masks: false", "masks: false\n    masks: false", 1)
    with pytest.raises(NaglError, match="key 'masks' appears twice"):
        load_registry(_write(tmp_path / "twice.yaml", twice))


def test_the_project_registry_states_flags_for_the_offline_sets():
    specs = load_registry()
    for name in ("elpv", "digits"):
        assert specs[name].masks is False and specs[name].licence
    assert specs["digits"].anomaly == "semantic" and specs["elpv"].licence == "CC BY-NC-SA 4.0"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------- datasets missing ---

def test_missing_lists_each_archive_with_place_size_checksum_and_manual(project, downloads):
    project(REGISTRY)
    (downloads / "a.zip").write_bytes(b"placed by hand")
    needs = needed_archives(["elpv-mini", "zenodo-set", "kaggle-set"])
    assert [(n.dataset, n.path.name) for n in needs] == [("zenodo-set", "Set.tar.gz"), ("kaggle-set", "b.zip")]
    zenodo, kaggle = needs
    assert zenodo.path == downloads.absolute() / "Set.tar.gz" and not zenodo.manual
    assert zenodo.checksum_text == "md5:0123456789abcdef0123456789abcdef" and zenodo.size_text.startswith("70,262,263 B")
    assert kaggle.manual and kaggle.url == "https://example.org/b.zip"

    config = Path("config/mini.yaml")
    config.write_text(json.dumps({
        "backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32, "methods": ["knn-normal"],
        "sources": [], "targets": ["elpv-mini", "zenodo-set", "kaggle-set"],
        "shots": {"k_normal": [1], "k_abnormal": [0]}, "seeds": [0], "training": {"profile": "smoke"}}))
    result = CliRunner().invoke(_app, ["datasets", "missing", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"place at: {downloads.absolute() / 'Set.tar.gz'}" in result.output
    assert "https://example.org/Set.tar.gz" in result.output and "download: manual" in result.output
    assert "a.zip" not in result.output and "elpv-mini" not in result.output


# ------------------------------------------- image-level targets end to end ---

def test_pseudo_mask_count_counts_missing_and_empty_masks():
    grid = (4, 4)
    masks = torch.zeros((3, 16, 16), dtype=torch.bool)
    masks[0, 2:5, 2:5] = True
    assert pseudo_mask_count(masks, 3, grid) == 2
    assert pseudo_mask_count(None, 2, grid) == 2
    assert pseudo_mask_count([masks[0], None], 2, grid) == 1
    assert pseudo_mask_count(None, 0, grid) == 0


def test_image_level_target_has_null_pixel_metrics_and_counted_pseudo_masks(project):
    from nagl.config import validate_config
    from nagl.evaluate import evaluate_job
    from nagl.results.ingest import dataset_rows, ingest

    root = project(REGISTRY)
    prepare_dataset("elpv-mini", version=False)
    manifest = read_manifest(root / "datasets" / "elpv-mini")
    assert manifest["mask_path"].isna().all() and int(manifest["label"].sum()) == 5
    config = validate_config({"backbone": "effnet-lite0", "image_size": 64, "eval_resolution": 32,
                              "methods": ["knn-naive"], "sources": [], "targets": ["elpv-mini"],
                              "shots": {"k_normal": [1], "k_abnormal": [0, 2]}, "seeds": [0],
                              "training": {"profile": "smoke", "seeds": [0]}, "results": str(root / "results")})
    cells = [Path(c) for c in evaluate_job(config, "knn-naive", "-", "elpv-mini")]
    assert len(cells) == 2
    for cell in cells:
        run = json.loads((cell / "run.json").read_text())
        metrics = json.loads((cell / "metrics.json").read_text())
        assert run["n_pseudo_masks"] == run["k_abnormal"]
        assert all(value is None for value in metrics["pixel"].values())
        assert 0 <= metrics["image"]["auroc"] <= 1
    db = root / "results" / "benchmark.duckdb"
    ingest(root / "results", db, dataset_rows(["elpv-mini"]), {"test": "1"}, cell_dirs=cells)
    with duckdb.connect(str(db), read_only=True) as con:
        assert sorted(con.execute("SELECT k_abnormal, n_pseudo_masks FROM runs").fetchall()) == [(0, 0), (2, 2)]
        assert con.execute("SELECT COUNT(*) FROM metrics WHERE level = 'pixel' AND value IS NOT NULL").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM metrics WHERE level = 'pixel' AND value IS NULL").fetchone()[0] == 8
        assert con.execute("SELECT anomaly, licence, has_masks FROM datasets").fetchall() == \
            [("defect", "CC BY-NC-SA 4.0", False)]


# ----------------------------------------------------- reference configs ---

@pytest.mark.parametrize("name", ["config", "paper", "inctrl", "resad", "medianomaly"])
def test_reference_benchmark_configs_validate(name):
    from nagl.config import load_config
    from nagl.settings import project_dir

    path = project_dir() / "config" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert not (set(raw["sources"]) | set(raw["targets"])) - set(load_registry())
    config = load_config(path)
    assert config.targets and set(config.sources) <= set(load_registry())
