"""The embedded semi-synthetic benchmark: layout, exact masks, determinism, option checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nagl.data import defects, embedded
from nagl.data.embedded import PRESETS, build, parse_options, relative_paths, render
from nagl.data.registry import DatasetSpec, load_registry
from nagl.errors import NaglError
from nagl.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
SMALL = {"train_good": 3, "test_good": 2, "test_anomalous": 5}
# One category per domain keeps the suite quick while covering every preset.
SUBSETS = {"textures": "gravel", "medical": "fundus", "objects": "coins"}


def small_spec(preset: str, counts: dict | None = None) -> DatasetSpec:
    options = {"preset": preset, "categories": [SUBSETS[preset]], "counts": counts or SMALL}
    return DatasetSpec(name=f"embedded-{preset}", kind="embedded", domain=preset, options=options)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    roots = {}
    for preset in PRESETS:
        roots[preset] = tmp_path_factory.mktemp(preset) / "data"
        build(small_spec(preset), roots[preset])
    return roots


def test_registered_for_kind_embedded():
    from nagl.data.builders import builder_for

    assert builder_for("embedded") is build


@pytest.mark.parametrize("preset", list(PRESETS))
def test_layout_and_counts(built, preset):
    root = built[preset]
    category = SUBSETS[preset]
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    cat = embedded.category(preset, category)
    expected = set()
    for role in embedded.ROLES:
        for index in range(SMALL[role]):
            image, mask = relative_paths(cat, role, index)
            expected.add(image)
            if mask:
                expected.add(mask)
    assert files == expected
    assert len(list((root / category / "train" / "good").glob("*.png"))) == 3
    assert len(list((root / category / "test" / "good").glob("*.png"))) == 2
    defect_dirs = sorted(d.name for d in (root / category / "test").iterdir() if d.name != "good")
    # 5 anomalies over 4 types, types taking turns: every type present.
    assert defect_dirs == sorted(cat.defects) and len(defect_dirs) >= 3
    assert sorted(d.name for d in (root / category / "ground_truth").iterdir()) == defect_dirs
    assert not (root / "manifest.parquet").exists()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_images_masks_and_exact_defects(built, preset):
    root = built[preset]
    category = SUBSETS[preset]
    for path in (root / category / "train").rglob("*.png"):
        with Image.open(path) as image:
            assert (image.mode, image.size) == ("RGB", (256, 256))
    # Normal test images have no masks.
    assert relative_paths(embedded.category(preset, category), "test_good", 0)[1] is None
    assert not (root / category / "ground_truth" / "good").exists()
    for index in range(SMALL["test_anomalous"]):
        image_path, mask_path = relative_paths(embedded.category(preset, category), "test_anomalous", index)
        with Image.open(root / image_path) as image, Image.open(root / mask_path) as mask:
            assert (image.mode, image.size) == ("RGB", (256, 256))
            assert (mask.mode, mask.size) == ("L", image.size)
            pixels, mask = np.asarray(image), np.asarray(mask)
        assert set(np.unique(mask)) == {0, 255}
        inside = mask == 255
        assert 12 <= inside.sum() < 0.5 * inside.size
        # The defect-free rendering of the same image: identical outside the mask,
        # and the defect really changed most pixels inside it.
        item = render(f"embedded-{preset}", preset, category, "test_anomalous", index)
        assert np.array_equal(pixels, item.image)
        assert np.array_equal(inside, item.mask)
        assert np.array_equal(pixels[~inside], item.clean[~inside])
        assert (pixels[inside] != item.clean[inside]).any(axis=-1).mean() >= 0.5


def test_normal_images_vary_and_do_not_repeat(built):
    root = built["textures"]
    images = [np.asarray(Image.open(p), dtype=np.float64)
              for p in sorted((root / "gravel").glob("*/good/*.png"))]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            # Different crops of the photograph, not one image with noise on it.
            assert np.abs(images[i] - images[j]).mean() > 10


def test_two_builds_are_byte_identical_also_in_a_fresh_process(built, tmp_path):
    again = tmp_path / "again"
    build(small_spec("medical"), again)
    assert digests(again) == digests(built["medical"])

    fresh = tmp_path / "fresh"
    code = ("import sys; from pathlib import Path; from nagl.data.embedded import build; "
            "from nagl.data.registry import DatasetSpec; "
            f"build(DatasetSpec('embedded-medical', 'embedded', 'medical', {small_spec('medical').options!r}), "
            f"Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(fresh)], cwd=REPO, check=True)
    assert digests(fresh) == digests(built["medical"])


def test_smaller_counts_give_a_prefix_of_the_larger_set(built, tmp_path):
    smaller = tmp_path / "smaller"
    build(small_spec("objects", {"train_good": 1, "test_good": 1, "test_anomalous": 2}), smaller)
    small_files, big_files = digests(smaller), digests(built["objects"])
    assert len(small_files) == 1 + 1 + 2 * 2
    assert all(big_files[path] == digest for path, digest in small_files.items())


def test_dataset_name_changes_the_images():
    first = render("embedded-textures", "textures", "brick", "train_good", 0).image
    other = render("my-textures", "textures", "brick", "train_good", 0).image
    assert not np.array_equal(first, other)


def test_default_plan_has_enough_images_and_defect_types():
    for _name, spec in load_registry(REPO / "config" / "datasets.yaml").items():
        if spec.kind != "embedded":
            continue
        options = parse_options(spec)
        assert len(options.categories) == 3
        assert options.counts == {"train_good": 40, "test_good": 15, "test_anomalous": 20}
        for category in options.categories:
            cat = embedded.category(options.preset, category)
            paths = [relative_paths(cat, "test_anomalous", i)[0] for i in range(20)]
            per_type = {}
            for path in paths:
                per_type[path.split("/")[2]] = per_type.get(path.split("/")[2], 0) + 1
            assert len(set(paths)) == 20 and len(per_type) >= 3 and min(per_type.values()) >= 5
    assert {"embedded-textures", "embedded-medical", "embedded-objects"} <= set(
        load_registry(REPO / "config" / "datasets.yaml"))


@pytest.mark.parametrize("name", sorted(defects.DEFECTS))
def test_every_defect_changes_only_its_mask(name):
    clean = render("t", "textures", "grass", "train_good", 0).image
    foreign = render("t", "textures", "gravel", "train_good", 0).image
    context = defects.Context(foreign=foreign)
    image, mask = defects.apply_defect(name, clean, np.random.default_rng(7), context)
    again, mask_again = defects.apply_defect(name, clean, np.random.default_rng(7), context)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert mask.dtype == bool and mask.shape == clean.shape[:2] and mask.sum() >= 12
    assert np.array_equal(image[~mask], clean[~mask])
    assert (image[mask] != clean[mask]).any(axis=-1).mean() >= 0.5


def test_defects_stay_where_allowed():
    clean = render("t", "medical", "fundus", "train_good", 0).image
    allowed = np.zeros(clean.shape[:2], dtype=bool)
    allowed[100:160, 60:200] = True
    for seed in range(3):
        _, mask = defects.apply_defect("dark_lesion", clean, np.random.default_rng(seed),
                                       defects.Context(allowed=allowed))
        assert mask.any() and not mask[~allowed].any()


@pytest.mark.parametrize("options, words", [
    ({"preset": "metal"}, ["preset", "'metal'", "textures"]),
    ({}, ["preset", "None"]),
    ({"preset": ["textures"]}, ["preset", "['textures']"]),
    ({"preset": "textures", "categories": ["brick", "wood"]}, ["categories", "'wood'"]),
    ({"preset": "textures", "categories": "brick"}, ["categories", "list"]),
    ({"preset": "textures", "categories": []}, ["categories"]),
    ({"preset": "textures", "categories": ["brick", "brick"]}, ["categories", "twice"]),
    ({"preset": "textures", "counts": {"train_good": -1}}, ["counts.train_good", "-1"]),
    ({"preset": "textures", "counts": {"test_anomalous": 0}}, ["counts.test_anomalous"]),
    ({"preset": "textures", "counts": {"test_good": 2.5}}, ["counts.test_good"]),
    ({"preset": "textures", "counts": {"test_good": True}}, ["counts.test_good"]),
    ({"preset": "textures", "counts": {"val": 3}}, ["counts", "'val'"]),
    ({"preset": "textures", "counts": [3]}, ["counts"]),
    ({"preset": "textures", "size": 128}, ["size"]),
])
def test_bad_options_raise_a_clear_error(tmp_path, options, words):
    spec = DatasetSpec(name="bad-set", kind="embedded", domain="x", options=options)
    with pytest.raises(NaglError) as error:
        build(spec, tmp_path / "out")
    message = str(error.value)
    assert "bad-set" in message
    for word in words:
        assert word in message
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "leftover.txt").write_text("x")
    with pytest.raises(NaglError, match="not empty"):
        build(small_spec("textures"), tmp_path)
