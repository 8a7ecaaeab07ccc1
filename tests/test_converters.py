"""Every converter on a small archive in its dataset's original release layout.

Archives are placed in a temporary downloads folder (NAGL_DOWNLOADS) with their
sha256 in the spec, and NAGL_OFFLINE=1, so nothing touches the network. Each
conversion then goes through the same steps as `nagl datasets prepare`:
normalise, validate (must be clean), manifest.
"""

from __future__ import annotations

from pathlib import Path

import dataset_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from nagl.data import layout
from nagl.data.builders import builder_for
from nagl.data.converters import split_normal
from nagl.data.registry import DatasetSpec, load_registry
from nagl.data.validate import validate_dataset
from nagl.errors import MissingDataError, NaglError

REPO = Path(__file__).resolve().parents[1]



def spec_for(name: str, kind: str, archive: fx.FixtureArchive | None = None, **options) -> DatasetSpec:
    if archive is not None:
        options = {"url": f"https://example.org/{archive.filename}", "sha256": archive.sha256,
                   "filename": archive.filename, **options}
    return DatasetSpec(name=name, kind=kind, domain="test", options=options)


def build(spec: DatasetSpec, tmp_path: Path) -> Path:
    out = tmp_path / "datasets" / spec.name
    out.mkdir(parents=True)
    builder_for(spec.kind)(spec, out)
    return out


def prepare(out: Path, name: str):
    layout.normalise_images(out)
    assert validate_dataset(out) == []
    return layout.write_manifest(out, name)


def counts(manifest) -> dict:
    summary = layout.summarise(manifest)["per_category"]
    return {c: {k: v for k, v in s.items() if k != "defect_types"} for c, s in summary.items()}


def assert_binary_png_masks(out: Path, expected: int) -> None:
    masks = sorted(out.rglob("*_mask.png"))
    assert len(masks) == expected
    for mask in masks:
        with Image.open(mask) as image:
            assert image.mode == "L"
            values = set(np.unique(np.asarray(image)).tolist())
        assert values == {0, 255}


def no_scratch_left(tmp_path: Path) -> bool:
    """The converters extract into hidden scratch folders beside the output; none may remain."""
    return not any(p.name.startswith(".") for p in (tmp_path / "datasets").iterdir())


def test_mvtec(tmp_path, downloads):
    archive = fx.mvtec_archive(downloads)
    out = build(spec_for("mvtec", "mvtec", archive), tmp_path)
    assert layout.categories(out) == ["bottle", "grid"]
    assert sorted(p.name for p in (out / "bottle").iterdir()) == ["ground_truth", "test", "train"]
    assert (out / "bottle/ground_truth/broken_large/001_mask.png").is_file()
    assert not list(out.glob("*.txt"))  # the release's license/readme are not part of the layout
    manifest = prepare(out, "mvtec")
    assert counts(manifest) == archive.expected
    assert sorted(manifest[manifest["category"] == "bottle"]["defect_type"].unique()) == \
        ["broken_large", "contamination", "good"]
    assert_binary_png_masks(out, 4)
    assert archive.path.is_file() and no_scratch_left(tmp_path)


def test_mvtec_category_subset(tmp_path, downloads):
    archive = fx.mvtec_archive(downloads)
    out = build(spec_for("mvtec", "mvtec", archive, categories=["grid"]), tmp_path)
    assert layout.categories(out) == ["grid"]
    with pytest.raises(NaglError, match=r"categories \['screw'\] are not in .*available: \['bottle', 'grid'\]"):
        build(spec_for("mvtec2", "mvtec", archive, categories=["screw"]), tmp_path)


def test_missing_archive_offline(tmp_path, downloads):
    spec = spec_for("mvtec", "mvtec", url="https://example.org/mvtec.tar.xz", sha256="cd" * 32,
                    filename="mvtec_anomaly_detection.tar.xz")
    with pytest.raises(MissingDataError) as error:
        build(spec, tmp_path)
    text = str(error.value)
    assert str(downloads.absolute() / "mvtec_anomaly_detection.tar.xz") in text
    assert "cd" * 32 in text and "dvc pull datasets/mvtec" in text


