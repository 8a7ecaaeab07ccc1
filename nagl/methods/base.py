"""What every method shares: the interface, reference preparation, post-processing.

A method turns cached patch features into a patch-level anomaly map ``S`` of shape
``(Q, h, w)``, higher = more anomalous. Everything after that is shared, so all
methods are compared on the same footing:

- :func:`anomaly_maps` - bilinear upsampling to the evaluation size, then a Gaussian
  blur (sigma 4 px);
- :func:`image_scores` - mean of the top 1 % of patch scores (at least one patch).

:func:`prepare_references` holds the reference rules all methods follow: which
patches form the normal bank, which patches of an abnormal reference are abnormal,
and the pseudo-mask for an abnormal reference without a usable mask.
"""

from __future__ import annotations

import functools
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from nagl.errors import NaglError
from nagl.io import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, stable_hash
from nagl.training.batch import BatchSpec, EpisodeBatch

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model.json"

MaskInput = torch.Tensor | Sequence[torch.Tensor | None] | None


# ------------------------------------------------------------------ helpers --

def infer_grid(n_patches: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The patch grid ``(h, w)``: ``grid`` checked against ``G``, or the square root of ``G``."""
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h * w != n_patches:
            raise NaglError(f"grid {h}x{w} does not match {n_patches} patches per image; "
                            f"pass the backbone's grid")
        return h, w
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise NaglError(f"{n_patches} patches per image is not a square grid; pass grid=(h, w)")
    return side, side


def top_k_count(n_patches: int, per_1024: float = 20.0) -> int:
    """``k`` scaled with the grid: ``per_1024`` patches at a 32x32 grid, at least one."""
    return max(1, min(n_patches, round(per_1024 * n_patches / 1024)))


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest values over all but the first dimension."""
    flat = values.reshape(values.shape[0], -1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


def cosine_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``x`` ``(..., N, C)`` with every row of ``y`` ``(M, C)``."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)


def similarity(cos: torch.Tensor) -> torch.Tensor:
    """``sim = (1 + cos) / 2``, in [0, 1]."""
    return (1.0 + cos) / 2.0


class _Scratch(threading.local):
    """One buffer for the cosine blocks of scoring, grown to the largest block and then reused.

    A block of 8 queries x 1024 patches against a 4096-patch bank is 134 MB. Allocated
    and freed per chunk, the allocator maps and unmaps it every time, and every 4 KiB
    touched is a page fault. The blocks keep their shapes, so the numbers do not change.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def block(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``(rows, cols)`` view of the buffer; its contents are undefined."""
        if self.buffer.numel() < rows * cols or self.buffer.dtype != dtype:
            self.buffer = torch.empty(rows * cols, dtype=dtype)
        return self.buffer[: rows * cols].view(rows, cols)


_SCRATCH = _Scratch()


def nearest_normal(x: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of ``x`` ``(N, C)``: ``sim`` to its cosine nearest bank patch, and the residual.

    Returns ``(s (N,), residual (N, C))`` with ``residual = x - bank[nn]``.
    """
    if x.requires_grad or bank.requires_grad:
        cos = cosine_matrix(x, bank)
    else:  # frozen features (training included): no graph, the search in the reused block
        with torch.no_grad():
            rows = F.normalize(x, dim=-1).reshape(-1, x.shape[-1])
            block = _SCRATCH.block(rows.shape[0], bank.shape[0], rows.dtype)
            cos = torch.mm(rows, F.normalize(bank, dim=-1).T, out=block).view(*x.shape[:-1], bank.shape[0])
    best, index = cos.max(dim=-1)
    return similarity(best), x - bank[index]


def reference_maxima(query: torch.Tensor, bank: torch.Tensor, chunk: int = 8,
                     with_index: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Best cosine of every query patch within each block of ``G`` bank rows: ``(Q, G, blocks)``.

    ``G`` is the query's patch count, so with a bank of normal references each block is
    one reference image, and the best cosine over the first ``k`` references is the max
    of the first ``k`` columns. Every block is its own product of the same shape
    whatever the bank size, so a prefix of a larger bank gives bit-identical numbers
    (the nested shot settings of one split share one search). Computed per chunk of
    ``chunk`` queries (on frozen features, without a graph, in the reused block of :class:`_Scratch`).
    ``with_index`` also returns the bank row of each maximum ``(Q, G, blocks)``.
    """
    g, c = query.shape[1], query.shape[-1]
    bank_n = F.normalize(bank, dim=-1)
    blocks = max(1, -(-bank.shape[0] // g))
    best = query.new_empty((query.shape[0], g, blocks))
    where = torch.empty((query.shape[0], g, blocks), dtype=torch.long) if with_index else None
    for begin in range(0, query.shape[0], chunk):
        part = F.normalize(query[begin:begin + chunk], dim=-1).reshape(-1, c)
        for j in range(blocks):
            rows = bank_n[j * g:(j + 1) * g]
            if part.requires_grad or rows.requires_grad:
                cos = part @ rows.T
            else:
                with torch.no_grad():
                    cos = torch.mm(part, rows.T, out=_SCRATCH.block(part.shape[0], rows.shape[0], part.dtype))
            if where is None:
                best[begin:begin + chunk, :, j] = cos.amax(dim=-1).view(-1, g)
            else:
                value, index = cos.max(dim=-1)
                best[begin:begin + chunk, :, j] = value.view(-1, g)
                where[begin:begin + chunk, :, j] = index.view(-1, g) + j * g
    return best if where is None else (best, where)


def normal_scores(query: torch.Tensor, bank: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """``s_n`` of every query patch: max ``sim`` over the bank, ``(Q, G)`` (see :func:`reference_maxima`)."""
    return similarity(reference_maxima(query, bank, chunk).amax(dim=-1))


@dataclass(frozen=True)
class NormalSide:
    """What scoring queries against one normal bank needs whatever the abnormal references:
    ``s_n`` ``(Q, G)`` and, when asked for, each patch's residual to its nearest normal
    patch ``(Q, G, C)`` (a multi-level method: ``{level: (Q, G_l, C_l)}``, and ``s_n`` may be
    None). Computed once per (split, k_normal) and shared by the clean cell and its
    reference-use checks; :meth:`rows` gives a batch's part."""

    s_n: torch.Tensor | None = None
    residual: torch.Tensor | dict[str, torch.Tensor] | None = None

    def rows(self, begin: int, end: int) -> NormalSide:
        residual = self.residual
        if isinstance(residual, dict):
            residual = {name: value[begin:end] for name, value in residual.items()}
        elif residual is not None:
            residual = residual[begin:end]
        return NormalSide(None if self.s_n is None else self.s_n[begin:end], residual)


def nested_normal_side(query: torch.Tensor, normal: torch.Tensor, shots: Sequence[int], chunk: int = 8,
                       residual: bool = False) -> dict[int, NormalSide]:
    """The :class:`NormalSide` of ``query`` ``(Q, G, C)`` for each ``k`` of ``shots`` over the first
    ``k`` normal references ``(k1, G, C)``, from one search of the largest bank: ``s_n`` equals
    ``normal_scores(query, normal[:k].reshape(-1, C))`` bit for bit; ``residual`` adds the
    residuals (``query - bank[nearest]``, the nearest within the first ``k`` references)."""
    if not shots or min(shots) < 1 or max(shots) > normal.shape[0]:
        raise NaglError(f"shots {list(shots)} must lie in 1..{normal.shape[0]} (the normal references given)")
    bank = normal[:max(shots)].reshape(-1, normal.shape[-1])
    if not residual:
        prefix = reference_maxima(query, bank, chunk).cummax(dim=-1).values
        return {k: NormalSide(similarity(prefix[..., k - 1])) for k in shots}
    best, where = reference_maxima(query, bank, chunk, with_index=True)
    prefix, block = best.cummax(dim=-1)
    out = {}
    for k in shots:
        nearest = where.gather(-1, block[..., k - 1:k])[..., 0]  # (Q, G) bank rows
        out[k] = NormalSide(similarity(prefix[..., k - 1]), query - bank[nearest])
    return out


# -------------------------------------------------------------- references --

@dataclass
class References:
    """Prepared reference set of one episode or test setting.

    ``bank`` ``(M, C)``: the normal patches every query and abnormal patch is matched
    against. ``abnormal`` ``(k2, G, C)`` and ``patch_mask`` ``(k2, G)`` bool: which
    patches of each abnormal reference are abnormal (pooled, or the pseudo-mask).
    ``pseudo`` ``(k2,)`` bool marks references whose mask is a pseudo-mask.
    """

    bank: torch.Tensor
    abnormal: torch.Tensor
    patch_mask: torch.Tensor
    pseudo: torch.Tensor

    @property
    def k_abnormal(self) -> int:
        return self.abnormal.shape[0]


def pool_masks(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel masks ``(k, S, S)`` to patch masks ``(k, h*w)``: a patch is abnormal when
    any mask pixel inside its cell is (adaptive max-pooling covers every pixel)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, grid[0] * grid[1]), dtype=torch.bool)
    pooled = F.adaptive_max_pool2d(masks.float()[:, None], grid)
    return (pooled[:, 0] > 0).reshape(masks.shape[0], -1)


def pseudo_mask(features: torch.Tensor, bank: torch.Tensor, count: int) -> torch.Tensor:
    """Pseudo-mask of an abnormal reference without a usable mask: its ``count`` patches
    with the largest residual norm against the normal bank. ``features`` ``(G, C)`` -> ``(G,)`` bool."""
    _, residual = nearest_normal(features, bank)
    chosen = residual.norm(dim=-1).topk(min(count, features.shape[0])).indices
    mask = torch.zeros(features.shape[0], dtype=torch.bool)
    mask[chosen] = True
    return mask


def _mask_list(abnormal_masks: MaskInput, k2: int) -> list[torch.Tensor | None]:
    if abnormal_masks is None:
        return [None] * k2
    masks = list(abnormal_masks)
    if len(masks) != k2:
        raise NaglError(f"got {len(masks)} abnormal masks for {k2} abnormal references; "
                        f"pass one mask per abnormal reference (None or all-zero where there is none)")
    return masks


def pooled_reference_masks(abnormal_masks: MaskInput, k2: int, grid: tuple[int, int]) -> torch.Tensor:
    """The ``k2`` abnormal references' masks pooled to the grid ``(k2, G)`` bool; all False where none is given."""
    patch_masks = torch.zeros((k2, grid[0] * grid[1]), dtype=torch.bool)
    for j, mask in enumerate(_mask_list(abnormal_masks, k2)):
        if mask is not None:
            patch_masks[j] = pool_masks(torch.as_tensor(mask)[None], grid)[0]
    return patch_masks


def pseudo_mask_count(abnormal_masks: MaskInput, k2: int, grid: tuple[int, int]) -> int:
    """How many of ``k2`` abnormal references get a pseudo-mask: no mask, or one that covers no patch."""
    return int((~pooled_reference_masks(abnormal_masks, k2, grid).any(dim=1)).sum())


def prepare_references(normal: torch.Tensor | None, abnormal: torch.Tensor | None,
                       abnormal_masks: MaskInput, grid: tuple[int, int],
                       pseudo_count: int | None = None,
                       patch_masks: torch.Tensor | None = None) -> References:
    """Apply the reference rules shared by all methods.

    - The normal bank is every patch of the normal references; with none (``k1 = 0``)
      it is the non-abnormal patches of the abnormal references that have a mask.
    - An abnormal reference's mask is max-pooled to the grid. If it has no mask, or
      the pooled mask is empty, its pseudo-mask is its ``pseudo_count`` patches with
      the largest residuals against the bank (default :func:`top_k_count`, 20 patches
      at 32x32).
    - ``k1 = k2 = 0`` is an error.

    ``patch_masks`` ``(k2, G)`` bool may be given instead of pixel masks (training
    pools masks once, up front).
    """
    g = grid[0] * grid[1]
    if normal is None:
        normal = torch.zeros((0, g, 0))
    if abnormal is None:
        abnormal = torch.zeros((0, g, normal.shape[-1]))
    k1, k2 = normal.shape[0], abnormal.shape[0]
    if k1 == 0 and k2 == 0:
        raise NaglError("no references: give at least one normal or one abnormal reference image")
    for name, tensor in (("normal", normal), ("abnormal", abnormal)):
        if tensor.shape[0] and (tensor.ndim != 3 or tensor.shape[1] != g):
            raise NaglError(f"{name} references have shape {tuple(tensor.shape)}; "
                            f"expected (k, {g}, C) for the grid {grid[0]}x{grid[1]}")
    if k1 and k2 and normal.shape[2] != abnormal.shape[2]:
        raise NaglError(f"normal features have width {normal.shape[2]}, abnormal {abnormal.shape[2]}; "
                        f"use features of one backbone")

    if patch_masks is None:
        patch_masks = pooled_reference_masks(abnormal_masks, k2, grid)
    else:
        patch_masks = patch_masks.clone().bool()
    missing = ~patch_masks.any(dim=1)

    if k1:
        bank = normal.reshape(-1, normal.shape[-1])
    else:
        keep = patch_masks[~missing]
        bank = abnormal[~missing][~keep] if keep.numel() else abnormal.new_zeros((0, abnormal.shape[-1]))
        if bank.shape[0] == 0:
            raise NaglError("no normal references and no abnormal reference with a usable mask: "
                            "with k_normal = 0 every abnormal reference set needs at least one mask "
                            "that marks part (not all) of its image")
    count = pseudo_count or top_k_count(g)
    for j in torch.nonzero(missing).flatten().tolist():
        patch_masks[j] = pseudo_mask(abnormal[j], bank, count)
    return References(bank=bank, abnormal=abnormal, patch_mask=patch_masks, pseudo=missing)


# ---------------------------------------------------------- post-processing --

def gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return kernel / kernel.sum()


def _blur_1d(lines: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur along the last axis of ``(N, L)``, truncated at 4 sigma, mirror padding."""
    if sigma <= 0:
        return lines
    radius = min(int(4 * sigma + 0.5), lines.shape[-1] - 1)
    padded = F.pad(lines[:, None], (radius, radius), mode="reflect")
    return F.conv1d(padded, gaussian_kernel(sigma, radius).view(1, 1, -1))[:, 0]


@functools.lru_cache(maxsize=16)
def _axis_operator(n_patches: int, size: int, sigma: float) -> torch.Tensor:
    """The ``(size, n_patches)`` matrix of linear upsampling then blurring along one axis.

    Bilinear upsampling (``align_corners=False``) and the Gaussian blur are both
    separable and linear, so a patch map's pixel map is ``A_h @ S @ A_w.T``: two
    small matrix products instead of a 2-D convolution over every pixel.
    """
    basis = torch.eye(n_patches)[:, None, :, None]  # one unit impulse per patch row
    up = F.interpolate(basis, size=(size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0]
    return _blur_1d(up, sigma).T.contiguous()


def anomaly_maps(S: torch.Tensor, size: int, sigma: float = 4.0) -> torch.Tensor:
    """Patch maps ``(Q, h, w)`` to pixel maps ``(Q, size, size)``.

    Bilinear upsampling (``align_corners=False``), then a separable Gaussian blur of
    ``sigma`` pixels truncated at 4 sigma, with mirror padding at the borders.
    """
    if S.ndim != 3:
        raise NaglError(f"expected patch maps of shape (Q, h, w), got {tuple(S.shape)}")
    rows = _axis_operator(S.shape[1], size, float(sigma))
    cols = _axis_operator(S.shape[2], size, float(sigma))
    return rows @ S.float() @ cols.T


def image_scores(S: torch.Tensor) -> torch.Tensor:
    """Image score per query: mean of the top 1 % of its patch scores (at least one)."""
    k = max(1, int(0.01 * S[0].numel())) if S.shape[0] else 1
    return top_k_mean(S.float(), k)


@torch.no_grad()
def score_batch(method: Method, query, normal, abnormal, masks, grid,
                category: str, normal_side: NormalSide | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(patch_maps, image_scores or None)`` of one batch of queries, as evaluation and checkpoint
    selection score them: ``grid`` is the default grid ``(h, w)`` for a single-grid method, or
    ``{level: (h, w)}`` for a multi-level one, which also gets the category. ``normal_side``: the
    batch's part of what :meth:`Method.normal_side` computed for these queries and normal references."""
    shared = {} if normal_side is None else {"normal_side": normal_side}
    if method.level_group is None:
        return method.score(query, normal, abnormal, masks, grid, **shared), None
    out = method.score(query, normal, abnormal, masks, grid, category=category, **shared)
    return out if isinstance(out, tuple) else (out, None)


@torch.no_grad()
def final_image_scores(method: Method, patch_maps: torch.Tensor, parts: list[torch.Tensor | None],
                       resolution: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(image scores (Q,), pixel maps or None)``: the scores the method returned with its patch
    maps (``parts``, one per batch), else its ``image_scores`` hook, given the pixel maps when it
    asks for them."""
    if parts and all(part is not None for part in parts):
        return torch.cat(parts), None
    pixel_maps = anomaly_maps(patch_maps, resolution) if method.image_scores_need_pixels else None
    return method.image_scores(patch_maps, pixel_maps), pixel_maps


# ---------------------------------------------------------------- interface --

class Method(ABC):
    """A detector behind the common interface.

    ``config`` holds the method's own settings (hashed into ``config_hash``);
    ``dim`` is the feature width C of the backbone it works on.
    """

    name: ClassVar[str]
    trainable: ClassVar[bool]
    # Which features the method reads. None: the backbone's single default grid, as tensors.
    # Otherwise the name of a backbone level group (``"patch"``, ``"pyramid"``): ``score``
    # then gets dicts ``{level: (n, G_l, C_l)}``, per-level grids and ``category=``.
    level_group: ClassVar[str | None] = None
    needs_embed: ClassVar[bool] = False  # also the global image embedding, key "embed" -> (n, D)
    # False: evaluated only in k_abnormal = 0 cells (and k_normal = 0 is an error).
    uses_abnormal_refs: ClassVar[bool] = True
    # True: the harness computes the pixel maps before calling ``image_scores``.
    image_scores_need_pixels: ClassVar[bool] = False

    def __init__(self, dim: int, **config: Any):
        if int(dim) <= 0:
            raise NaglError(f"feature width must be positive, got dim={dim}")
        self.dim = int(dim)
        self.config: dict[str, Any] = dict(config)

    @abstractmethod
    def score(self, query: torch.Tensor, normal: torch.Tensor | None = None,
              abnormal: torch.Tensor | None = None, abnormal_masks: MaskInput = None,
              grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch anomaly maps ``(Q, h, w)`` of the queries given the references.

        A multi-level method (``level_group`` set) is called as ``score(query, normal,
        abnormal, abnormal_masks, grid, category=...)`` with dicts of levels and a dict of
        grids, and may return ``(patch_maps, image_scores (Q,))``.
        """

    def normal_side(self, query: torch.Tensor, normal: torch.Tensor,
                    shots: Sequence[int]) -> dict[int, NormalSide] | None:
        """The work on ``query`` that depends on the normal references alone, for each k_normal of
        ``shots`` (the first k of ``normal``). Evaluation computes it once per reference split and
        gives each batch's part to ``score(..., normal_side=)``, for the clean cell and its
        reference-use checks alike. None (the default): nothing to share; ``score`` never gets one."""
        return None

    def image_scores(self, patch_maps: torch.Tensor, pixel_maps: torch.Tensor | None = None) -> torch.Tensor:
        """Image score per query ``(Q,)``; default the top-1 % mean of the patch map (pixel maps unused)."""
        return image_scores(patch_maps)

    @classmethod
    def feature_levels(cls, backbone: Any) -> tuple[str, ...]:
        """The cached levels the method reads on ``backbone`` (empty: the default grid only)."""
        if cls.level_group is None:
            return ()
        names = backbone.group_levels(cls.level_group)
        if cls.needs_embed:
            if backbone.embed_dim is None:
                raise NaglError(f"method {cls.name!r} needs an image embedding; backbone {backbone.name!r} "
                                f"has none: choose another backbone")
            names = (*names, "embed")
        return tuple(names)

    @classmethod
    def config_for_backbone(cls, backbone: Any) -> dict[str, Any]:
        """Settings derived from the backbone, passed to the constructor with the user's.

        For a multi-level method: ``{"levels": {name: [h, w, C]}, "embed_dim": D or None}``,
        so its checkpoint records the shapes it was trained for.
        """
        if cls.level_group is None:
            return {}
        levels = {name: [*backbone.levels[name][0], backbone.levels[name][1]]
                  for name in cls.feature_levels(backbone) if name != "embed"}
        return {"levels": levels, "embed_dim": backbone.embed_dim if cls.needs_embed else None}

    def parameter_counts(self) -> tuple[int, int]:
        """``(total, trainable)`` parameters of the head (the backbone not included)."""
        return 0, 0

    def config_hash(self) -> str:
        return stable_hash({"method": self.name, "dim": self.dim, "config": self.config})

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "dim": self.dim, "config": self.config}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NaglError(f"{self.name} has no weights, but the checkpoint holds {len(state)} tensors")

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``weights.safetensors`` (weights only) and ``model.json`` into the folder ``path``.

        ``model.json`` holds the config, ``metadata`` and ``checkpoint_hash`` (sha256 of
        the weights file; None for a method without weights). It is written last, so
        its presence marks a complete checkpoint.
        """
        from safetensors.torch import save

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        checkpoint_hash = None
        if state:
            data = save(state)
            checkpoint_hash = sha256_bytes(data)
            atomic_write_bytes(folder / WEIGHTS_FILE, data)
        atomic_write_json(folder / CONFIG_FILE, {**(metadata or {}), **self.describe(),
                                                 "checkpoint_hash": checkpoint_hash})
        return folder


class TrainableMethod(Method):
    """A method with weights learnt on a source dataset by :mod:`nagl.training`.

    The generic loop draws episodes as :meth:`batch_spec` asks, optimises the
    parameters of :meth:`trainable_module` with AdamW on :meth:`loss`, and selects
    the checkpoint. Everything specific to the method (its losses and their
    hyper-parameters, :meth:`training_settings`) stays in the method's module.
    """

    trainable = True

    @abstractmethod
    def batch_spec(self, normal_shots: tuple[int, ...], abnormal_shots: tuple[int, ...]) -> BatchSpec:
        """What an episode holds, for models serving these shot counts."""

    @abstractmethod
    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, image_scores (B,))`` of a batch of episodes; the scores feed the validation AUROC."""

    @abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters are trained and whose state is the checkpoint."""

    def training_settings(self) -> dict[str, Any]:
        """The method's training hyper-parameters, recorded with the checkpoint."""
        return {}

    def parameter_counts(self) -> tuple[int, int]:
        """``(total, trainable)`` parameters of :meth:`trainable_module` (the backbone not included)."""
        params = list(self.trainable_module().parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    # -- hooks of the loop; the defaults are NAGL's training ----------------------------
    def configure_optimisers(self, schedule: Any) -> list[torch.optim.Optimizer]:
        """The optimisers (the loop puts a MultiStepLR of the schedule on each): one AdamW."""
        return [torch.optim.AdamW(self.trainable_module().parameters(), lr=schedule.lr,
                                  weight_decay=schedule.weight_decay)]

    def training_step(self, batch: EpisodeBatch, optimisers: Sequence[torch.optim.Optimizer]) -> float:
        """One optimisation step on ``batch``; returns the loss. Default: :meth:`loss`, backward, step."""
        loss, _ = self.loss(batch)
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for optimiser in optimisers:
            optimiser.step()
        return float(loss.detach())

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each training epoch (1-based) of ``epochs``."""

    def calibrate(self, batches: Sequence[EpisodeBatch]) -> dict[str, Any] | None:
        """Fix post-training constants on SOURCE episodes; called once by the loop after
        checkpoint selection, without autograd, when the batch spec asks for it:

        - ``calibration_images > 0``: each episode's query is a normal TRAINING image, its
          normal references drawn from its category as in training (never itself), no
          abnormal references (ResAD's per-level log-likelihood maxima);
        - ``calibrate_on_validation``: the held-out source validation episodes (normal and
          abnormal queries; nagl-cal's weight of ``s_a``).

        Keep what is fixed in :meth:`state_dict` or the method config; the returned summary
        is recorded in the checkpoint's ``model.json`` under ``calibration``."""
        return None


def checkpoint_files(path: str | Path) -> tuple[Path, Path]:
    """``(weights, model.json)`` of a checkpoint given as its folder or either file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not path.exists():
        raise NaglError(f"checkpoint {path} does not exist; pass the folder written by `nagl train`")
    if not config.is_file():
        raise NaglError(f"checkpoint {folder}: {CONFIG_FILE} is missing; pass the folder written "
                        f"by `nagl train` (it holds {WEIGHTS_FILE} and {CONFIG_FILE})")
    return weights, config


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    _, config = checkpoint_files(path)
    try:
        info = read_json(config)
    except (OSError, ValueError) as error:
        raise NaglError(f"checkpoint config {config} is unreadable: {error}; retrain or restore it") from error
    if not isinstance(info, dict) or "method" not in info or "dim" not in info:
        raise NaglError(f"checkpoint config {config} lacks 'method' and 'dim'; it was not written by nagl")
    return info
