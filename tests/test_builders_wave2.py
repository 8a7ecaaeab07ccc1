"""The builders of the reference benchmarks' datasets, each on a small release in its own layout and
archive format (tests/wave2_fixtures.py), then through the steps of `nagl datasets prepare`:
normalise, validate (must be clean), manifest. Where the full release is in the downloads folder,
the registry entry is built from it and its counts are checked against the spec; otherwise that
test is skipped and says which files are missing.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import wave2_fixtures as w2
from PIL import Image
from test_converters import assert_binary_png_masks, build, counts, prepare

from nagl.data import layout
from nagl.data.builders import builder_for
from nagl.data.builders.common import split_quarter
from nagl.data.builders.semantic import read_cifar_batch
from nagl.data.registry import DatasetSpec, load_registry
from nagl.errors import MissingDataError, NaglError

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "config" / "datasets.yaml"
FULL_DATA = Path(os.environ.get("NAGL_DOWNLOADS", REPO / "downloads"))  # before the tests redirect it


def spec(name: str, kind: str, release: w2.Release, **options) -> DatasetSpec:
    return DatasetSpec(name=name, kind=kind, domain="test", options={**release.options, **options})


def built(tmp_path: Path, name: str, kind: str, release: w2.Release, **options):
    """Build with the release's counts as the ``counts`` option (so the check runs), then prepare."""
    out = build(spec(name, kind, release, counts=release.expected, **options), tmp_path)
    manifest = prepare(out, name)
    assert counts(manifest) == release.expected
    assert not any(p.name.startswith(".") for p in (tmp_path / "datasets").iterdir())  # no scratch left
    return out, manifest


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# MedIAnomaly-Data ---------------------------------------------------------------------------------

def test_camelyon16_ungood_folder(tmp_path, downloads):
    out, manifest = built(tmp_path, "camelyon16", "medianomaly", w2.camelyon_archive(downloads))
    assert set(manifest["defect_type"]) == {"good", "ungood"}
    assert manifest["mask_path"].isna().all()
    assert (downloads / "Camelyon16.tar.gz.sha256").is_file()  # md5 checked, sha256 recorded


@pytest.mark.parametrize("subset", ["RSNA", "VinCXR", "BrainTumor", "LAG"])
def test_medianomaly_json_sets_ignore_unlabeled(tmp_path, downloads, subset):
    release = w2.json_set_archive(downloads, subset)
    out, manifest = built(tmp_path, subset.lower(), "medianomaly", release)
    assert set(manifest["defect_type"]) == {"good", "abnormal"}
    if subset == "BrainTumor":
        assert names(out / "braintumor/test/abnormal") == ["Te-gl_0013.png", "Te-me_0014.png"]
        assert names(out / "braintumor/train/good") == ["Tr-no_0001.png", "Tr-no_0002.png", "Tr-no_0003.png"]


def test_count_mismatch_names_the_folder_and_both_numbers(tmp_path, downloads):
    release = w2.camelyon_archive(downloads)
    wrong = {"camelyon16": {"train_good": 5088, "test_anomalous": 2}}
    with pytest.raises(NaglError, match=r"camelyon16 does not have the counts of the release \(train_good: built 3, "
                                        r"expected 5088\)"):
        build(spec("camelyon16", "medianomaly", release, counts=wrong), tmp_path)
    with pytest.raises(NaglError, match=r"unknown keys \['trian_good'\]"):
        build(spec("c2", "medianomaly", release, counts={"camelyon16": {"trian_good": 3}}), tmp_path)


def test_md5_mismatch_stops_the_build(tmp_path, downloads):
    release = w2.camelyon_archive(downloads)
    with pytest.raises(NaglError, match=f"has md5 {release.options['md5']}, expected {'e' * 32}"):
        build(spec("camelyon16", "medianomaly", release, md5="e" * 32), tmp_path)
    assert not (downloads / "Camelyon16.tar.gz.sha256").exists()


# ISIC 2018 ----------------------------------------------------------------------------------------

def test_isic2018(tmp_path, downloads):
    out, manifest = built(tmp_path, "isic2018", "isic2018", w2.isic_archives(downloads))
    assert names(out / "isic2018/test") == ["bcc", "good", "mel"]
    assert names(out / "isic2018/test/bcc") == ["ISIC_0034527.png", "ISIC_0034528.png"]
    assert "ISIC_0024309.png" not in set(manifest["image_path"].str.split("/").str[-1])  # MEL in training: unused
    assert not list(out.rglob("*.txt"))


