"""Image normalisation, the manifest and its summary, on small real image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dataset_fixtures import canonical_dataset
from PIL import Image

from nagl.data import layout
from nagl.errors import NaglError
from nagl.io import sha256_file


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def rgb_noise(seed: int, size=(8, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def read(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as image:
        return image.mode, np.asarray(image)


def test_grayscale_is_replicated_to_rgb(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = save(tmp_path / "c" / "train" / "good" / "g.png", Image.fromarray(gray, "L"))
    notes = layout.normalise_images(tmp_path)
    mode, values = read(path)
    assert mode == "RGB" and layout.png_header(path) == (8, 2)
    for channel in range(3):
        np.testing.assert_array_equal(values[..., channel], gray)
    assert notes == ["c/train/good/g.png: grayscale PNG -> 8-bit RGB PNG c/train/good/g.png"]


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, :, 3] = 255  # opaque row stays 200
    rgba[1, :, 3] = 128  # half transparent row: 200 * 128 / 255 = 100.4 -> 100
    path = save(tmp_path / "c" / "test" / "good" / "a.png", Image.fromarray(rgba, "RGBA"))
    layout.normalise_images(tmp_path)
    mode, values = read(path)
    assert mode == "RGB"
    assert (values[0] == 200).all() and (values[1] == 100).all()


def test_16_bit_is_scaled_by_dropping_the_low_byte(tmp_path):
    values16 = np.array([[0, 255, 256, 0x1234, 65535]], dtype=np.uint16)
    path = save(tmp_path / "c" / "test" / "good" / "d.png", Image.fromarray(values16))
    assert layout.png_header(path)[0] == 16
    layout.normalise_images(tmp_path)
    mode, values = read(path)
    assert mode == "RGB" and layout.png_header(path) == (8, 2)
    np.testing.assert_array_equal(values[0, :, 0], [0, 0, 1, 0x12, 255])


def test_palette_goes_through_the_palette(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.putdata([0, 1, 1, 0, 1, 1, 1, 1])
    path = save(tmp_path / "c" / "test" / "good" / "p.png", image)
    layout.normalise_images(tmp_path)
    mode, values = read(path)
    assert mode == "RGB"
    assert values[0, 0].tolist() == [0, 0, 0] and values[0, 1].tolist() == [10, 20, 30]


@pytest.mark.parametrize("suffix,fmt", [(".JPG", "JPEG"), (".bmp", "BMP"), (".tif", "TIFF")])
def test_other_formats_become_png_with_the_same_stem(tmp_path, suffix, fmt):
    pixels = rgb_noise(3)
    source = save(tmp_path / "c" / "test" / "crack" / f"007{suffix}", Image.fromarray(pixels), format=fmt)
    mask = save(tmp_path / "c" / "ground_truth" / "crack" / "007_mask.png",
                Image.fromarray(np.full((6, 8), 255, np.uint8), "L"))
    notes = layout.normalise_images(tmp_path)
    target = source.with_name("007.png")
    assert not source.exists() and target.is_file()
    assert layout.png_header(target) == (8, 2)
    if fmt != "JPEG":  # lossless sources keep their pixels exactly
        np.testing.assert_array_equal(read(target)[1], pixels)
    assert mask.is_file()  # the mask name still matches the image stem
    assert len(notes) == 1 and f"{fmt} -> 8-bit RGB PNG" in notes[0]


def test_masks_are_binarised_and_converted(tmp_path):
    visa_style = np.array([[0, 1, 1], [0, 0, 2]], np.uint8)
    save(tmp_path / "c" / "ground_truth" / "bad" / "x_mask.png", Image.fromarray(visa_style, "L"))
    save(tmp_path / "c" / "ground_truth" / "bad" / "y_mask.bmp", Image.fromarray(visa_style * 100, "L"))
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0, 2] = 7
    save(tmp_path / "c" / "ground_truth" / "bad" / "z_mask.png", Image.fromarray(rgb))
    notes = layout.normalise_images(tmp_path)
    assert len(notes) == 3
    expected = [[0, 255, 255], [0, 0, 255]]
    for name in ("x_mask.png", "y_mask.png"):
        mode, values = read(tmp_path / "c" / "ground_truth" / "bad" / name)
        assert mode == "L" and values.tolist() == expected
    assert read(tmp_path / "c" / "ground_truth" / "bad" / "z_mask.png")[1].tolist() == [[255, 0, 0], [0, 0, 0]]
    assert not (tmp_path / "c" / "ground_truth" / "bad" / "y_mask.bmp").exists()


def test_canonical_files_are_left_untouched(tmp_path):
    root = canonical_dataset(tmp_path)
    before = {p: sha256_file(p) for p in root.rglob("*.png")}
    assert layout.normalise_images(root) == []
    assert {p: sha256_file(p) for p in root.rglob("*.png")} == before


def test_conflicting_stems_are_an_error(tmp_path):
    folder = tmp_path / "c" / "test" / "good"
    save(folder / "a.png", Image.fromarray(rgb_noise(1)).convert("L"))
    save(folder / "a.bmp", Image.fromarray(rgb_noise(2)))
    with pytest.raises(NaglError, match="a.bmp and c/test/good/a.png would both become a.png"):
        layout.normalise_images(tmp_path)


def test_manifest_columns_rows_and_masks(tmp_path):
    root = canonical_dataset(tmp_path / "ds")
    manifest = layout.write_manifest(root, "toy")
    assert tuple(manifest.columns) == layout.MANIFEST_COLUMNS
    assert len(manifest) == 10
    keys = list(zip(manifest["category"], manifest["split"], manifest["defect_type"], manifest["image_path"], strict=False))
    assert keys == sorted(keys)
    row = manifest[manifest["image_path"] == "a/test/scratch/001.png"].iloc[0]
    assert row["label"] == 1 and row["split"] == "test" and row["dataset"] == "toy"
    assert row["mask_path"] == "a/ground_truth/scratch/001_mask.png"
    assert row["image_sha256"] == sha256_file(root / "a/test/scratch/001.png")
    assert (row["width"], row["height"]) == (8, 6)
    assert manifest[manifest["label"] == 0]["mask_path"].isna().all()
    assert manifest[manifest["label"] == 1]["mask_path"].notna().all()
    assert set(manifest[manifest["defect_type"] == "good"]["label"]) == {0}
    assert layout.read_manifest(root).equals(manifest)
    schema = pq.read_schema(root / layout.MANIFEST_NAME)
    assert [str(t) for t in schema.types] == ["string", "string", "string", "int64", "string", "string",
                                              "string", "string", "int64", "int64"]


def test_manifest_is_byte_identical_for_identical_content(tmp_path):
    first = canonical_dataset(tmp_path / "one")
    layout.write_manifest(first, "toy")
    bytes_one = (first / layout.MANIFEST_NAME).read_bytes()
    layout.write_manifest(first, "toy")
    assert (first / layout.MANIFEST_NAME).read_bytes() == bytes_one
    # The same content in another folder gives the same file.
    second = canonical_dataset(tmp_path / "two")
    layout.write_manifest(second, "toy")
    assert (second / layout.MANIFEST_NAME).read_bytes() == bytes_one
    assert b"pandas" not in bytes_one  # no pandas metadata


def test_read_manifest_missing_says_how_to_prepare(tmp_path):
    with pytest.raises(NaglError, match=r"no manifest at .*mvtec.*nagl datasets prepare mvtec"):
        layout.read_manifest(tmp_path / "mvtec")


def test_summarise_counts(tmp_path):
    root = canonical_dataset(tmp_path / "ds")
    summary = layout.summarise(layout.write_manifest(root, "toy"))
    assert summary["dataset"] == "toy"
    assert summary["categories"] == ["a", "b"]
    assert (summary["n_images"], summary["n_train"], summary["n_test"], summary["n_anomalous"]) == (10, 4, 6, 4)
    assert summary["has_masks"] is True
    assert summary["per_category"]["a"] == {"train_good": 2, "test_good": 1, "test_anomalous": 2,
                                            "defect_types": ["scratch"], "masks": 2}
    # Without masks, the summary says so.
    (root / layout.MANIFEST_NAME).unlink()
    for mask in root.rglob("*_mask.png"):
        mask.unlink()
    assert layout.summarise(layout.write_manifest(root, "toy"))["has_masks"] is False
