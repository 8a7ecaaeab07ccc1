"""The validator: one test per class of bad input, on a small real dataset folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from dataset_fixtures import canonical_dataset
from PIL import Image

from nagl.data import layout
from nagl.data.validate import Problem, raise_if_invalid, validate_dataset
from nagl.errors import NaglError


@pytest.fixture
def dataset(tmp_path):
    return canonical_dataset(tmp_path / "toy")


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, problems
    return problems[0]


def test_a_valid_dataset_has_no_problems(dataset):
    assert validate_dataset(dataset) == []
    layout.write_manifest(dataset, "toy")
    assert validate_dataset(dataset) == []  # the manifest belongs to the layout
    raise_if_invalid([], dataset)  # no problems: no error


def test_missing_folder(tmp_path):
    problem = only(validate_dataset(tmp_path / "nope"))
    assert "does not exist" in problem.message


def test_corrupt_image(dataset):
    (dataset / "a/test/good/000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    problem = only(validate_dataset(dataset))
    assert problem.path == "a/test/good/000.png"
    assert "corrupt" in problem.message and "replace" in problem.hint


def test_anomalous_image_without_mask_when_the_dataset_has_masks(dataset):
    (dataset / "a/ground_truth/scratch/001_mask.png").unlink()
    problem = only(validate_dataset(dataset))
    assert problem.path == "a/ground_truth/scratch/001_mask.png"
    assert "without a mask" in problem.message and "a/test/scratch/001.png" in problem.hint


def test_no_masks_anywhere_is_fine(dataset):
    shutil.rmtree(dataset / "a/ground_truth")
    shutil.rmtree(dataset / "b/ground_truth")
    assert validate_dataset(dataset) == []


def test_mask_of_another_size(dataset):
    Image.fromarray(np.zeros((5, 8), np.uint8), "L").save(dataset / "a/ground_truth/scratch/000_mask.png")
    problem = only(validate_dataset(dataset))
    assert problem.path == "a/ground_truth/scratch/000_mask.png"
    assert "8x5 but its image is 8x6" in problem.message


def test_mask_without_image(dataset):
    shutil.copy(dataset / "a/ground_truth/scratch/000_mask.png", dataset / "a/ground_truth/scratch/009_mask.png")
    problem = only(validate_dataset(dataset))
    assert problem.path == "a/ground_truth/scratch/009_mask.png"
    assert "mask without an image" in problem.message


def test_mask_not_binary_or_not_single_channel(dataset):
    Image.fromarray(np.ones((6, 8), np.uint8), "L").save(dataset / "a/ground_truth/scratch/000_mask.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(dataset / "a/ground_truth/scratch/001_mask.png")
    problems = validate_dataset(dataset)
    assert [p.path for p in problems] == ["a/ground_truth/scratch/000_mask.png", "a/ground_truth/scratch/001_mask.png"]
    assert "other than 0 and 255" in problems[0].message
    assert "not an 8-bit single-channel PNG" in problems[1].message


def test_mask_badly_named(dataset):
    (dataset / "a/ground_truth/scratch/001_mask.png").rename(dataset / "a/ground_truth/scratch/001.png")
    messages = {p.message for p in validate_dataset(dataset)}
    assert "mask name does not end in _mask" in messages
    assert "anomalous image without a mask (the dataset has masks)" in messages


def test_empty_category(dataset):
    (dataset / "c/train/good").mkdir(parents=True)
    problems = validate_dataset(dataset)
    assert any(p.path == "c" and p.message == "empty category" for p in problems)


def test_category_without_anomalies(dataset):
    shutil.rmtree(dataset / "b/test/scratch")
    shutil.rmtree(dataset / "b/ground_truth")
    problem = only(validate_dataset(dataset))
    assert problem.path == "b" and "no anomalous test images" in problem.message


def test_category_without_train_good(dataset):
    shutil.rmtree(dataset / "b/train")
    problem = only(validate_dataset(dataset))
    assert problem.path == "b" and "no train/good images" in problem.message
    assert "b/train/good/" in problem.hint


def test_category_without_test_good(dataset):
    shutil.rmtree(dataset / "b/test/good")
    problem = only(validate_dataset(dataset))
    assert problem.path == "b" and "no test/good images" in problem.message


def test_empty_defect_folder(dataset):
    (dataset / "b/test/dent").mkdir()
    problem = only(validate_dataset(dataset))
    assert problem.path == "b/test/dent" and problem.message == "empty folder"


def test_two_images_with_one_stem(dataset):
    shutil.copy(dataset / "a/test/good/000.png", dataset / "a/test/good/000.PNG")
    problems = validate_dataset(dataset)
    assert [(p.path, p.message) for p in problems] == [
        ("a/test/good/000.PNG", "PNG image with the extension '.PNG'"),
        ("a/test/good/000.png", "000.PNG and 000.png share the stem '000'"),
    ]


def test_unknown_extension(dataset):
    (dataset / "a/test/good/notes.txt").write_text("hello")
    problem = only(validate_dataset(dataset))
    assert problem.path == "a/test/good/notes.txt" and "unknown file extension '.txt'" in problem.message


@pytest.mark.parametrize("stray", ["README.md", "a/extra/x.png", "a/test/loose.png", "a/train/bad/x.png",
                                   "a/test/good/sub/x.png", ".DS_Store"])
def test_files_outside_the_layout(dataset, stray):
    path = dataset / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(dataset / "a/train/good/000.png", path)
    problems = validate_dataset(dataset)
    assert problems and all("outside the canonical layout" in p.message for p in problems)
    assert stray.split("/")[0] in problems[0].path


def test_not_normalised_images(dataset):
    Image.fromarray(np.zeros((6, 8), np.uint8), "L").save(dataset / "a/train/good/000.png")
    Image.fromarray(np.zeros((6, 8, 4), np.uint8), "RGBA").save(dataset / "a/train/good/001.png")
    Image.fromarray(np.zeros((6, 8), np.uint16)).save(dataset / "b/train/good/000.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(dataset / "b/train/good/002.jpg", format="JPEG")
    problems = {p.path: p for p in validate_dataset(dataset)}
    assert problems["a/train/good/000.png"].message.startswith("grayscale image")
    assert problems["a/train/good/001.png"].message.startswith("image with an alpha channel (RGBA)")
    assert problems["b/train/good/000.png"].message.startswith("16-bit image")
    assert problems["b/train/good/002.jpg"].message == "JPEG image not converted to PNG"
    assert len(problems) == 4
    # Normalisation repairs every one of them.
    layout.normalise_images(dataset)
    assert validate_dataset(dataset) == []


def test_raise_if_invalid_lists_each_file_and_what_to_do(dataset):
    (dataset / "a/test/good/notes.txt").write_text("hello")
    (dataset / "a/ground_truth/scratch/001_mask.png").unlink()
    problems = validate_dataset(dataset)
    with pytest.raises(NaglError) as error:
        raise_if_invalid(problems, dataset)
    text = str(error.value)
    assert f"dataset {dataset} failed validation with 2 problem(s)" in text
    assert "a/test/good/notes.txt: unknown file extension" in text and "convert or delete the file" in text
    assert "a/ground_truth/scratch/001_mask.png: anomalous image without a mask" in text