def test_checksum_mismatch_stops_the_build(tmp_path, downloads):
    archive = fx.mvtec_archive(downloads)
    with pytest.raises(NaglError, match=f"has sha256 {archive.sha256}, expected {'e' * 64}"):
        build(spec_for("mvtec", "mvtec", archive, sha256="e" * 64), tmp_path)
    assert list((tmp_path / "datasets" / "mvtec").iterdir()) == []


def test_mpdd_under_a_top_folder_with_recorded_checksum(tmp_path, downloads):
    archive = fx.mpdd_archive(downloads)
    out = build(spec_for("mpdd", "mpdd", archive, sha256=None, download="manual"), tmp_path)
    assert (downloads / "mpdd.zip.sha256").read_text().split()[0] == archive.sha256
    assert counts(prepare(out, "mpdd")) == archive.expected


def test_visa(tmp_path, downloads):
    archive = fx.visa_archive(downloads)
    out = build(spec_for("visa", "visa", archive), tmp_path)
    assert layout.categories(out) == ["candle", "pcb1"]
    assert sorted(p.name for p in (out / "candle/test").iterdir()) == ["bad", "good"]
    assert sorted(p.name for p in (out / "candle/train/good").iterdir()) == ["0000.JPG", "0001.JPG", "0002.JPG"]
    assert sorted(p.name for p in (out / "candle/test/good").iterdir()) == ["0003.JPG", "0004.JPG"]
    assert_binary_png_masks(out, 4)  # 0/1 masks binarised by the converter itself
    manifest = prepare(out, "visa")
    assert counts(manifest) == archive.expected
    assert set(manifest["image_path"].str.rsplit(".", n=1).str[1]) == {"png"}
    row = manifest[manifest["image_path"] == "pcb1/test/bad/001.png"].iloc[0]
    assert row["mask_path"] == "pcb1/ground_truth/bad/001_mask.png" and row["label"] == 1


def test_visa_bad_split_csv(tmp_path, downloads):
    path = fx.write_tar(downloads / "VisA_20220922.tar", {"split_csv/1cls.csv": b"object,image\ncandle,x.JPG\n"})
    spec = spec_for("visa", "visa", fx.FixtureArchive(path, fx.sha256_file(path)))
    with pytest.raises(NaglError, match=r"1cls.csv: columns \['label', 'mask', 'split'\] are missing"):
        build(spec, tmp_path)


def test_btad(tmp_path, downloads):
    archive = fx.btad_archive(downloads)
    out = build(spec_for("btad", "btad", archive), tmp_path)
    assert layout.categories(out) == ["01", "02", "03"]
    assert sorted(p.name for p in (out / "03/test").iterdir()) == ["bad", "good"]
    assert sorted(p.name for p in (out / "01/train/good").iterdir()) == ["0000.bmp", "0001.bmp"]
    assert (out / "03/ground_truth/bad/0002_mask.png").is_file()  # from ground_truth/ko/0002.bmp
    manifest = prepare(out, "btad")
    assert counts(manifest) == archive.expected
    assert_binary_png_masks(out, 9)


def test_medianomaly_brats(tmp_path, downloads):
    archive = fx.brats_archive(downloads)
    out = build(spec_for("brats2021", "medianomaly", archive, subset="BraTS2021"), tmp_path)
    assert layout.categories(out) == ["brats2021"]
    assert (out / "brats2021/ground_truth/tumor/BraTS2021_00021_flair_70_mask.png").is_file()
    manifest = prepare(out, "brats2021")
    assert counts(manifest) == archive.expected
    image = out / "brats2021/test/tumor/BraTS2021_00021_flair_70.png"
    with Image.open(image) as rgb:
        assert rgb.mode == "RGB"  # grayscale slices replicated to RGB
        values = np.asarray(rgb)
    assert (values[..., 0] == values[..., 1]).all()


def test_medianomaly_image_level_set(tmp_path, downloads):
    archive = fx.rsna_archive(downloads)
    out = build(spec_for("rsna", "medianomaly", archive), tmp_path)
    manifest = prepare(out, "rsna")
    assert counts(manifest) == archive.expected
    assert set(manifest["defect_type"]) == {"good", "abnormal"}
    assert manifest["mask_path"].isna().all()


def test_medianomaly_wrong_subset(tmp_path, downloads):
    archive = fx.brats_archive(downloads)
    with pytest.raises(NaglError, match=r"expected the set 'RSNA' .* found none"):
        build(spec_for("x", "medianomaly", archive, subset="RSNA"), tmp_path)


