"""`nagl predict` round trip through the CLI, and its error cases."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from nagl.cli.main import _app, app
from nagl.data.embedded import render
from nagl.errors import NaglError
from nagl.methods import create_method
from nagl.models.backbones import create_backbone


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Brick photographs (embedded benchmark): 2 normal + 2 defective queries, 2 normal
    references, 1 abnormal reference with its mask, and an untrained NAGL checkpoint."""
    root = tmp_path_factory.mktemp("predict")

    def item(role, index):
        return render("predict-test", "textures", "brick", role, index)

    for index in range(2):
        save_png(root / "images" / f"good_{index}.png", item("test_good", index).image)
        save_png(root / "images" / f"defect_{index}.png", item("test_anomalous", index).image)
        save_png(root / "normal" / f"ref_{index}.png", item("train_good", index).image)
    reference = item("test_anomalous", 5)
    save_png(root / "abnormal" / "bad.png", reference.image)
    save_png(root / "masks" / "bad_mask.png", reference.mask.astype(np.uint8) * 255)
    backbone = create_backbone("effnet-lite0")
    create_method("nagl", backbone.dim).save(root / "ckpt", {"backbone": "effnet-lite0",
                                                             "backbone_identity": backbone.identity})
    return root


def invoke(*args):
    return CliRunner().invoke(_app, ["predict", "--threads", "1", *map(str, args)])


def test_predict_round_trip_knn_normal(folders, tmp_path):
    out = tmp_path / "out"
    result = invoke("--images", folders / "images", "--normal", folders / "normal",
                    "--method", "knn-normal", "--out", out)
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns) == ["file", "score"]
    assert list(scores["file"]) == ["defect_0.png", "defect_1.png", "good_0.png", "good_1.png"]
    by_file = dict(zip(scores["file"], scores["score"], strict=False))
    assert min(by_file["defect_0.png"], by_file["defect_1.png"]) > max(by_file["good_0.png"], by_file["good_1.png"])
    for name in by_file:
        with Image.open(out / "maps" / name) as overlay:
            assert overlay.size == (256, 256) and overlay.mode == "RGB"
    info = json.loads((out / "predict.json").read_text())
    assert info["method"] == "knn-normal" and len(info["normal"]) == 2


def test_predict_nagl_with_checkpoint_and_masks(folders, tmp_path):
    out = tmp_path / "out"
    result = invoke("--images", folders / "images", "--normal", folders / "normal",
                    "--abnormal", folders / "abnormal", "--abnormal-masks", folders / "masks",
                    "--checkpoint", folders / "ckpt" / "weights.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "predict.json").read_text())
    assert info["method"] == "nagl"
    assert info["abnormal_masks"] == [str(folders / "masks" / "bad_mask.png")]
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == 4 and scores["score"].between(0, 1).all()


def error_of(result) -> str:
    assert isinstance(result.exception, NaglError), result.output
    return str(result.exception)


def test_predict_errors(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert "holds no images" in error_of(invoke("--images", empty, "--normal", folders / "normal", "--out", tmp_path / "o"))

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_bytes(b"not a png at all")
    message = error_of(invoke("--images", broken, "--normal", folders / "normal", "--method", "knn-normal",
                              "--out", tmp_path / "o"))
    assert "cannot read image" in message and "scan.png" in message

    stray = tmp_path / "stray_masks"
    save_png(stray / "other_mask.png", np.zeros((8, 8), np.uint8))
    message = error_of(invoke("--images", folders / "images", "--normal", folders / "normal",
                              "--abnormal", folders / "abnormal", "--abnormal-masks", stray,
                              "--checkpoint", folders / "ckpt", "--out", tmp_path / "o"))
    assert "other_mask.png" in message and "no abnormal image" in message

    assert "needs a trained model" in error_of(invoke(
        "--images", folders / "images", "--normal", folders / "normal", "--abnormal", folders / "abnormal",
        "--out", tmp_path / "o"))
    assert "not 'knn-naive'" in error_of(invoke(
        "--images", folders / "images", "--normal", folders / "normal", "--checkpoint", folders / "ckpt",
        "--method", "knn-naive", "--out", tmp_path / "o"))


def test_predict_rejects_a_checkpoint_of_another_backbone(folders, tmp_path):
    info = json.loads((folders / "ckpt" / "model.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.safetensors").write_bytes((folders / "ckpt" / "weights.safetensors").read_bytes())
    args = ("--images", folders / "images", "--normal", folders / "normal", "--out", tmp_path / "o")

    assert "made for backbone 'effnet-lite0', not 'dinov2-vits14'" in error_of(
        invoke(*args, "--checkpoint", folders / "ckpt", "--backbone", "dinov2-vits14"))
    (other / "model.json").write_text(json.dumps({**info, "backbone_identity": "effnet-lite0@256:0123456789abcdef"}))
    assert "other weights or input size" in error_of(invoke(*args, "--checkpoint", other))


def test_console_entry_exits_with_status_2(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["nagl", "predict", "--images", str(tmp_path / "missing"),
                                      "--normal", str(folders / "normal"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exit_info:
        app()
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