def test_isic2018_missing_files_are_listed_together(tmp_path, downloads):
    release = w2.isic_archives(downloads)
    for path in release.paths[1:3]:
        path.unlink()
    with pytest.raises(MissingDataError) as error:
        build(spec("isic2018", "isic2018", release), tmp_path)
    text = str(error.value)
    assert "needs 4 files; 2 missing" in text
    assert str(release.paths[1]) in text and str(release.paths[2]) in text and str(release.paths[0]) not in text


def test_isic2018_row_with_two_classes(tmp_path, downloads):
    release = w2.isic_archives(downloads)
    bad = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0024306,1.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
    path = w2.write_zip(release.paths[1], {"ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv":
                                           bad.encode()})
    release.options["files"][1]["sha256"] = w2.sha256_file(path)
    with pytest.raises(NaglError, match=r"Training_GroundTruth.csv, line 2: expected exactly one class .*\['MEL', 'NV'\]"):
        build(spec("isic2018", "isic2018", release), tmp_path)


# AITEX --------------------------------------------------------------------------------------------

def test_aitex_tiles_and_quirks(tmp_path, downloads):
    out, manifest = built(tmp_path, "aitex", "aitex", w2.aitex_archives(downloads))
    test = out / "aitex/test"
    assert names(test) == ["broken_end", "fuzzyball", "good", "knots"]
    assert names(test / "broken_end") == ["0001_002_00_1.png"]
    assert names(test / "fuzzyball") == ["0044_019_04_0.png", "0044_019_04_2.png"]  # _mask1 + _mask2
    assert names(test / "knots") == ["0094_027_05_3.png"]
    with Image.open(test / "knots/0094_027_05_3.png") as tile:
        assert tile.size == (900 - 3 * 256, 256)  # the narrow image's last tile
    normals = sorted(manifest[manifest["label"] == 0]["image_path"].str.split("/").str[-1])
    assert len(normals) == 16 and "2311980-L1_0018_00_01_3.png" in normals
    assert not any("0100_025_08" in p or "0106_010_03" in p for p in manifest["image_path"])
    assert_binary_png_masks(out, 4)
    with Image.open(out / "aitex/ground_truth/fuzzyball/0044_019_04_2_mask.png") as mask:
        assert np.asarray(mask)[100:120, 600 - 512:610 - 512].all()


def test_aitex_unknown_defect_code(tmp_path, downloads):
    release = w2.aitex_archives(downloads)
    path = w2.write_7z(release.paths[0], {"Defect_images/0001_099_00.png": w2.png(w2.grey(1, 256, 256))})
    release.options["files"][0]["sha256"] = w2.sha256_file(path)
    with pytest.raises(NaglError, match=r"0001_099_00.png: defect code '099' is not one of AITEX's"):
        build(spec("aitex", "aitex", release), tmp_path)


# KolektorSDD --------------------------------------------------------------------------------------

def test_kolektorsdd_thirds(tmp_path, downloads):
    out, manifest = built(tmp_path, "sdd", "kolektorsdd", w2.sdd_archive(downloads))
    assert names(out / "sdd/test/defect") == ["kos01_Part1_1.png"]  # only the middle third
    assert_binary_png_masks(out, 1)
    with Image.open(out / "sdd/test/defect/kos01_Part1_1.png") as third:
        assert third.size == (12, 10)
    stems = sorted(manifest[manifest["label"] == 0]["image_path"].str.split("/").str[-1].str[:-4])
    expected = sorted(f"{kos}_Part{p}_{i}" for kos in ("kos01", "kos02") for p in (0, 1) for i in range(3)
                      if (kos, p, i) != ("kos01", 1, 1))
    assert stems == expected
    train = sorted(p[:-4] for p in manifest[manifest["split"] == "train"]["image_path"].str.split("/").str[-1])
    assert train == split_quarter(expected, 0)[0]


# ELPV ---------------------------------------------------------------------------------------------

def test_elpv_release(tmp_path, downloads):
    out, manifest = built(tmp_path, "elpv-release", "elpv-release", w2.elpv_archive(downloads))
    assert names(out / "elpv/test") == ["good", "mono", "poly"]
    assert names(out / "elpv/test/mono") == ["cell0007.png", "cell0008.png"]
    dropped = {"cell0010.png", "cell0011.png"}  # probabilities 1/3 and 2/3
    assert not dropped & set(manifest["image_path"].str.split("/").str[-1])


