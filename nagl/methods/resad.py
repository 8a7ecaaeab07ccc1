"""ResAD: residual feature learning for class-generalizable anomaly detection (NeurIPS 2024).

The NeurIPS method as ``../shared/spec/resad-method.md`` specifies it (``docs/methods.md``,
section ResAD); per level ``l`` of a feature pyramid (effnet-lite0: stride 4 / 8 / 16):

1. residual ``r(i) = f_q(i) - R_l[nn(i)]`` to the nearest patch of the K normal
   references (``match``: Euclidean ``l2`` as in the paper, or ``cosine``; ``residual``:
   ``diff`` or the code's ``squared``);
2. constraintor ``phi_l`` = Conv 3x3 -> BatchNorm -> ReLU on the residual map;
3. a conditional normalizing flow ``g_l`` (:mod:`nagl.methods.flow`) conditioned on a
   fixed 2-D sin-cos position code; per-dimension log-likelihood ``l_l(i)``;
4. ``N = sum_l upsample(exp(l_l - c_l))`` on the finest grid, patch map ``S = -N``;
   ``c_l`` is fixed on the SOURCE after training (:meth:`ResadMethod.calibrate`) and
   stored in the checkpoint, so a query's score never depends on other queries;
5. image score = max of the pixel map (:meth:`ResadMethod.image_scores`).

Training (source only): constraintor loss (abnormal-invariant one-class), flow maximum
likelihood on the detached constraintor outputs, BG-SPP in stage 2; the flow vectors of
each level are shuffled and used in chunks (the last partial chunk kept), one optimiser
step per chunk, each level with its own optimiser.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nagl.errors import NaglError
from nagl.io import stable_hash
from nagl.methods.base import MaskInput, NormalSide, TrainableMethod
from nagl.methods.flow import ConditionalFlow, sincos_position_code
from nagl.methods.registry import register_method
from nagl.training.batch import BatchSpec, EpisodeBatch
from nagl.training.schedule import Schedule, register_profile

VARIANTS = ("neurips",)
MATCHES = ("l2", "cosine")
RESIDUALS = ("diff", "squared")
OCC_FORMS = ("sqrt-norm", "pseudo-huber")

# Flow vectors per level and training batch (a seeded random subset of the B*G_l), by
# training profile; None (the paper, and any profile not named) uses them all.
FLOW_VECTORS_PER_PROFILE: dict[str, int | None] = {"embedded": 2048, "smoke": 512}

# Query patch rows matched against one reference at a time: a block of (rows x G) scores,
# reused, small enough to stay in cache (a whole bank at once was 4x slower on CPU).
_MATCH_ROWS = 1024


def level_order(levels: dict[str, Sequence[int]]) -> list[str]:
    """Level names finest first (largest grid, then name): the first one's grid is the output grid."""
    return sorted(levels, key=lambda name: (-int(levels[name][0]) * int(levels[name][1]), name))


