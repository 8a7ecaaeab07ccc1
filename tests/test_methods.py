"""The shared method layer: registry, post-processing, reference rules, kNN baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from nagl.errors import NaglError
from nagl.methods import anomaly_maps, create_method, image_scores, list_methods, load_method
from nagl.methods.base import pool_masks, prepare_references, pseudo_mask, top_k_count


def features(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def brute_sim_max(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """max over the bank of (1 + cos) / 2, one query patch at a time (independent of the code)."""
    out = np.empty(len(query))
    for i, q in enumerate(query):
        cos = [float(q @ b / (np.linalg.norm(q) * np.linalg.norm(b))) for b in bank]
        out[i] = (1 + max(cos)) / 2
    return out


# ------------------------------------------------------------------ registry --

def test_registry_names_and_trainability():
    assert sorted(list_methods()) == ["inctrl", "knn-naive", "knn-normal", "nagl", "nagl-cal", "resad"]
    assert create_method("nagl", 8).trainable
    assert not create_method("knn-normal", 8).trainable
    assert not create_method("knn-naive", 8).trainable
    with pytest.raises(NaglError, match="unknown method 'patchcore'"):
        create_method("patchcore", 8)
    with pytest.raises(NaglError, match="bad settings"):
        create_method("knn-normal", 8, proxies=3)


# ------------------------------------------------------------ post-processing --

def test_anomaly_maps_match_scipy_on_the_upsampled_map():
    S = features(0, 2, 4, 4).abs()
    maps = anomaly_maps(S, 32, sigma=2.0)
    assert maps.shape == (2, 32, 32)
    up = torch.nn.functional.interpolate(S[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    for got, source in zip(maps.numpy(), up.numpy(), strict=False):
        expected = ndimage.gaussian_filter(source.astype(np.float64), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_anomaly_maps_keep_constants_and_peaks():
    flat = torch.full((1, 8, 8), 0.3)
    np.testing.assert_allclose(anomaly_maps(flat, 64).numpy(), 0.3, atol=1e-6)
    peak = torch.zeros((1, 8, 8))
    peak[0, 2, 5] = 1.0
    maps = anomaly_maps(peak, 64)[0]
    row, col = divmod(int(maps.argmax()), 64)
    assert 16 <= row < 24 and 40 <= col < 48  # inside the cell of patch (2, 5)


def test_image_scores_mean_of_top_one_percent():
    S = torch.zeros((2, 32, 32))
    S[0].view(-1)[:10] = torch.arange(10, dtype=torch.float32) + 1  # 1% of 1024 = 10 patches
    S[0].view(-1)[10] = 0.5
    S[1].view(-1)[3] = 2.0
    scores = image_scores(S)
    assert scores[0].item() == pytest.approx(5.5)
    assert scores[1].item() == pytest.approx(0.2)
    small = torch.tensor([[[0.1, 0.9], [0.3, 0.2]]])  # 4 patches: at least one patch
    assert image_scores(small).item() == pytest.approx(0.9)


def test_top_k_scales_with_grid():
    assert top_k_count(1024) == 20
    assert top_k_count(256) == 5
    assert top_k_count(16) == 1
    assert top_k_count(4096) == 80


# -------------------------------------------------------------- references --

def test_pool_masks_any_pixel_marks_its_patch():
    masks = torch.zeros((2, 30, 30), dtype=torch.bool)
    masks[0, 0, 29] = True  # top-right pixel -> patch (0, 3) of a 4x4 grid
    masks[1, 16:18, 8:10] = True
    pooled = pool_masks(masks, (4, 4))
    assert pooled.shape == (2, 16)
    assert torch.nonzero(pooled[0]).flatten().tolist() == [3]
    assert pooled[1].sum() >= 1 and pooled[1].view(4, 4)[2, 1]


def test_pseudo_mask_marks_the_largest_residuals():
    normal = features(1, 1, 16, 12)
    abnormal = normal.clone()
    planted = [2, 7, 11]
    abnormal[0, planted] = features(2, 3, 12) * 5
    mask = pseudo_mask(abnormal[0], normal[0], count=3)
    assert torch.nonzero(mask).flatten().tolist() == planted


def test_reference_rules_errors():
    grid = (4, 4)
    with pytest.raises(NaglError, match="no references"):
        prepare_references(None, None, None, grid)
    with pytest.raises(NaglError, match="2 abnormal masks for 1"):
        prepare_references(features(0, 1, 16, 8), features(1, 1, 16, 8), [None, None], grid)
    with pytest.raises(NaglError, match="k_normal = 0"):
        prepare_references(None, features(1, 1, 16, 8), None, grid)
    with pytest.raises(NaglError, match="grid 4x4 does not match 9"):
        create_method("knn-normal", 8).score(features(0, 1, 9, 8), features(1, 1, 9, 8), grid=grid)


def test_empty_mask_gets_pseudo_mask_and_k1_zero_bank():
    grid = (4, 4)
    abnormal = features(3, 2, 16, 8)
    masks = torch.zeros((2, 8, 8), dtype=torch.bool)
    masks[0, :2, :2] = True  # patch 0 of reference 0
    refs = prepare_references(torch.zeros((0, 16, 8)), abnormal, masks, grid)
    assert refs.pseudo.tolist() == [False, True]
    assert refs.patch_mask[0].nonzero().flatten().tolist() == [0]
    assert int(refs.patch_mask[1].sum()) == top_k_count(16)
    # k1 = 0: the bank is the 15 unmarked patches of the reference that has a mask
    assert torch.equal(refs.bank, abnormal[0, 1:])


# --------------------------------------------------------------------- kNN --

def test_knn_normal_is_one_minus_best_similarity():
    query, normal = features(4, 3, 12, 10), features(5, 2, 12, 10)
    S = create_method("knn-normal", 10).score(query, normal, grid=(3, 4))
    assert S.shape == (3, 3, 4)
    bank = normal.reshape(-1, 10).numpy()
    for q, s in zip(query.numpy(), S.numpy(), strict=False):
        np.testing.assert_allclose(s.ravel(), 1 - brute_sim_max(q, bank), atol=1e-6)
    # a query equal to a normal reference is normal everywhere
    same = create_method("knn-normal", 10).score(normal[:1], normal, grid=(3, 4))
    np.testing.assert_allclose(same.numpy(), 0.0, atol=1e-6)


def test_knn_normal_with_only_abnormal_references_uses_their_normal_patches():
    grid = (4, 4)
    abnormal = features(6, 1, 16, 8)
    masks = torch.zeros((1, 4, 4), dtype=torch.bool)
    masks[0, 0, 0] = True  # patch 0 is the defect
    query = abnormal.clone()
    S = create_method("knn-normal", 8).score(query, None, abnormal, masks, grid).view(-1)
    assert torch.allclose(S[1:], torch.zeros(15), atol=1e-6)  # normal patches are in the bank
    assert S[0] > 0.01  # the defect patch is not


def test_knn_naive_formula_and_reduction_to_knn_normal():
    grid = (4, 4)
    query, normal, abnormal = features(7, 2, 16, 6), features(8, 2, 16, 6), features(9, 1, 16, 6)
    masks = torch.zeros((1, 4, 4), dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    naive = create_method("knn-naive", 6)
    S = naive.score(query, normal, abnormal, masks, grid)
    abnormal_patches = abnormal[0][masks[0].view(-1)].numpy()
    for q, s in zip(query.numpy(), S.numpy(), strict=False):
        expected = (brute_sim_max(q, abnormal_patches) + 1 - brute_sim_max(q, normal.reshape(-1, 6).numpy())) / 2
        np.testing.assert_allclose(s.ravel(), expected, atol=1e-6)
    knn = create_method("knn-normal", 6).score(query, normal, grid=grid)
    assert torch.equal(naive.score(query, normal, torch.zeros((0, 16, 6)), None, grid), knn)


def test_training_free_methods_save_and_load(tmp_path):
    method = create_method("knn-naive", 6)
    method.save(tmp_path / "ckpt", {"backbone": "toy"})
    restored = load_method(tmp_path / "ckpt")
    assert restored.name == "knn-naive" and restored.dim == 6
    assert not (tmp_path / "ckpt" / "weights.safetensors").exists()
    with pytest.raises(NaglError, match="does not exist"):
        load_method(tmp_path / "nowhere")


# ----------------------------------------------------------- reused blocks --

def _old_normal_scores(query: torch.Tensor, bank: torch.Tensor, chunk: int) -> torch.Tensor:
    """The scoring before the reused block: one fresh product per chunk, then concatenated."""
    bank_n = torch.nn.functional.normalize(bank, dim=-1)
    return torch.cat([(1.0 + (torch.nn.functional.normalize(part, dim=-1) @ bank_n.T).amax(dim=-1)) / 2.0
                      for part in query.split(chunk)])


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_scoring_in_the_reused_block_gives_the_same_numbers_as_fresh_products(chunk):
    from nagl.methods.base import cosine_matrix, nearest_normal, normal_scores, similarity

    query, bank, small_bank = features(20, 7, 64, 24), features(21, 300, 24), features(22, 5, 24)
    with torch.no_grad():
        # a large bank, then a small one: the second call runs in a part of the grown buffer
        for b in (bank, small_bank, bank):
            assert torch.equal(normal_scores(query, b, chunk), _old_normal_scores(query, b, chunk))
        for x in (query[:chunk], query[0]):
            best, residual = nearest_normal(x, bank)
            cos, index = cosine_matrix(x, bank).max(dim=-1)
            assert torch.equal(best, similarity(cos))
            assert torch.equal(residual, x - bank[index])
    # results never alias the reused buffer: a later call leaves them unchanged
    with torch.no_grad():
        first = normal_scores(query, bank, chunk)
        kept = first.clone()
        normal_scores(features(23, 7, 64, 24), bank, chunk)
    assert torch.equal(first, kept)
    # with autograd on, gradients still flow (the buffer is not used)
    leaf = query[:2].clone().requires_grad_(True)
    normal_scores(leaf, bank, chunk).sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