def user_folder(root: Path) -> Path:
    """A user's own data: normal/, abnormal/ (loose files and a defect sub-folder), masks/."""
    for i in range(6):
        (root / "normal").mkdir(parents=True, exist_ok=True)
        (root / "normal" / f"n{i}.jpg").write_bytes(fx.image_bytes(500 + i, fmt="JPEG"))
    (root / "abnormal" / "crack").mkdir(parents=True)
    (root / "masks" / "crack").mkdir(parents=True)
    (root / "abnormal" / "a0.png").write_bytes(fx.image_bytes(510))
    (root / "masks" / "a0_mask.png").write_bytes(fx.mask_bytes(1))
    (root / "abnormal" / "crack" / "c0.png").write_bytes(fx.image_bytes(511))
    (root / "masks" / "crack" / "c0.bmp").write_bytes(fx.mask_bytes(2, fmt="BMP", high=3))
    return root


def test_folder_normal_abnormal(tmp_path, monkeypatch):
    monkeypatch.setenv("NAGL_HOME", str(tmp_path))
    source = user_folder(tmp_path / "mydata")
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    spec = spec_for("mine", "folder", path="mydata", layout="normal-abnormal", category="parts", seed=3)
    out = build(spec, tmp_path)
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # copied, not moved
    manifest = prepare(out, "mine")
    assert counts(manifest) == {"parts": {"train_good": 3, "test_good": 3, "test_anomalous": 2, "masks": 2}}
    assert sorted(manifest[manifest["label"] == 1]["mask_path"]) == \
        ["parts/ground_truth/bad/a0_mask.png", "parts/ground_truth/crack/c0_mask.png"]
    train = sorted(Path(p).stem for p in manifest[manifest["split"] == "train"]["image_path"])
    assert train == [Path(n).stem for n in split_normal([f"n{i}.jpg" for i in range(6)], 3, 0.5)[0]]


def test_folder_mvtec_layout(tmp_path):
    source = fx.canonical_dataset(tmp_path / "mine")
    spec = spec_for("mine", "folder", path=str(source), layout="mvtec")
    out = build(spec, tmp_path)
    assert counts(prepare(out, "mine")) == {
        c: {"train_good": 2, "test_good": 1, "test_anomalous": 2, "masks": 2} for c in ("a", "b")}


def test_folder_bad_options(tmp_path):
    with pytest.raises(NaglError, match="option 'path'"):
        build(spec_for("m1", "folder"), tmp_path)
    with pytest.raises(NaglError, match=r"folder .*nowhere does not exist"):
        build(spec_for("m2", "folder", path=str(tmp_path / "nowhere")), tmp_path)
    with pytest.raises(NaglError, match="option 'layout' must be one of"):
        build(spec_for("m3", "folder", path=str(tmp_path), layout="flat"), tmp_path)


def test_split_normal_is_seeded_and_order_independent():
    names = [f"img{i:02d}.png" for i in range(10)]
    train, test = split_normal(names, seed=0, train_fraction=0.5)
    assert len(train) == 5 and sorted(train + test) == names
    assert split_normal(list(reversed(names)), 0, 0.5) == (train, test)
    assert split_normal(names, 1, 0.5) != (train, test)
    assert len(split_normal(names, 0, 0.25)[0]) == 3  # round half up: 2.5 -> 3
    assert split_normal(["a", "b"], 0, 0.99) == split_normal(["a", "b"], 0, 0.5)  # 1 train, 1 test at least


def test_registry_entries_for_real_datasets():
    specs = load_registry(REPO / "config" / "datasets.yaml")
    # The reference benchmarks' other datasets: tests/test_builders_wave2.py.
    real = {name: specs[name] for name in ("brats2021", "btad", "mpdd", "mvtec", "visa")}
    for name, spec in real.items():
        builder_for(spec.kind)  # the kind has a registered builder
        assert spec.options["filename"] and spec.options["url"].startswith("https://")
        sha = spec.options.get("sha256")
        assert sha is None or (len(sha) == 64 and int(sha, 16) >= 0), name
    assert specs["mvtec"].options["sha256"] == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    assert specs["brats2021"].kind == "medianomaly" and specs["brats2021"].options["subset"] == "BraTS2021"
