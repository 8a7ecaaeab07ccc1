"""NAGL: the forward pass, its edge cases and the reference-code defects it must avoid."""

from __future__ import annotations

import json

import pytest
import torch

from nagl.errors import NaglError
from nagl.io import sha256_file
from nagl.methods import create_method, load_method
from nagl.methods.base import prepare_references
from nagl.methods.nagl import head_count, position_encoding

GRID = (4, 6)  # not square: catches a row/column mix-up
G = GRID[0] * GRID[1]


def feats(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def box_mask(rows: slice, cols: slice, k: int = 1, size: tuple[int, int] = (16, 24)) -> torch.Tensor:
    mask = torch.zeros((k, *size), dtype=torch.bool)
    mask[:, rows, cols] = True
    return mask


def setting(dim: int, seed: int = 0):
    """Queries, 2 normal and 2 abnormal references with masks over a few patches."""
    normal = feats(seed, 2, G, dim)
    abnormal = normal.flip(0) + 0.3 * feats(seed + 1, 2, G, dim)
    masks = torch.zeros((2, 16, 24), dtype=torch.bool)
    masks[0, 0:4, 0:8] = True  # patches (0,0), (0,1)
    masks[1, 8:12, 12:16] = True  # patch (2,3)
    query = normal[0] + 0.5 * feats(seed + 2, 5, G, dim)
    return query, normal, abnormal, masks


def test_head_count_and_parameter_count():
    assert [head_count(c) for c in (384, 152, 30, 13, 8, 2)] == [4, 4, 3, 1, 4, 2]
    for dim in (152, 30, 13):
        method = create_method("nagl", dim)
        per_layer = 4 * (dim * dim + dim) + 2 * dim  # q, k, v, out projections + LayerNorm
        expected = 4 * per_layer + 25 * dim
        assert method.parameter_counts() == (expected, expected)
    assert create_method("nagl", 384).parameter_counts()[0] == 2_378_112  # the paper's ~2.4 M


@pytest.mark.parametrize("dim", [30, 13, 8])
def test_shapes_and_range_for_widths_not_multiple_of_four(dim):
    query, normal, abnormal, masks = setting(dim)
    S = create_method("nagl", dim).score(query, normal, abnormal, masks, GRID)
    assert S.shape == (5, 4, 6)
    assert torch.isfinite(S).all() and S.min() >= 0 and S.max() <= 1


def test_position_encoding_in_raster_order():
    pos = position_encoding(GRID, 30)
    assert pos.shape == (G, 30)
    rows, cols = pos[:, :15], pos[:, 15:]
    assert torch.equal(rows[0], rows[5]) and not torch.equal(rows[0], rows[6])  # same row 0, then row 1
    assert torch.equal(cols[0], cols[6]) and not torch.equal(cols[0], cols[1])  # same column 0
    assert len({tuple(p.tolist()) for p in pos}) == G


def test_no_abnormal_reference_equals_knn_normal_and_needs_no_weights():
    query, normal, _, _ = setting(16)
    knn = create_method("knn-normal", 16).score(query, normal, grid=GRID)
    for seed in (0, 1):
        nagl = create_method("nagl", 16, seed=seed)
        assert torch.equal(nagl.score(query, normal, None, None, GRID), knn)
        assert torch.equal(nagl.score(query, normal, torch.zeros((0, G, 16)), torch.zeros((0, 16, 24), dtype=torch.bool), GRID), knn)


def test_no_normal_reference_uses_normal_patches_of_abnormal_references():
    query, _, abnormal, masks = setting(16)
    nagl = create_method("nagl", 16)
    S = nagl.score(query, torch.zeros((0, G, 16)), abnormal, masks, GRID)
    knn = create_method("knn-normal", 16).score(query, None, abnormal, masks, GRID)
    s_a = 2 * S - knn  # S = (s_a + 1 - s_n) / 2 and knn = 1 - s_n with the same bank
    assert S.shape == (5, 4, 6)
    assert s_a.min() >= -1e-6 and s_a.max() <= 1 + 1e-6
    refs = prepare_references(None, abnormal, masks, GRID)
    assert refs.bank.shape[0] == 2 * G - 3  # every patch but the 3 marked ones


def test_no_references_and_unusable_masks_are_errors():
    query, normal, abnormal, masks = setting(16)
    nagl = create_method("nagl", 16)
    with pytest.raises(NaglError, match="no references"):
        nagl.score(query, torch.zeros((0, G, 16)), torch.zeros((0, G, 16)), None, GRID)
    with pytest.raises(NaglError, match="k_normal = 0"):
        nagl.score(query, None, abnormal, None, GRID)
    with pytest.raises(NaglError, match="width 12"):
        nagl.score(query[..., :12], normal[..., :12], grid=GRID)


def test_missing_or_empty_mask_uses_the_pseudo_mask():
    dim = 16
    query, normal, _, _ = setting(dim)
    abnormal = normal[:1].clone()
    planted = [7, 8, 13]  # patches (1,1), (1,2), (2,1)
    abnormal[0, planted] = 4 * feats(9, 3, dim)
    nagl = create_method("nagl", dim)
    explicit = torch.zeros((1, 16, 24), dtype=torch.bool)
    explicit[0, 4:8, 4:12] = True
    explicit[0, 8:12, 4:8] = True
    with_mask = nagl.score(query, normal, abnormal, explicit, GRID, )
    refs = prepare_references(normal, abnormal, None, GRID, pseudo_count=3)
    assert torch.nonzero(refs.patch_mask[0]).flatten().tolist() == planted
    # the default pseudo-mask has top_k_count(24) = 1 patch: the largest residual among the planted
    no_mask = nagl.score(query, normal, abnormal, None, GRID)
    empty = nagl.score(query, normal, abnormal, torch.zeros((1, 16, 24), dtype=torch.bool), GRID)
    assert torch.equal(no_mask, empty)
    assert not torch.allclose(no_mask, with_mask)
    default = prepare_references(normal, abnormal, None, GRID)
    assert int(default.patch_mask.sum()) == 1 and int(torch.nonzero(default.patch_mask[0])) in planted


def test_attention_sees_only_the_abnormal_patches():
    """Changing an abnormal reference outside its mask (bank unchanged) changes nothing."""
    query, normal, abnormal, masks = setting(16)
    nagl = create_method("nagl", 16)
    before = nagl.score(query, normal, abnormal, masks, GRID)
    edited = abnormal.clone()
    edited[0, 10:] = feats(11, G - 10, 16)  # patches 10.. of reference 0 are outside its mask
    assert torch.allclose(nagl.score(query, normal, edited, masks, GRID), before, atol=1e-6)
    edited[0, 0] += 1.0  # a masked patch does matter
    assert not torch.allclose(nagl.score(query, normal, edited, masks, GRID), before, atol=1e-4)


def test_batch_gives_the_same_scores_as_items_one_by_one():
    query, normal, abnormal, masks = setting(16)
    nagl = create_method("nagl", 16)
    together = nagl.score(query, normal, abnormal, masks, GRID)
    alone = torch.cat([nagl.score(q[None], normal, abnormal, masks, GRID) for q in query])
    assert torch.allclose(together, alone, atol=1e-6)


def test_episode_batch_with_different_masks_and_sizes_matches_items():
    """Each item has its own references and attention mask (and a different k2): the
    batch-major mask must keep them apart."""
    dim = 16
    nagl = create_method("nagl", dim)
    query, normal, abnormal, masks = setting(dim)
    references = [
        prepare_references(normal[:1], abnormal[:1], masks[:1], GRID),
        prepare_references(normal, abnormal, masks, GRID),
        prepare_references(normal[1:], abnormal[1:], box_mask(slice(0, 16), slice(20, 24)), GRID),
    ]
    s_n, s_a = nagl.episode_maps(query[:3], references, GRID)
    for b, refs in enumerate(references):
        one_n, one_a = nagl.episode_maps(query[b:b + 1], [refs], GRID)
        assert torch.allclose(s_n[b], one_n[0], atol=1e-6)
        assert torch.allclose(s_a[b], one_a[0], atol=1e-6)
    assert not torch.allclose(s_a[0], s_a[1], atol=1e-3)


def test_order_of_abnormal_references_does_not_matter():
    """Keys and their position encodings stay aligned when k2 > 1."""
    query, normal, abnormal, masks = setting(16)
    nagl = create_method("nagl", 16)
    forward = nagl.score(query, normal, abnormal, masks, GRID)
    backward = nagl.score(query, normal, abnormal.flip(0), masks.flip(0), GRID)
    assert torch.allclose(forward, backward, atol=1e-5)


def test_save_load_gives_identical_scores(tmp_path):
    query, normal, abnormal, masks = setting(30)
    nagl = create_method("nagl", 30, seed=4)
    folder = nagl.save(tmp_path / "ckpt", {"backbone": "toy"})
    info = json.loads((folder / "model.json").read_text())
    assert info["method"] == "nagl" and info["dim"] == 30 and info["config"] == {"proxies": 25, "heads": 4,
                                                                                  "loss_form": "paper"}
    assert info["checkpoint_hash"] == sha256_file(folder / "weights.safetensors")
    for path in (folder, folder / "weights.safetensors", folder / "model.json"):
        restored = load_method(path)
        assert torch.equal(restored.score(query, normal, abnormal, masks, GRID),
                           nagl.score(query, normal, abnormal, masks, GRID))
    info["dim"] = 32
    (folder / "model.json").write_text(json.dumps(info))
    with pytest.raises(NaglError, match="does not fit a head of width 32"):
        load_method(folder)


def test_fixed_seed_gives_identical_results():
    query, normal, abnormal, masks = setting(16)
    first = create_method("nagl", 16, seed=7).score(query, normal, abnormal, masks, GRID)
    second = create_method("nagl", 16, seed=7).score(query, normal, abnormal, masks, GRID)
    other = create_method("nagl", 16, seed=8).score(query, normal, abnormal, masks, GRID)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
