"""`nagl datasets ...` and the README's worked example of adding a dataset."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from nagl.cli.main import _app
from nagl.config import validate_config

runner = CliRunner()


def _image(path, seed, size=(48, 40), mode="RGB"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if mode == "RGB" else pixels[..., 0], mode).save(path)


def _castings(root):
    """A user's folder in the 'normal / abnormal (+ masks)' form, partly grayscale JPEG."""
    for i in range(8):
        _image(root / "normal" / f"n{i}.png", i)
    for i in range(4):
        _image(root / "abnormal" / f"a{i}.jpg", 100 + i, mode="L")
        mask = np.zeros((40, 48), np.uint8)
        mask[5:15, 10:20] = 255
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / f"a{i}.png")


def test_adding_a_folder_dataset_is_one_registry_entry(project, tmp_path):
    root = project()
    _castings(tmp_path / "castings")
    registry = yaml.safe_load((root / "config" / "datasets.yaml").read_text())
    registry["datasets"]["my-castings"] = {"kind": "folder", "domain": "industrial",
                                           "path": str(tmp_path / "castings"), "layout": "normal-abnormal"}
    (root / "config" / "datasets.yaml").write_text(yaml.safe_dump(registry))

    result = runner.invoke(_app, ["datasets", "prepare", "my-castings"])
    assert result.exit_code == 0, result.output
    assert "built" in result.output
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["prepare@my-castings"]["outs"][0]["md5"].endswith(".dir")

    listing = runner.invoke(_app, ["datasets", "list"])
    assert listing.exit_code == 0
    row = next(line for line in listing.output.splitlines() if "my-castings" in line)
    assert "12" in row and "4" in row and "yes" in row  # 12 images, 4 anomalous, masks

    shown = runner.invoke(_app, ["datasets", "show", "my-castings"])
    assert shown.exit_code == 0, shown.output
    assert "bad" in shown.output and "0c16" not in shown.output  # its own defect type, its own hash

    # The converted images are 8-bit RGB PNG and the validator accepts the folder.
    images = list((root / "datasets" / "my-castings").rglob("*.png"))
    assert images and not list((root / "datasets" / "my-castings").rglob("*.jpg"))
    valid = runner.invoke(_app, ["datasets", "validate", str(root / "datasets" / "my-castings")])
    assert valid.exit_code == 0, valid.output

    # Named as a target, it joins the matrix.
    config = yaml.safe_load((root / "config" / "config.yaml").read_text())
    config["targets"].append("my-castings")
    assert "my-castings" in validate_config(config).targets


def test_a_dataset_that_fails_validation_is_neither_placed_nor_versioned(project, tmp_path):
    root = project()
    source = tmp_path / "broken"
    _castings(source)
    (source / "abnormal" / "a0.jpg").write_bytes(b"not an image")
    registry = yaml.safe_load((root / "config" / "datasets.yaml").read_text())
    registry["datasets"]["broken"] = {"kind": "folder", "domain": "industrial", "path": str(source),
                                      "layout": "normal-abnormal"}
    (root / "config" / "datasets.yaml").write_text(yaml.safe_dump(registry))

    done = subprocess.run([sys.executable, "-m", "nagl", "datasets", "prepare", "broken"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "a0" in done.stderr and "Traceback" not in done.stderr
    assert not (root / "datasets" / "broken").exists()
    assert not (root / "dvc.lock").exists()  # nothing was versioned


def test_unknown_dataset_and_bad_validate_path_are_clear_errors(project, tmp_path):
    project()
    result = runner.invoke(_app, ["datasets", "show", "nope"])
    assert result.exit_code != 0 and "not in the registry" in str(result.exception)
    result = runner.invoke(_app, ["datasets", "validate", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "is not a folder" in str(result.exception)
