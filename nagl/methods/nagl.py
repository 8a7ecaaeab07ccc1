"""NAGL: Normal-Abnormal Guided generalist anomaly detection (NeurIPS 2025).

Forward pass (``../shared/spec/nagl-method.md``, ``docs/methods.md``):

1. ``s_n(i)`` = max ``sim`` of query patch ``i`` over the normal bank;
2. abnormal-reference masks max-pooled to the grid (pseudo-mask where unusable);
3. residuals against the cosine nearest normal patch: ``r_A``, ``r_q``;
4. Residual Mining: ``P`` learnable proxies cross-attend to the abnormal patches
   (keys ``F_A + pos``, values ``r_A``), then self-attend -> ``R_p``;
5. Anomaly Feature Learning: ``R_p`` cross-attends to the query (keys ``r_q + pos``,
   values ``F_q``), then self-attends -> ``Q_a``;
6. ``s_a(i)`` = mean over proxies of ``sim(F_q(i), Q_a(m))``;
7. ``S = (s_a + 1 - s_n) / 2``; with no abnormal reference ``S = 1 - s_n``.

Training (the loop is :mod:`nagl.training`; the loss is here): episodes with
masked abnormal references and a query that is abnormal with probability 1/2.
Losses, each with weight 1: cross-entropy of ``[1 - t, t]`` against the label,
``t`` = mean of the top-k patch scores (k = 20 at 32x32, scaled with the grid);
focal loss (alpha 0.25, gamma 2) and dice loss of the two-channel map
``[s_n, s_a]``, upsampled to the mask size, against ``[1 - mask, mask]``. Their
form is the option ``loss_form``: ``paper`` (default; softmax cross-entropy of the
logits ``[1 - t, t]``, sigmoid focal loss on the maps as logits, dice on the channel
softmax summed over channels) or ``embedded`` (the former forms; see
:func:`image_loss`, :func:`pixel_loss`).

Initialisation as the reference: proxies N(0, 1), attention projections
xavier-uniform with zero biases (:meth:`AttentionLayer.reset_parameters`).

Every attention layer is multi-head attention without dropout, a residual
connection and a LayerNorm after it; no feed-forward block. The head count is the
largest number <= ``heads`` (4) that divides the feature width C.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nagl.errors import NaglError
from nagl.methods.base import (
    MaskInput,
    NormalSide,
    References,
    TrainableMethod,
    infer_grid,
    nearest_normal,
    nested_normal_side,
    normal_scores,
    pool_masks,
    prepare_references,
    similarity,
    top_k_count,
    top_k_mean,
)
from nagl.methods.registry import register_method
from nagl.training.batch import BatchSpec, EpisodeBatch


def head_count(dim: int, max_heads: int = 4) -> int:
    """Largest head count <= ``max_heads`` that divides ``dim`` (1 always does)."""
    return next(h for h in range(max(1, max_heads), 0, -1) if dim % h == 0)


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    pairs = max(1, (dim + 1) // 2)
    freq = 1.0 / (10000.0 ** (torch.arange(pairs, dtype=torch.float32) / pairs))
    angles = positions.float()[:, None] * freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :dim]


def position_encoding(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sinusoidal encoding ``(h*w, dim)`` in raster order (row-major), like the
    backbone's patches: the first ``dim // 2`` channels encode the row, the rest the column."""
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([_sincos_1d(rows, dim // 2), _sincos_1d(cols, dim - dim // 2)], dim=1)


class AttentionLayer(nn.Module):
    """Multi-head attention (no dropout) + residual + LayerNorm after it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide width {dim}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of PyTorch's multi-head attention, which the reference uses: one
        xavier-uniform draw over the stacked ``(3C, C)`` query/key/value projection, zero biases;
        the output projection keeps ``nn.Linear``'s weight init with a zero bias."""
        stacked = torch.empty(3 * self.q.weight.shape[0], self.q.weight.shape[1])
        nn.init.xavier_uniform_(stacked)
        with torch.no_grad():
            for layer, weight in zip((self.q, self.k, self.v), stacked.chunk(3), strict=True):
                layer.weight.copy_(weight)
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, Lq, C)`` attends to ``keys``/``values`` ``(B, Lk, C)``.

        ``allowed`` ``(B, Lk)`` bool: the keys each batch item may attend to. It is
        laid out batch-major and broadcast over heads and queries explicitly, so item
        ``b`` only ever sees its own mask.
        """
        b, lq, c = x.shape
        lk = keys.shape[1]
        d = c // self.heads

        def split(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.reshape(b, length, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x), lq), split(self.k(keys), lk), split(self.v(values), lk)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, heads, Lq, Lk)
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
        attended = logits.softmax(dim=-1) @ v
        attended = attended.transpose(1, 2).reshape(b, lq, c)
        return self.norm(x + self.out(attended))


class NaglHead(nn.Module):
    """The trainable part: ``P`` proxies, Residual Mining and Anomaly Feature Learning."""

    def __init__(self, dim: int, proxies: int = 25, heads: int = 4):
        super().__init__()
        self.dim = dim
        self.heads = head_count(dim, heads)
        self.proxies = nn.Parameter(torch.randn(proxies, dim))  # N(0, 1), as the reference
        self.rm_cross = AttentionLayer(dim, self.heads)
        self.rm_self = AttentionLayer(dim, self.heads)
        self.afl_cross = AttentionLayer(dim, self.heads)
        self.afl_self = AttentionLayer(dim, self.heads)

    def residual_proxies(self, keys: torch.Tensor, values: torch.Tensor,
                         allowed: torch.Tensor) -> torch.Tensor:
        """Residual Mining: ``keys`` (``F_A + pos``), ``values`` (``r_A``) ``(B, L, C)``,
        ``allowed`` ``(B, L)`` -> ``R_p`` ``(B, P, C)``."""
        x = self.proxies[None].expand(keys.shape[0], -1, -1)
        x = self.rm_cross(x, keys, values, allowed)
        return self.rm_self(x, x, x)

    def anomaly_proxies(self, residual_proxies: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
        """Anomaly Feature Learning: ``R_p`` ``(B, P, C)`` attends to the query (keys
        ``r_q + pos``, values ``F_q``) -> ``Q_a`` ``(B, P, C)``."""
        x = self.afl_cross(residual_proxies, keys, values)
        return self.afl_self(x, x, x)


def _abnormal_tokens(refs: References, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``F_A + pos``, values ``r_A`` and the allowed mask of all abnormal references
    concatenated, ``(k2*G, C)``; the encoding is repeated per reference in key order."""
    k2, g, c = refs.abnormal.shape
    flat = refs.abnormal.reshape(k2 * g, c)
    _, residual = nearest_normal(flat, refs.bank)
    keys = flat + pos.repeat(k2, 1)
    return keys, residual, refs.patch_mask.reshape(k2 * g)


def abnormal_guided(query: torch.Tensor, anomaly: torch.Tensor) -> torch.Tensor:
    """``s_a`` ``(B, G)``: mean over the proxies ``(B, P, C)`` of ``sim`` with each query patch."""
    cos = F.normalize(query, dim=-1) @ F.normalize(anomaly, dim=-1).transpose(1, 2)
    return similarity(cos).mean(dim=-1)


@dataclass(frozen=True)
class NaglLoss:
    """NAGL's training hyper-parameters (recorded with every checkpoint)."""

    top_k: float = 20.0  # patches at a 32x32 grid; scaled with the grid
    mask_size: int = 256
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


LOSS_FORMS = ("paper", "embedded")


def focal_loss(prob: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Focal loss on probability maps, averaged over every element (the ``embedded`` form:
    NAGL's maps are already in [0, 1] and are taken as probabilities)."""
    prob = prob.clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    alpha_t = torch.where(target > 0.5, torch.full_like(prob, alpha), torch.full_like(prob, 1 - alpha))
    return (-alpha_t * (1 - p_t) ** gamma * p_t.log()).mean()


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (the paper's form), averaged over every element: with
    ``p = sigmoid(logits)``, ``-alpha_t (1 - p_t)^gamma log p_t``; ``alpha_t`` is ``alpha`` on
    positive targets and ``1 - alpha`` on negative ones."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = logits.sigmoid()
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              channels: str = "mean") -> torch.Tensor:
    """``1 - dice`` per sample and channel of ``(B, K, H, W)`` maps, averaged over the batch,
    then averaged (``channels="mean"``) or summed (``"sum"``) over the ``K`` channels."""
    inter = (prob * target).sum(dim=(2, 3))
    total = prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
    per_channel = (1 - (2 * inter + eps) / (total + eps)).mean(dim=0)
    return per_channel.sum() if channels == "sum" else per_channel.mean()


def image_loss(t: torch.Tensor, labels: torch.Tensor, form: str) -> torch.Tensor:
    """Image loss of the image scores ``t`` ``(B,)`` in [0, 1]: ``paper``, cross-entropy of the
    two-class softmax of the logits ``[1 - t, t]``; ``embedded``, binary cross-entropy of ``t``."""
    if form == "paper":
        return F.cross_entropy(torch.stack([1 - t, t], dim=1), labels.long())
    return F.binary_cross_entropy(t.clamp(1e-6, 1 - 1e-6), labels)


def pixel_loss(maps: torch.Tensor, target: torch.Tensor, form: str, alpha: float, gamma: float) -> torch.Tensor:
    """Focal + dice loss of the two-channel map ``[s_n, s_a]`` ``(B, 2, S, S)`` against ``[1 - mask, mask]``.

    ``paper``: sigmoid focal loss on the maps taken as logits, plus dice on their softmax over
    the two channels, summed over the channels. ``embedded``: focal loss on the maps taken as
    probabilities, plus dice on the maps, averaged over the channels.
    """
    if form == "paper":
        return (sigmoid_focal_loss(maps, target, alpha, gamma)
                + dice_loss(maps.softmax(dim=1), target, channels="sum"))
    maps = maps.clamp(0, 1)
    return focal_loss(maps, target, alpha, gamma) + dice_loss(maps, target)


@register_method
class NaglMethod(TrainableMethod):
    """NAGL behind the :class:`~nagl.methods.base.Method` interface.

    ``seed`` only sets the initial weights (training overwrites them, a checkpoint
    replaces them); it is not part of the method's config.
    """

    name = "nagl"
    loss_settings = NaglLoss()

    def __init__(self, dim: int, proxies: int = 25, heads: int = 4, seed: int = 0, loss_form: str = "paper"):
        super().__init__(dim, proxies=int(proxies), heads=int(heads), loss_form=str(loss_form))
        if int(proxies) < 1:
            raise NaglError(f"{self.name}: proxies must be >= 1, got {proxies}")
        if loss_form not in LOSS_FORMS:
            raise NaglError(f"{self.name}: loss_form must be one of {', '.join(LOSS_FORMS)}, got {loss_form!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = NaglHead(self.dim, int(proxies), int(heads))
        self.head.eval()
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    def position(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._pos:
            self._pos[grid] = position_encoding(grid, self.dim)
        return self._pos[grid]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    # -- training (the contract of TrainableMethod) -----------------------------------
    def batch_spec(self, normal_shots: tuple[int, ...], abnormal_shots: tuple[int, ...]) -> BatchSpec:
        return BatchSpec(normal_shots, abnormal_shots, mask_size=self.loss_settings.mask_size,
                         abnormal_query_rate=0.5)

    def trainable_module(self) -> nn.Module:
        return self.head

    def training_settings(self) -> dict[str, Any]:
        return {**asdict(self.loss_settings), **self.config}

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Image cross-entropy + focal + dice of a batch, and the image scores ``t`` ``(B,)``."""
        settings = self.loss_settings
        grid = batch.grid
        form = self.config["loss_form"]
        s_n, s_a = self.batch_maps(batch)
        S = (s_a + 1 - s_n) / 2
        t = top_k_mean(S, top_k_count(S.shape[1], settings.top_k))
        image = image_loss(t, batch.labels(), form)
        h, w = grid
        maps = torch.stack([s_n, s_a], dim=1).reshape(len(batch), 2, h, w)
        maps = F.interpolate(maps, size=(settings.mask_size, settings.mask_size), mode="bilinear",
                             align_corners=False)
        mask = batch.query_masks().float()[:, None]
        target = torch.cat([1 - mask, mask], dim=1)
        pixel = pixel_loss(maps, target, form, settings.focal_alpha, settings.focal_gamma)
        return image + pixel, t.detach()

    def batch_maps(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_n, s_a)`` ``(B, G)`` of a batch of training or validation episodes."""
        grid = batch.grid
        references = [prepare_references(batch.normal(i), batch.abnormal(i), None, grid,
                                          patch_masks=pool_masks(batch.abnormal_masks(i), grid))
                      for i in range(len(batch))]
        return self.episode_maps(batch.queries(), references, grid)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.head.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise NaglError(f"nagl checkpoint does not fit a head of width {self.dim}: "
                            f"tensors {sorted(state)[:3]}... with other names or shapes")
        self.head.load_state_dict(state)

    def _check(self, features: torch.Tensor | None, what: str) -> None:
        if features is not None and features.shape[0] and features.shape[-1] != self.dim:
            raise NaglError(f"nagl: {what} features have width {features.shape[-1]}, this model "
                            f"expects {self.dim}; use the backbone the checkpoint was trained with")

    def episode_maps(self, query: torch.Tensor, references: Sequence[References],
                     grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(s_n, s_a)`` of ``B`` queries ``(B, G, C)``, each with its own references.

        ``s_a`` is None when no query has abnormal references. Items with different
        numbers of abnormal patches are padded and the padding masked out, so the
        batch gives the same maps as its items one by one.
        """
        pos = self.position(grid)
        s_n, r_q = [], []
        for q, refs in zip(query, references, strict=False):
            s, r = nearest_normal(q, refs.bank)
            s_n.append(s)
            r_q.append(r)
        s_n_t = torch.stack(s_n)
        if any(refs.k_abnormal == 0 for refs in references):
            if all(refs.k_abnormal == 0 for refs in references):
                return s_n_t, None
            raise NaglError("nagl: a batch mixes items with and without abnormal references")
        tokens = [_abnormal_tokens(refs, pos) for refs in references]
        length = max(t[0].shape[0] for t in tokens)
        keys = query.new_zeros((len(tokens), length, self.dim))
        values = torch.zeros_like(keys)
        allowed = torch.zeros((len(tokens), length), dtype=torch.bool)
        for b, (k, v, a) in enumerate(tokens):
            keys[b, : k.shape[0]], values[b, : v.shape[0]], allowed[b, : a.shape[0]] = k, v, a
        proxies = self.head.residual_proxies(keys, values, allowed)
        anomaly = self.head.anomaly_proxies(proxies, torch.stack(r_q) + pos, query)
        return s_n_t, abnormal_guided(query, anomaly)

    def normal_side(self, query: torch.Tensor, normal: torch.Tensor, shots: Sequence[int]) -> dict[int, NormalSide]:
        """``s_n`` and the query residuals ``r_Q`` for each k_normal of ``shots``, from one search."""
        self._check(query, "query")
        self._check(normal, "normal")
        return nested_normal_side(query.float(), normal, shots, residual=True)

    @torch.no_grad()
    def score(self, query: torch.Tensor, normal: torch.Tensor | None = None,
              abnormal: torch.Tensor | None = None, abnormal_masks: MaskInput = None,
              grid: tuple[int, int] | None = None, chunk: int = 8,
              normal_side: NormalSide | None = None) -> torch.Tensor:
        query = query.float()
        for features, what in ((query, "query"), (normal, "normal"), (abnormal, "abnormal")):
            self._check(features, what)
        h, w = grid = infer_grid(query.shape[1], grid)
        refs = prepare_references(normal, abnormal, abnormal_masks, grid)
        if normal_side is None:
            normal_side = self._normal_side(query, normal, refs, chunk)
        if refs.k_abnormal == 0:
            return (1.0 - normal_side.s_n).reshape(-1, h, w)
        self.head.eval()
        pos = self.position(grid)
        keys, values, allowed = _abnormal_tokens(refs, pos)
        proxies = self.head.residual_proxies(keys[None], values[None], allowed[None])
        s_a = []
        for begin in range(0, query.shape[0], chunk):
            part, r_q = query[begin:begin + chunk], normal_side.residual[begin:begin + chunk]
            anomaly = self.head.anomaly_proxies(proxies.expand(part.shape[0], -1, -1), r_q + pos, part)
            s_a.append(abnormal_guided(part, anomaly))
        return self.merge(normal_side.s_n, torch.cat(s_a)).reshape(-1, h, w)

    def _normal_side(self, query: torch.Tensor, normal: torch.Tensor | None, refs: References,
                     chunk: int) -> NormalSide:
        """The queries' :class:`NormalSide` against ``refs.bank`` (residuals only when abnormal
        references will need them)."""
        k1 = 0 if normal is None else normal.shape[0]
        if k1:
            return nested_normal_side(query, normal, [k1], chunk, residual=refs.k_abnormal > 0)[k1]
        # No normal reference: the bank is the unmasked patches of the abnormal references.
        _, r_q = nearest_normal(query, refs.bank)
        return NormalSide(normal_scores(query, refs.bank, chunk), r_q)

    def merge(self, s_n: torch.Tensor, s_a: torch.Tensor) -> torch.Tensor:
        """The merged map ``S = (s_a + 1 - s_n) / 2`` from the two guided maps."""
        return (s_a + 1.0 - s_n) / 2.0