@pytest.mark.slow
def test_elpv_release_full_data_from_the_installed_package(tmp_path, downloads):
    """The real 2,624 cells: the elpv-dataset package ships the release's images/ and labels.csv."""
    elpv_dataset = pytest.importorskip("elpv_dataset", reason="the elpv-dataset package is not installed")
    data = Path(elpv_dataset.__file__).parent / "data"
    archive = downloads / "elpv-dataset-master.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for path in sorted(data.rglob("*")):
            if path.is_file() and (path.name == "labels.csv" or path.parent.name == "images"):
                zipped.write(path, f"elpv-dataset-master/src/elpv_dataset/data/{path.relative_to(data)}")
    entry = load_registry(REGISTRY)["elpv-release"]
    out = build(entry, tmp_path)  # the entry's `counts` (the spec's 1131 / 377 / 715) are checked
    assert {d: len(names(out / "elpv/test" / d)) for d in ("mono", "poly")} == {"mono": 313, "poly": 402}


# Kaggle sets --------------------------------------------------------------------------------------

def test_brainmri_uses_the_top_pair(tmp_path, downloads):
    out, manifest = built(tmp_path, "brainmri", "brainmri", w2.brainmri_archive(downloads))
    assert names(out / "brainmri/test/tumor") == ["Y 3.png", "Y1.png", "Y2.png"]  # not brain_tumor_dataset/yes/Y99
    normals = sorted(manifest[manifest["label"] == 0]["image_path"].str.split("/").str[-1])
    assert normals == ["1 no.png", "3 no.png", "N2.png", "no 4.png"]


def test_headct(tmp_path, downloads):
    out, manifest = built(tmp_path, "headct", "headct", w2.headct_archive(downloads))
    assert names(out / "headct/test/hemorrhage") == ["000.png", "001.png", "002.png", "003.png"]
    assert set(manifest["width"]) == set(range(10, 18))


def test_manual_kaggle_download_offline_message(tmp_path, downloads):
    entry = load_registry(REGISTRY)["brainmri"]
    with pytest.raises(MissingDataError) as error:
        build(entry, tmp_path)
    text = str(error.value)
    assert str(downloads.absolute() / "brain-mri-images-for-brain-tumor-detection.zip") in text
    assert "kaggle.com/datasets/navoneel" in text and "download the archive in a browser" in text


# MNIST, CIFAR-10 ----------------------------------------------------------------------------------

def test_mnist_one_vs_all(tmp_path, downloads):
    release = w2.mnist_files(downloads)
    release.expected = {f"c{k}": w2.counts(3, 2, 18) for k in range(10)}
    out, manifest = built(tmp_path, "mnist", "mnist", release)
    assert names(out / "c3/train/good") == ["train_00003.png", "train_00013.png", "train_00023.png"]
    assert names(out / "c3/test") == ["0", "1", "2", "4", "5", "6", "7", "8", "9", "good"]
    for path in manifest["image_path"]:  # the fixture writes each image's label into its first pixel
        with Image.open(out / path) as image:
            label = int(np.asarray(image)[0, 0, 0])
        category, _split, folder = path.split("/")[:3]
        assert (folder == "good") == (label == int(category[1:])) and folder in ("good", str(label))


def test_mnist_multiclass_and_category_subset(tmp_path, downloads):
    release = w2.mnist_files(downloads)
    release.expected = {"even": w2.counts(15, 10, 10)}
    out, _manifest = built(tmp_path, "mnist-multiclass", "mnist", release, protocol="multiclass")
    assert names(out / "even/test") == ["1", "3", "5", "7", "9", "good"]
    subset = build(spec("m2", "mnist", release, categories=["c0"]), tmp_path)
    assert layout.categories(subset) == ["c0"]
    with pytest.raises(NaglError, match="option 'protocol' must be one of"):
        build(spec("m3", "mnist", release, protocol="two-class"), tmp_path)


def test_cifar10_both_protocols(tmp_path, downloads):
    release = w2.cifar_archive(downloads)
    release.expected = {f"c{k}": w2.counts(5, 1, 9) for k in range(10)}
    out, _manifest = built(tmp_path, "cifar10", "cifar10", release)
    assert names(out / "c0/test") == ["automobile", "bird", "cat", "deer", "dog", "frog", "good", "horse", "ship",
                                      "truck"]
    with Image.open(out / "c0/test/good/test_00000.png") as image:
        assert image.size == (32, 32) and np.asarray(image)[0, 0, 0] == 0
    release.expected = {"animals": w2.counts(30, 6, 4)}
    out, _manifest = built(tmp_path, "cifar10-multiclass", "cifar10", release, protocol="multiclass")
    assert names(out / "animals/test") == ["airplane", "automobile", "good", "ship", "truck"]