def nearest_residuals(query: torch.Tensor, bank: torch.Tensor, prefixes: Sequence[int], match: str = "l2",
                      residual: str = "diff") -> dict[int, torch.Tensor]:
    """Residual of every query patch ``(n, G, C)`` to its nearest patch among the first ``p``
    blocks of ``G`` bank rows ``(M, C)`` (one normal reference per block), for each ``p`` of
    ``prefixes``, from one search.

    Each block is searched on its own, the same way whatever the bank's size, and the best
    block is taken over a prefix, so the first ``k`` references of a larger bank give the
    ``k``-shot answer bit for bit (the nested shot settings of one split share one search).
    ``match = l2``: nearest by Euclidean distance; ``cosine``: by cosine similarity.
    ``residual = diff``: ``f - p``; ``squared``: ``(f - p)^2``.
    """
    g, c = query.shape[1], query.shape[-1]
    blocks = -(-bank.shape[0] // g)
    if not prefixes or min(prefixes) < 1 or max(prefixes) > blocks:
        raise NaglError(f"reference counts {list(prefixes)} must lie in 1..{blocks} (the references in the bank)")
    flat = query.reshape(-1, c)
    if match == "l2":  # the nearest p maximises 2 f.p - |p|^2
        rows_of, keys_of, offset = flat, bank, -(bank * bank).sum(dim=1)
    else:
        rows_of, keys_of, offset = F.normalize(flat, dim=-1), F.normalize(bank, dim=-1), None
    used = max(prefixes)
    best = torch.empty((flat.shape[0], used), dtype=flat.dtype)
    where = torch.empty((flat.shape[0], used), dtype=torch.long)
    scratch = torch.empty((min(_MATCH_ROWS, flat.shape[0]), g), dtype=flat.dtype)
    for j in range(used):
        keys = keys_of[j * g:(j + 1) * g].T.contiguous()
        for begin in range(0, flat.shape[0], _MATCH_ROWS):
            rows = rows_of[begin:begin + _MATCH_ROWS]
            block = scratch[:rows.shape[0], :keys.shape[1]]
            if offset is None:
                torch.mm(rows, keys, out=block)
            else:
                torch.addmm(offset[None, j * g:(j + 1) * g], rows, keys, alpha=2.0, out=block)
            value, index = block.max(dim=1)
            best[begin:begin + _MATCH_ROWS, j] = value
            where[begin:begin + _MATCH_ROWS, j] = index + j * g
    _, winner = best.cummax(dim=1)
    out = {}
    for p in prefixes:
        diff = flat - bank[where.gather(1, winner[:, p - 1:p])[:, 0]]
        out[p] = (diff * diff if residual == "squared" else diff).reshape(query.shape)
    return out


def nearest_residual(query: torch.Tensor, bank: torch.Tensor, match: str = "l2",
                     residual: str = "diff") -> torch.Tensor:
    """Residual of every query patch ``(n, G, C)`` to its nearest patch of the whole bank ``(M, C)``."""
    blocks = -(-bank.shape[0] // query.shape[1])
    return nearest_residuals(query, bank, [blocks], match, residual)[blocks]


class Constraintor(nn.Module):
    """``phi_l``: Conv 3x3 (C -> C, padding 1, bias) -> BatchNorm2d -> ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class ResadHead(nn.Module):
    """The trainable part: a constraintor (or none) and a flow per level, and per-level buffers.

    ``calibration`` ``(L,)``: the constants ``c_l``; ``boundary`` ``(L,)``: BG-SPP's running
    normal boundary ``b_n`` (training state).
    """

    def __init__(self, widths: Sequence[int], constraintor: bool, blocks: int, clamp: float,
                 pos_dim: int, seed: int):
        super().__init__()
        self.constraintors = nn.ModuleList(Constraintor(c) if constraintor else nn.Identity() for c in widths)
        self.flows = nn.ModuleList(
            ConditionalFlow(c, pos_dim, blocks, clamp, seed=int(stable_hash([seed, "resad-rotation", level]), 16) % 2**63)
            for level, c in enumerate(widths))
        self.register_buffer("calibration", torch.zeros(len(widths)))
        self.register_buffer("boundary", torch.zeros(len(widths)))


def occ_loss(output: torch.Tensor, residual: torch.Tensor, abnormal: torch.Tensor, form: str) -> torch.Tensor:
    """Constraintor loss of one level: normal patches pulled into a sphere at the origin, abnormal
    patches kept as they are. ``output``, ``residual`` ``(N, C)``; ``abnormal`` ``(N,)`` bool.

    ``sqrt-norm``: ``mean(sqrt(|phi(r)|_2 + 1) - 1)``; ``pseudo-huber``: ``mean(sqrt(|phi(r)|_2^2 + 1) - 1)``.
    Abnormal patches: ``MSE(phi(r), r)`` with ``r`` detached.
    """
    loss = output.new_zeros(())
    normal = output[~abnormal]
    if normal.shape[0]:
        norm = normal.norm(dim=1)
        loss = loss + (torch.sqrt((norm if form == "sqrt-norm" else norm * norm) + 1.0) - 1.0).mean()
    if bool(abnormal.any()):
        loss = loss + F.mse_loss(output[abnormal], residual[abnormal].detach())
    return loss


@register_method
class ResadMethod(TrainableMethod):
    """ResAD behind the :class:`~nagl.methods.base.Method` interface, on a feature pyramid.

    ``levels`` ``{name: [h, w, C]}`` (from :meth:`config_for_backbone`) fixes the grids and
    widths the model is built for; scoring refuses others. ``seed`` sets the initial
    weights and the fixed flow rotations (both are in the checkpoint), not the config.
    """

    name = "resad"
    level_group: ClassVar[str | None] = "pyramid"
    uses_abnormal_refs: ClassVar[bool] = False
    image_scores_need_pixels: ClassVar[bool] = True

    def __init__(self, dim: int, levels: dict[str, Sequence[int]] | None = None, embed_dim: int | None = None,
                 variant: str = "neurips",
                 match: str = "l2", residual: str = "diff", constraintor: bool = True, blocks: int = 10,
                 clamp: float = 1.9, pos_dim: int = 256, k_train: int = 4, stage1_share: float = 0.1,
                 abnormal_query_rate: float = 0.5, mask_size: int = 256, occ: str = "sqrt-norm",
                 chunk: int = 8192, bgspp: bool = True, bg_beta: float = 0.05, bg_tau: float = 0.1,
                 bg_weight: float = 1.0, bg_momentum: float = 0.9, calibration_images: int = 256,
                 seed: int = 0):
        if not levels:
            raise NaglError("resad needs the backbone's pyramid levels: build it with "
                            "create_method('resad', backbone.dim, **ResadMethod.config_for_backbone(backbone)) "
                            "on a backbone with a 'pyramid' level group")
        if embed_dim is not None:
            raise NaglError(f"resad reads no image embedding, got embed_dim={embed_dim}")
        levels = {str(k): [int(v) for v in shape] for k, shape in levels.items()}
        for name, shape in levels.items():
            if len(shape) != 3 or min(shape) < 1:
                raise NaglError(f"resad: level {name!r} has shape {shape}; expected [h, w, C] with positive sizes")
        choices = {"variant": (variant, VARIANTS), "match": (match, MATCHES), "residual": (residual, RESIDUALS),
                   "occ": (occ, OCC_FORMS)}
        for setting, (value, allowed) in choices.items():
            if value not in allowed:
                raise NaglError(f"resad: {setting} must be one of {', '.join(allowed)}, got {value!r}")
        for setting, value in (("blocks", blocks), ("k_train", k_train), ("chunk", chunk),
                               ("calibration_images", calibration_images), ("mask_size", mask_size)):
            if int(value) < 1:
                raise NaglError(f"resad: {setting} must be >= 1, got {value}")
        if int(pos_dim) < 4 or int(pos_dim) % 4:
            raise NaglError(f"resad: pos_dim must be a positive multiple of 4, got {pos_dim}")
        super().__init__(dim, levels=levels, variant=variant, match=match, residual=residual,
                         constraintor=bool(constraintor), blocks=int(blocks), clamp=float(clamp),
                         pos_dim=int(pos_dim), k_train=int(k_train), stage1_share=float(stage1_share),
                         abnormal_query_rate=float(abnormal_query_rate), mask_size=int(mask_size), occ=occ,
                         chunk=int(chunk), bgspp=bool(bgspp), bg_beta=float(bg_beta), bg_tau=float(bg_tau),
                         bg_weight=float(bg_weight), bg_momentum=float(bg_momentum),
                         calibration_images=int(calibration_images))
        self.levels = level_order(levels)
        self.grids = {name: (levels[name][0], levels[name][1]) for name in self.levels}
        self.widths = {name: levels[name][2] for name in self.levels}
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = ResadHead([self.widths[n] for n in self.levels], bool(constraintor), int(blocks),
                                  float(clamp), int(pos_dim), self.seed)
        self.head.eval()
        self.codes = {name: sincos_position_code(self.grids[name], int(pos_dim)) for name in self.levels}
        self.stage = 2
        self.epochs = 0  # of the schedule being trained (configure_optimisers)
        self.flow_vectors: int | None = None
        self._shuffle = torch.Generator().manual_seed(int(stable_hash([self.seed, "resad-shuffle"]), 16) % 2**63)

    # -- shapes ------------------------------------------------------------------------
    @property
    def output_grid(self) -> tuple[int, int]:
        return self.grids[self.levels[0]]

    def _check(self, features: dict[str, torch.Tensor] | None, what: str,
               grid: dict[str, Sequence[int]] | None = None) -> None:
        if features is None:
            return
        if not isinstance(features, dict):
            raise NaglError(f"resad: {what} features must be a dict {{level: (n, G, C)}} of the levels "
                            f"{', '.join(self.levels)}; got {type(features).__name__}")
        missing = [n for n in self.levels if n not in features]
        if missing:
            raise NaglError(f"resad: {what} features lack the level(s) {', '.join(missing)} this model was "
                            f"trained for; use the backbone the checkpoint was trained with")
        for name in self.levels:
            (h, w), c = self.grids[name], self.widths[name]
            given = tuple(grid[name]) if grid is not None and name in grid else None
            if given is not None and given != (h, w):
                raise NaglError(f"resad: level {name} has grid {given[0]}x{given[1]}, this model was trained "
                                f"for {h}x{w}; use the backbone and image size it was trained with")
            shape = tuple(features[name].shape)
            if len(shape) != 3 or shape[1] != h * w or shape[2] != c:
                raise NaglError(f"resad: {what} features of level {name} have shape {shape}; this model "
                                f"expects (n, {h * w}, {c}) (grid {h}x{w}, width {c}); use the backbone "
                                f"and image size it was trained with")

    # -- the forward pass --------------------------------------------------------------
    def _residuals(self, query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        return nearest_residual(query.float(), bank.float(), self.config["match"], self.config["residual"])

    def normal_side(self, query: dict[str, torch.Tensor], normal: dict[str, torch.Tensor],
                    shots: Sequence[int]) -> dict[int, NormalSide]:
        """Each level's query residuals to the first ``k`` normal references, for each ``k`` of
        ``shots``, from one search of the largest bank (:func:`nearest_residuals`): all of ResAD's
        work that depends on the references. ``NormalSide.residual`` is ``{level: (Q, G_l, C_l)}``."""
        self._check(query, "query")
        self._check(normal, "normal")
        per_level = {name: nearest_residuals(query[name].float(),
                                             normal[name][:max(shots)].reshape(-1, self.widths[name]).float(),
                                             shots, self.config["match"], self.config["residual"])
                     for name in self.levels}
        return {k: NormalSide(residual={name: per_level[name][k] for name in self.levels}) for k in shots}

    def _constrained(self, level: int, residual: torch.Tensor) -> torch.Tensor:
        """``phi_l`` of residuals ``(B, G, C)`` -> ``(B, G, C)``."""
        name = self.levels[level]
        (h, w), b = self.grids[name], residual.shape[0]
        maps = residual.transpose(1, 2).reshape(b, -1, h, w)
        return self.head.constraintors[level](maps).reshape(b, -1, h * w).transpose(1, 2)

    def _log_likelihood(self, level: int, vectors: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Per-dimension log-likelihoods ``(N,)``; ``positions`` None: whole maps of the level's grid."""
        return self.head.flows[level].log_likelihood(vectors, self.codes[self.levels[level]], positions)

    def _normality(self, likelihoods: Sequence[torch.Tensor]) -> torch.Tensor:
        """``N = sum_l upsample(exp(l_l - c_l))`` ``(B, h, w)`` on the finest grid from per-level ``(B, G_l)``."""
        total = None
        for level, ll in enumerate(likelihoods):
            h, w = self.grids[self.levels[level]]
            n = torch.exp((ll - self.head.calibration[level]).clamp(max=50.0)).reshape(-1, 1, h, w)
            n = F.interpolate(n, size=self.output_grid, mode="bilinear", align_corners=False)[:, 0]
            total = n if total is None else total + n
        return total

    def _level_likelihoods(self, residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per level ``(B, G_l)`` log-likelihoods of residual maps (no autograd bookkeeping needed),
        one map at a time: a map's coupling-block activations (4,096 x 536 floats at the finest
        effnet-lite0 level) stay in cache, twice as fast on CPU as 8 maps at once, and no block
        is large enough for the allocator to map and unmap it on every call."""
        out = []
        for level, residual in enumerate(residuals):
            b, g, c = residual.shape
            rows = [self._log_likelihood(level, self._constrained(level, residual[i:i + 1]).reshape(g, c), None)
                    for i in range(b)]
            out.append(torch.stack(rows) if rows else residual.new_zeros((0, g)))
        return out

    @torch.no_grad()
    def score(self, query: dict[str, torch.Tensor], normal: dict[str, torch.Tensor] | None = None,
              abnormal: dict[str, torch.Tensor] | None = None, abnormal_masks: MaskInput = None,
              grid: dict[str, Sequence[int]] | None = None, *, category: str | None = None,
              chunk: int = 8, normal_side: NormalSide | None = None) -> torch.Tensor:
        """Patch maps ``S = -N`` ``(Q, h, w)`` on the finest level's grid. Abnormal references are not used.

        ``normal_side``: these queries' residuals from :meth:`normal_side` (else they are computed
        ``chunk`` queries at a time)."""
        self._check(query, "query", grid)
        self._check(normal, "normal", grid)
        if normal is None or normal[self.levels[0]].shape[0] == 0:
            raise NaglError("resad needs at least one normal reference image (k_normal >= 1)")
        self.head.eval()
        banks = [normal[name].reshape(-1, self.widths[name]) for name in self.levels]
        count = query[self.levels[0]].shape[0]
        maps = []
        for begin in range(0, count, chunk):
            if normal_side is None:
                residuals = [self._residuals(query[name][begin:begin + chunk], bank)
                             for name, bank in zip(self.levels, banks, strict=True)]
            else:
                residuals = [normal_side.residual[name][begin:begin + chunk] for name in self.levels]
            maps.append(-self._normality(self._level_likelihoods(residuals)))
        return torch.cat(maps) if maps else query[self.levels[0]].new_zeros((0, *self.output_grid))

    def image_scores(self, patch_maps: torch.Tensor, pixel_maps: torch.Tensor) -> torch.Tensor:
        """Image score = max of the pixel map (the shared upsampled, blurred ``S``)."""
        return pixel_maps.reshape(pixel_maps.shape[0], -1).amax(dim=1)

    # -- checkpoint --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights, the fixed rotations, BatchNorm statistics, ``c_l`` and BG-SPP's boundary."""
        return self.head.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.head.state_dict()
        wrong = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
        extra = sorted(set(state) - set(expected))
        if wrong or extra:
            shapes = ", ".join(f"{n} {self.grids[n][0]}x{self.grids[n][1]}x{self.widths[n]}" for n in self.levels)
            raise NaglError(f"resad checkpoint does not fit a model with levels {shapes}: "
                            f"{len(wrong)} tensors missing or of another shape ({wrong[:2]}), "
                            f"{len(extra)} unexpected ({extra[:2]})")
        self.head.load_state_dict(state)

    # -- training (the contract of TrainableMethod) -------------------------------------
    def trainable_module(self) -> nn.Module:
        return self.head

    def stage1_epochs(self, epochs: int) -> int:
        """Epochs of stage 1 (normal queries only, no BG-SPP): the first ``stage1_share`` of them."""
        return int(round(self.config["stage1_share"] * epochs))

    def batch_spec(self, normal_shots: tuple[int, ...], abnormal_shots: tuple[int, ...]) -> BatchSpec:
        """``k_train`` normal references per query (never the query itself; the shot counts of the
        schedule are not used), no abnormal reference, query masks (downsampled by nearest to
        each grid), stage 1 = normal queries only, ``c_l`` fixed on ``calibration_images`` normal
        training images. The stage-1 epochs come from the schedule given to
        :meth:`configure_optimisers` (the loop calls it first)."""
        return BatchSpec((self.config["k_train"],), (0,), mask_size=self.config["mask_size"],
                         abnormal_query_rate=self.config["abnormal_query_rate"], level_group=self.level_group,
                         normal_only_epochs=self.stage1_epochs(self.epochs),
                         calibration_images=self.config["calibration_images"])

    def training_settings(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.config.items() if k != "levels"}, "flow_vectors": self.flow_vectors,
                "optimiser": "adam"}

    def configure_optimisers(self, schedule: Any) -> list[torch.optim.Optimizer]:
        """Adam for the constraintors and one Adam per level's flow, so a step on one level never
        moves another level's flow. The profile fixes the flow vectors used per level and batch."""
        self.flow_vectors = FLOW_VECTORS_PER_PROFILE.get(schedule.profile)
        self.epochs = int(schedule.epochs)

        def adam(module: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam(module.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)

        return [adam(self.head.constraintors), *(adam(flow) for flow in self.head.flows)]

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Stage 1 (no BG-SPP) for the first ``stage1_share`` of the epochs (1-based), then stage 2."""
        self.stage = 1 if epoch <= self.stage1_epochs(epochs) else 2

    def _batch_residuals(self, batch: EpisodeBatch) -> list[torch.Tensor]:
        """Per level ``(B, G_l, C_l)``: each query's residual to its own references."""
        queries = batch.query_levels()
        references = [batch.normal_levels(i) for i in range(len(batch))]
        out = []
        for name in self.levels:
            out.append(torch.stack([self._residuals(queries[name][i:i + 1], references[i][name].reshape(
                -1, self.widths[name]))[0] for i in range(len(batch))]))
        return out

    def _level_masks(self, batch: EpisodeBatch) -> list[torch.Tensor]:
        """Query masks downsampled by nearest to each level's grid, ``(B, G_l)`` bool."""
        masks = batch.query_masks().float()[:, None]
        return [F.interpolate(masks, size=self.grids[name], mode="nearest")[:, 0].reshape(len(batch), -1) > 0.5
                for name in self.levels]

    def _flow_loss(self, ll: torch.Tensor, abnormal: torch.Tensor, level: int, stage: int,
                   update: bool) -> torch.Tensor | None:
        """ML on normal vectors (``-log sigmoid(l)``), plus BG-SPP in stage 2; None if the chunk has no term."""
        settings = self.config
        normal = ll[~abnormal]
        terms = []
        if normal.shape[0]:
            terms.append(-F.logsigmoid(normal).mean())
        if stage == 2 and settings["bgspp"]:
            boundary = self.head.boundary[level]
            if update and normal.shape[0]:
                quantile = torch.quantile(normal.detach(), settings["bg_beta"])
                boundary = settings["bg_momentum"] * boundary + (1 - settings["bg_momentum"]) * quantile
                self.head.boundary[level] = boundary
            abnormal_boundary = boundary - settings["bg_tau"]
            low = normal[normal <= boundary]
            high = ll[abnormal][ll[abnormal] >= abnormal_boundary]
            bg = ll.new_zeros(())
            if low.shape[0]:
                bg = bg - F.logsigmoid(low - boundary).mean()
            if high.shape[0]:
                bg = bg - F.logsigmoid(abnormal_boundary - high).mean()
            if low.shape[0] or high.shape[0]:
                terms.append(settings["bg_weight"] * bg)
        return sum(terms) if terms else None

    def training_step(self, batch: EpisodeBatch, optimisers: Sequence[torch.optim.Optimizer]) -> float:
        """One batch: a constraintor step on the OCC loss of all levels, then per level the flow
        vectors (detached constraintor outputs) shuffled and used in chunks of at most ``chunk``,
        the last partial chunk kept, one step of that level's optimiser per chunk."""
        constraintor_opt, *flow_opts = optimisers
        self.head.train()
        with torch.no_grad():
            residuals = self._batch_residuals(batch)
        masks = self._level_masks(batch)
        outputs, occ = [], None
        for level, residual in enumerate(residuals):
            out = self._constrained(level, residual)
            outputs.append(out)
            if self.config["constraintor"]:
                b, g, c = out.shape
                part = occ_loss(out.reshape(b * g, c), residual.reshape(b * g, c), masks[level].reshape(-1),
                                self.config["occ"])
                occ = part if occ is None else occ + part
        total = 0.0
        if occ is not None:
            constraintor_opt.zero_grad(set_to_none=True)
            occ.backward()
            constraintor_opt.step()
            total += float(occ.detach())
        for level, out in enumerate(outputs):
            b, g, c = out.shape
            vectors = out.detach().reshape(b * g, c)
            positions = torch.arange(g).repeat(b)
            abnormal = masks[level].reshape(-1)
            order = torch.randperm(b * g, generator=self._shuffle)
            if self.flow_vectors is not None:
                order = order[: self.flow_vectors]
            losses = []
            for part in order.split(self.config["chunk"]):
                ll = self._log_likelihood(level, vectors[part], positions[part])
                loss = self._flow_loss(ll, abnormal[part], level, self.stage, update=True)
                if loss is None:
                    continue
                flow_opts[level].zero_grad(set_to_none=True)
                loss.backward()
                flow_opts[level].step()
                losses.append(float(loss.detach()))
            total += sum(losses) / max(1, len(losses))
        return total

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation: OCC + maximum-likelihood loss of all levels (no BG-SPP, so the value is comparable
        between the stages) over every vector, and the image scores (max of ``S`` on the patch grid)."""
        residuals = self._batch_residuals(batch)
        masks = self._level_masks(batch)
        total = residuals[0].new_zeros(())
        likelihoods = []
        for level, residual in enumerate(residuals):
            b, g, c = residual.shape
            out = self._constrained(level, residual)
            if self.config["constraintor"]:
                total = total + occ_loss(out.reshape(b * g, c), residual.reshape(b * g, c),
                                         masks[level].reshape(-1), self.config["occ"])
            ll = self._log_likelihood(level, out.reshape(b * g, c), None)
            flow = self._flow_loss(ll, masks[level].reshape(-1), level, stage=1, update=False)
            if flow is not None:
                total = total + flow
            likelihoods.append(ll.reshape(b, g))
        scores = -self._normality(likelihoods)
        return total, scores.reshape(len(batch), -1).amax(dim=1).detach()

    @torch.no_grad()
    def calibrate(self, batches: Iterable[EpisodeBatch]) -> dict[str, list[float]]:
        """Fix ``c_l`` = max of ``l_l`` over every patch of the given (normal, SOURCE) queries,
        each matched against its own references; stored in the checkpoint. Returns the constants."""
        self.head.eval()
        best = [-math.inf] * len(self.levels)
        for batch in batches:
            for level, ll in enumerate(self._level_likelihoods(self._batch_residuals(batch))):
                best[level] = max(best[level], float(ll.max()))
        if any(math.isinf(b) for b in best):
            raise NaglError("resad: no source image to fix the normalisation constants c_l on")
        self.head.calibration.copy_(torch.tensor(best))
        return {"c_l": best}


# The code's schedule (Adam, lr 1e-5, weight decay 5e-4, 100 epochs, lr x0.1 at 70 and 90,
# batches of 32); an epoch is 50 batches here (the loop is episodic; the code's epoch is one
# pass over its training images).
register_profile("resad", "paper", Schedule(profile="paper", epochs=100, episodes=1600, batch=32, lr=1e-5,
                                            weight_decay=5e-4, milestones=(70, 90), select="last"))
# Chosen on held-out images of each embedded source (benchmarks/resad_profile.py; docs/methods.md, ResAD).
register_profile("resad", "embedded", Schedule(profile="embedded", epochs=20, episodes=16, batch=8, lr=1e-3,
                                               weight_decay=5e-4, milestones=(16,), select="last"))
