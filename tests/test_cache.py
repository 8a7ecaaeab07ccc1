"""The feature cache: hits, misses, invalidation, atomic writes, `nagl cache`."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nagl.cli.main import _app
from nagl.data.images import load_rgb
from nagl.errors import NaglError
from nagl.io import sha256_file
from nagl.models import cache as cache_module
from nagl.models.backbones import create_backbone
from nagl.models.cache import FeatureCache, cache_summary, clear_cache

torch.set_num_threads(1)


@pytest.fixture()
def images(tmp_path) -> tuple[list[Path], list[str]]:
    """Five small PNG images of different sizes, and their sha256."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(5):
        array = rng.integers(0, 256, size=(40 + 7 * index, 50, 3), dtype=np.uint8)
        path = tmp_path / "images" / f"img{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths, [sha256_file(p) for p in paths]


class Counter:
    """Counts the images that go through a backbone's forward."""

    def __init__(self, backbone):
        self.images = 0
        backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.images += args[0].shape[0]


def _direct(backbone, paths) -> torch.Tensor:
    return backbone(torch.stack([backbone.preprocess(load_rgb(p)) for p in paths]))


def test_miss_then_hit_and_loaded_equals_computed(tmp_path, images):
    paths, shas = images
    backbone = create_backbone("tiny-dinov2")
    counter = Counter(backbone)
    cache = FeatureCache(tmp_path / "cache", backbone)
    assert not any(cache.contains(sha) for sha in shas)

    assert cache.ensure(paths, shas, batch_size=2, progress=True) == 5
    assert counter.images == 5
    assert all(cache.contains(sha) for sha in shas)

    # second time nothing is computed, also through a fresh cache object on the same root
    assert cache.ensure(paths, shas, progress=False) == 0
    assert FeatureCache(tmp_path / "cache", backbone).ensure(paths, shas, progress=False) == 0
    assert counter.images == 5

    order = [3, 0, 3, 1]
    loaded = cache.load([shas[i] for i in order])
    assert loaded.dtype == torch.float32 and loaded.shape == (4, 16, 48)
    expected = _direct(backbone, [paths[i] for i in order]).half().float()  # stored as float16
    assert torch.equal(loaded, expected)


def test_only_missing_images_are_computed_and_duplicates_once(tmp_path, images):
    paths, shas = images
    backbone = create_backbone("tiny-dinov2")
    counter = Counter(backbone)
    cache = FeatureCache(tmp_path, backbone)
    assert cache.ensure(paths[:3] + paths[:1], shas[:3] + shas[:1], progress=False) == 3
    assert counter.images == 3
    assert cache.missing(shas + shas) == shas[3:]
    assert cache.ensure(paths, shas, progress=False) == 2
    assert counter.images == 5


def test_changed_identity_or_preprocessing_recomputes(tmp_path, images):
    paths, shas = images
    base = create_backbone("tiny-dinov2")
    FeatureCache(tmp_path, base).ensure(paths, shas, progress=False)

    other_weights = create_backbone("tiny-dinov2", seed=1)
    other_size = create_backbone("tiny-dinov2", image_size=70)
    other_preprocessing = create_backbone("tiny-dinov2")
    other_preprocessing.mean = (0.5, 0.5, 0.5)  # same identity, different preprocessing
    assert other_preprocessing.identity == base.identity

    directories = {FeatureCache(tmp_path, base).directory}
    for backbone in (other_weights, other_size, other_preprocessing):
        counter = Counter(backbone)
        cache = FeatureCache(tmp_path, backbone)
        assert cache.directory not in directories
        directories.add(cache.directory)
        assert not cache.contains(shas[0])
        assert cache.ensure(paths, shas, progress=False) == 5
        assert counter.images == 5
        assert torch.equal(cache.load(shas[:2]), _direct(backbone, paths[:2]).half().float())
    assert len(cache_summary(tmp_path)) == 4


def test_feature_files_are_float16_with_a_described_key_space(tmp_path, images):
    paths, shas = images
    backbone = create_backbone("tiny-clip")
    cache = FeatureCache(tmp_path, backbone)
    cache.ensure(paths, shas, progress=False)
    stored = np.load(cache.path(shas[0]))
    assert stored.dtype == np.float16 and stored.shape == (16, 128)
    assert cache.path(shas[0]) == cache.directory / shas[0][:2] / f"{shas[0]}.npy"
    keyspace = cache_module.read_json(cache.directory / "keyspace.json")
    assert keyspace["identity"] == backbone.identity and keyspace["preprocessing"] == backbone.preprocessing
    files = [p for p in cache.directory.rglob("*") if p.is_file()]
    assert cache.size_bytes() == sum(p.stat().st_size for p in files)
    assert 16 * 128 * 2 < cache.path(shas[0]).stat().st_size <= 16 * 128 * 2 + 128  # data + npy header


