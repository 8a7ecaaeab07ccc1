"""Local weight files: lookup order, round trips, import, offline fetch, `nagl weights`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nagl.cli.main import _app
from nagl.errors import MissingDataError, NaglError
from nagl.io import sha256_file
from nagl.models import backbones, weights
from nagl.models.backbones import BACKBONES, create_backbone, managed_weights, weight_spec, weights_digest

torch.set_num_threads(1)


@pytest.fixture()
def isolated(monkeypatch, tmp_path) -> Path:
    """Empty weights dir and empty user caches (HF hub, torch hub, open_clip)."""
    for name in managed_weights() + ["tiny-clip", "tiny-dinov2"]:
        monkeypatch.delenv(weights.env_var(name), raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("NAGL_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "weights"


def _batch(backbone, count=2):
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(50, 60, 3), dtype=np.uint8) for _ in range(count)]
    return torch.stack([backbone.preprocess(image) for image in images])


def _tiny_clip_spec() -> weights.WeightSpec:
    return weights.WeightSpec(backbone="tiny-clip", file_name="tiny-clip.safetensors", kind="open_clip",
                              source="a tiny test CLIP", hub_repo="nobody/tiny-clip",
                              hub_files=("open_clip_model.safetensors",))


def test_local_weights_round_trip_gives_identical_features(tmp_path):
    original = create_backbone("tiny-dinov2", seed=5)
    first = tmp_path / "a.safetensors"
    save_file(original.model.state_dict(), str(first))

    loaded = create_backbone("tiny-dinov2", weights=first)
    batch = _batch(original)
    assert torch.equal(loaded(batch), original(batch))
    assert loaded.identity == f"tiny-dinov2@56:{sha256_file(first)[:16]}"

    other = tmp_path / "b.safetensors"
    save_file(create_backbone("tiny-dinov2", seed=6).model.state_dict(), str(other))
    changed = create_backbone("tiny-dinov2", weights=other)
    assert changed.identity != loaded.identity
    assert not torch.allclose(changed(batch), loaded(batch))


def test_weights_digest_notices_a_file_replaced_in_place(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    before = weights_digest(path)
    assert before == sha256_file(path)[:16]
    save_file({"x": torch.ones(30)}, str(path))  # same path, other content
    after = weights_digest(path)
    assert after == sha256_file(path)[:16] and after != before


def test_full_clip_checkpoint_loads_into_the_image_tower(tmp_path):
    original = create_backbone("tiny-clip", seed=2)
    full = {f"visual.{k}": v for k, v in original.visual.state_dict().items()}
    full["text_projection"] = torch.zeros(8, 32)  # text-tower keys are ignored
    checkpoint = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.items()}}, checkpoint)

    loaded = create_backbone("tiny-clip", weights=checkpoint)
    batch = _batch(original)
    assert torch.equal(loaded(batch), original(batch))
    # another image size: the position embedding is resampled to the new grid
    bigger = create_backbone("tiny-clip", weights=checkpoint, image_size=96)
    assert bigger(torch.zeros(1, 3, 96, 96)).shape == (1, 36, 128)


def test_original_dinov2_layout_loads_and_resamples(tmp_path):
    original = create_backbone("tiny-dinov2", seed=4)
    state = dict(original.model.state_dict())
    state["mask_token"] = torch.zeros(1, 48)  # only the original DINOv2 release has it
    checkpoint = tmp_path / "dinov2_original.pth"
    torch.save(state, checkpoint)
    batch = _batch(original)
    assert torch.equal(create_backbone("tiny-dinov2", weights=checkpoint)(batch), original(batch))
    assert create_backbone("tiny-dinov2", weights=checkpoint, image_size=84).grid == (6, 6)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    checkpoint = tmp_path / "dinov2.safetensors"
    save_file(create_backbone("tiny-dinov2").model.state_dict(), str(checkpoint))
    with pytest.raises(NaglError, match=r"dinov2\.safetensors does not fit backbone 'tiny-clip'"):
        create_backbone("tiny-clip", weights=checkpoint)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(NaglError, match=r"cannot read weights file .*garbage\.pt"):
        create_backbone("tiny-clip", weights=garbage)


@pytest.mark.parametrize("name", managed_weights())
def test_missing_weights_name_the_file_and_the_fetch_command(isolated, name):
    with pytest.raises(MissingDataError) as error:
        create_backbone(name)
    message = str(error.value)
    assert str(isolated / weight_spec(name).file_name) in message
    assert f"nagl weights fetch {name}" in message
    assert f"nagl weights import {name} FILE" in message


def test_env_var_override_and_user_caches_are_used(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("NAGL_WEIGHTS_DINOV2_VITS14", str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(MissingDataError, match="NAGL_WEIGHTS_DINOV2_VITS14=.*nowhere.safetensors"):
        backbones.find_weights("dinov2-vits14")
    monkeypatch.delenv("NAGL_WEIGHTS_DINOV2_VITS14")

    # a checkpoint the user already has in the torch hub cache ...
    torch_hub = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    torch_hub.parent.mkdir(parents=True)
    torch_hub.write_bytes(b"x")
    assert backbones.find_weights("dinov2-vits14") == torch_hub
    # ... loses to one in the Hugging Face hub cache (layout of huggingface_hub) ...
    repo = tmp_path / "hf" / "hub" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    hub_file = repo / "snapshots" / "abc123" / "model.safetensors"
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"y")
    assert backbones.find_weights("dinov2-vits14") == hub_file
    # ... and both lose to the expected local file.
    isolated.mkdir()
    (isolated / "dinov2-vits14.safetensors").write_bytes(b"z")
    assert backbones.find_weights("dinov2-vits14") == isolated / "dinov2-vits14.safetensors"


def test_import_checks_the_checkpoint_and_writes_the_tower(isolated, monkeypatch, tmp_path):
    monkeypatch.setitem(BACKBONES.entries, "tiny-clip",
                        backbones.BackboneEntry(BACKBONES.get("tiny-clip").factory, _tiny_clip_spec()))
    original = create_backbone("tiny-clip", seed=9)
    full = {f"visual.{k}": v for k, v in original.visual.state_dict().items()}
    full["logit_scale"] = torch.ones(())
    checkpoint = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(full, checkpoint)

    target = backbones.import_weights("tiny-clip", checkpoint)

    assert target == isolated / "tiny-clip.safetensors"
    assert set(load_file(str(target))) == set(original.visual.state_dict())  # the image tower only
    loaded = create_backbone("tiny-clip", random_init=False)  # found at the expected place
    batch = _batch(original)
    assert torch.equal(loaded(batch), original(batch))
    assert loaded.identity.endswith(sha256_file(target)[:16])

    wrong = tmp_path / "wrong.safetensors"
    save_file(create_backbone("tiny-dinov2").model.state_dict(), str(wrong))
    target.unlink()
    with pytest.raises(NaglError, match="does not load into backbone 'tiny-clip'"):
        backbones.import_weights("tiny-clip", wrong)
    assert list(isolated.iterdir()) == []  # nothing half-written left behind


@pytest.mark.parametrize("offline", ["NAGL_OFFLINE", "HF_HUB_OFFLINE"])
def test_fetch_offline_fails_with_what_to_do(isolated, monkeypatch, offline):
    import huggingface_hub.constants

    monkeypatch.delenv("NAGL_OFFLINE", raising=False)
    if offline == "NAGL_OFFLINE":
        monkeypatch.setenv("NAGL_OFFLINE", "1")
    else:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingDataError) as error:
        backbones.fetch_weights("clip-vit-b-16-plus-240")
    message = str(error.value)
    assert f"{offline} is set" in message
    assert str(isolated / "clip-vit-b-16-plus-240.safetensors") in message
    assert "nagl weights import clip-vit-b-16-plus-240 FILE" in message
    assert not (isolated / "clip-vit-b-16-plus-240.safetensors").exists()


def test_cli_weights_list_and_backbones(isolated):
    isolated.mkdir()
    placed = isolated / "dinov2-vits14.safetensors"
    save_file({"x": torch.arange(4.0)}, str(placed))
    runner = CliRunner()

    result = runner.invoke(_app, ["weights", "list"], env={"COLUMNS": "400"})

    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert set(rows) == set(managed_weights())
    assert "yes" in rows["dinov2-vits14"] and sha256_file(placed) in rows["dinov2-vits14"]
    assert str(isolated / "clip-vit-l-14-336.safetensors") in rows["clip-vit-l-14-336"]
    assert " no " in rows["clip-vit-l-14-336"]

    result = runner.invoke(_app, ["backbones"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert any("dinov2-vits14" in line and "32x32" in line and "384" in line for line in result.output.splitlines())

    result = runner.invoke(_app, ["weights", "fetch", "no-such-backbone"])
    assert isinstance(result.exception, NaglError)