def test_cifar_batches_are_read_without_running_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned > owned.txt",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(NaglError, match=r"not a CIFAR-10 python batch .*is not allowed"):
        read_cifar_batch(path)
    assert not (tmp_path / "owned.txt").exists() and not Path("owned.txt").exists()
    planes = np.zeros((1, 3072), np.uint8)
    planes[0, [1, 1024 + 1, 2048 + 1, 32]] = [10, 20, 30, 40]  # pixel (0, 1) in the R, G, B planes; R of (1, 0)
    buffer = io.BytesIO()
    pickle.dump({b"data": planes, b"labels": [4]}, buffer, protocol=2)
    path.write_bytes(buffer.getvalue())
    images, labels = read_cifar_batch(path)
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [4]
    assert images[0, 0, 1].tolist() == [10, 20, 30] and images[0, 1, 0].tolist() == [40, 0, 0]


# MVTec 3D-AD --------------------------------------------------------------------------------------

def test_mvtec3d_rgb_only(tmp_path, downloads):
    out, manifest = built(tmp_path, "mvtec3d", "mvtec3d", w2.mvtec3d_archive(downloads))
    assert layout.categories(out) == ["bagel", "cable_gland"]
    assert names(out / "bagel") == ["ground_truth", "test", "train"]  # validation dropped
    assert names(out / "bagel/ground_truth") == ["crack", "hole"]  # the good test images' empty gt not copied
    assert not list(out.rglob("*.tiff"))
    assert_binary_png_masks(out, 6)
    totals = {"all": {k: sum(c[k] for c in counts(manifest).values()) for k in ("train_good", "test_good")}}
    build(spec("mvtec3d-total", "mvtec3d", w2.mvtec3d_archive(downloads), counts=totals), tmp_path)
    with pytest.raises(NaglError, match=r"datasets/mvtec3d-wrong does not have the counts .*train_good: built 6, expected 2656"):
        build(spec("mvtec3d-wrong", "mvtec3d", w2.mvtec3d_archive(downloads),
                   counts={"all": {"train_good": 2656}}), tmp_path)


# The registry and the full data -------------------------------------------------------------------

WAVE2 = {"camelyon16": "medianomaly", "rsna": "medianomaly", "vincxr": "medianomaly", "braintumor": "medianomaly",
         "lag": "medianomaly", "brats2021": "medianomaly", "isic2018": "isic2018", "aitex": "aitex",
         "sdd": "kolektorsdd", "elpv-release": "elpv-release", "brainmri": "brainmri", "headct": "headct",
         "mnist": "mnist", "mnist-multiclass": "mnist", "cifar10": "cifar10", "cifar10-multiclass": "cifar10",
         "mvtec3d": "mvtec3d"}
WITH_MASKS = {"brats2021", "aitex", "sdd", "mvtec3d"}


def archive_entries(entry: DatasetSpec) -> list[dict]:
    return entry.options["files"] if "files" in entry.options else [entry.options]


def test_registry_entries_of_the_reference_benchmarks():
    specs = load_registry(REGISTRY)
    assert {name: specs[name].kind for name in WAVE2} == WAVE2
    for name in WAVE2:
        entry = specs[name]
        builder_for(entry.kind)
        assert entry.masks is (name in WITH_MASKS), name
        assert entry.anomaly == ("semantic" if entry.domain == "semantic" else "defect"), name
        assert entry.options["counts"], name
        for archive in archive_entries(entry):
            assert archive["filename"] and archive["url"].startswith("https://"), name
            md5, sha = archive.get("md5"), archive.get("sha256")
            assert (md5 is None or len(md5) == 32) and (sha is None or len(sha) == 64), name
    assert specs["brats2021"].options["size"] == 70262263
    assert specs["sdd"].options["sha256"] == "65dc621693418585de9c4467d1340ea7958a6181816f0dc2883a1e8b61f9d4dc"
    assert specs["mnist-multiclass"].options["protocol"] == "multiclass"
    assert specs["brainmri"].options["download"] == specs["headct"].options["download"] == "manual"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WAVE2))
def test_full_data_counts_match_the_spec(tmp_path, monkeypatch, name):
    """Built from the real release (in downloads/ or NAGL_DOWNLOADS); the entry's counts are the spec's."""
    entry = load_registry(REGISTRY)[name]
    missing = [a["filename"] for a in archive_entries(entry) if not (FULL_DATA / a["filename"]).is_file()]
    if missing:
        pytest.skip(f"full data absent: {', '.join(missing)} not in {FULL_DATA}")
    monkeypatch.setenv("NAGL_DOWNLOADS", str(FULL_DATA))
    monkeypatch.setenv("NAGL_OFFLINE", "1")
    build(entry, tmp_path)  # raises if any count differs from the entry's `counts`