def test_interrupted_write_leaves_no_file(tmp_path, images, monkeypatch):
    paths, shas = images
    cache = FeatureCache(tmp_path, create_backbone("tiny-dinov2"))

    def broken_save(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.ensure(paths[:1], shas[:1], progress=False)
    assert not cache.contains(shas[0])
    assert [p.name for p in cache.directory.rglob("*") if p.is_file()] == ["keyspace.json"]


def test_two_writers_racing_on_one_key_leave_a_complete_file(tmp_path, images, monkeypatch):
    paths, shas = images
    backbone = create_backbone("tiny-dinov2")
    first, second = FeatureCache(tmp_path, backbone), FeatureCache(tmp_path, backbone)
    expected = _direct(backbone, paths[:1]).half().float()
    real_save = np.save
    raced = []

    def save_with_a_rival(handle, array, allow_pickle):
        handle.write(b"\x93NUMPY")  # first writer is half-way through its temporary file ...
        if not raced:
            raced.append(True)
            second.ensure(paths[:1], shas[:1], progress=False)  # ... when the second one finishes
            assert torch.equal(second.load(shas[:1]), expected)
        handle.seek(0)
        real_save(handle, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(cache_module.np, "save", save_with_a_rival)
    first.ensure(paths[:1], shas[:1], progress=False)
    assert raced
    assert torch.equal(first.load(shas[:1]), expected)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_concurrent_ensure_from_threads(tmp_path, images):
    paths, shas = images
    backbone = create_backbone("tiny-dinov2")
    errors = []

    def run():
        try:
            FeatureCache(tmp_path, backbone).ensure(paths, shas, batch_size=1, progress=False)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert torch.equal(FeatureCache(tmp_path, backbone).load(shas), _direct(backbone, paths).half().float())
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_bad_input_is_a_user_error(tmp_path, images):
    paths, shas = images
    cache = FeatureCache(tmp_path / "c", create_backbone("tiny-dinov2"))
    with pytest.raises(NaglError, match=rf"image .*img0\.png has sha256 {shas[0]}, but {shas[1]} was given"):
        cache.ensure(paths[:1], shas[1:2], progress=False)
    with pytest.raises(NaglError, match="'abc' is not a sha256"):
        cache.ensure(paths[:1], ["abc"], progress=False)
    with pytest.raises(NaglError, match="2 paths but 1 sha256"):
        cache.ensure(paths[:2], shas[:1], progress=False)
    with pytest.raises(NaglError, match=r"image .*missing\.png does not exist"):
        cache.ensure([tmp_path / "missing.png"], ["0" * 64], progress=False)
    with pytest.raises(NaglError, match="2 of 2 images have no cached features"):
        cache.load(shas[:2])
    cache.ensure(paths[:1], shas[:1], progress=False)
    cache.path(shas[0]).write_bytes(b"garbage")
    with pytest.raises(NaglError, match=rf"cached features .*{shas[0]}\.npy are unreadable"):
        cache.load(shas[:1])


def test_cache_info_and_clear_commands(tmp_path, images):
    paths, shas = images
    FeatureCache(tmp_path, create_backbone("tiny-dinov2")).ensure(paths, shas, progress=False)
    clip_cache = FeatureCache(tmp_path, create_backbone("tiny-clip"))
    clip_cache.ensure(paths[:2], shas[:2], progress=False)
    runner = CliRunner()

    result = runner.invoke(_app, ["cache", "info", "--root", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "total: 7 images" in result.output
    assert any("tiny-clip" in line and " 2 " in line for line in result.output.splitlines())

    result = runner.invoke(_app, ["cache", "clear", "--root", str(tmp_path), "--backbone", "tiny-dinov2", "--yes"])
    assert result.exit_code == 0, result.output
    assert [row["backbone"] for row in cache_summary(tmp_path)] == ["tiny-clip"]
    assert clip_cache.contains(shas[0])
    size = clip_cache.size_bytes()
    assert size > 0
    assert clear_cache(tmp_path) == size
    assert cache_summary(tmp_path) == [] and not clip_cache.directory.exists()
