"""InCTRL: in-context residual learning (CVPR 2024), from ``../shared/spec/inctrl-method.md``.

A query is compared with ``K`` normal images of its category ("prompts"); no abnormal
reference is used. Per query (``L`` patch levels of one grid of ``G`` patches, image
embedding ``e`` of width ``D``):

1. patch residual ``d_l(i) = min_p (1 - cos(F_q^l(i), p)) / 2`` over all ``K * G`` prompt
   patches of level ``l``; ``M = mean_l d_l``; ``s_p = max_i M(i)``;
2. image residual ``r = mean_k psi(e_Pk) - psi(e_q)``, ``s_i = sigmoid(eta(r))``;
3. text prior ``s_t`` (:mod:`nagl.methods.text_prior`; 0 when the backbone has no text tower);
4. holistic score ``s_h = sigmoid(phi(M + s_i + s_t))``, ``phi`` reading the ``G`` values of the
   map, so a model is tied to its grid;
5. image score ``s = (s_h + s_p) / 2``.

The pixel map is ``M`` (our addition: the paper scores images only). Training on the
source: 8 normal + 8 anomalous queries per step, prompts from the query's own category
(never the query), loss ``FL(s, y) + FL(s_i, y)`` with a binary focal loss on
probabilities. Only ``psi``, ``eta`` and ``phi`` train; every query is scored on its own
(BatchNorm in eval mode at test time), so a batch gives its items' scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from nagl.errors import NaglError
from nagl.methods.base import MaskInput, TrainableMethod, normal_scores
from nagl.methods.registry import register_method
from nagl.methods.text_prior import NO_TEXT_ENCODER, PROMPT_SETS, TextEncoder, TextPrior, load_text_encoder, text_tower_status
from nagl.training.batch import BatchSpec, EpisodeBatch
from nagl.training.schedule import Schedule, register_profile

EMBED = "embed"
FOCAL_INPUTS = ("probability", "logit")
PIXEL_MAP = "patch residual M (our addition; the paper scores images only)"

Levels = Mapping[str, torch.Tensor]


def binary_focal_loss(score: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
                      focal_input: str = "probability") -> torch.Tensor:
    """Mean binary focal loss ``-alpha (1 - p_t)^gamma log p_t`` of scores ``(B,)`` against 0/1 targets.

    ``focal_input = "probability"``: the scores are probabilities (InCTRL's are).
    ``"logit"`` passes them through a sigmoid first, which reproduces the public code's
    defect (a second sigmoid on scores already in [0, 1]); for comparisons only.
    """
    if focal_input not in FOCAL_INPUTS:
        raise NaglError(f"inctrl: focal_input must be one of {', '.join(FOCAL_INPUTS)}, got {focal_input!r}")
    prob = torch.sigmoid(score) if focal_input == "logit" else score
    prob = prob.clamp(1e-6, 1 - 1e-6)
    p_t = torch.where(target > 0.5, prob, 1 - prob)
    return (-alpha * (1 - p_t) ** gamma * p_t.log()).mean()


def scoring_head(width: int, hidden: Sequence[int]) -> nn.Sequential:
    """``eta`` / ``phi``: Linear -> ReLU -> BatchNorm per hidden width, then Linear(-, 1)."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.BatchNorm1d(size)]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 1))


class InctrlHead(nn.Module):
    """The trainable part: adapter ``psi``, image-residual head ``eta``, holistic head ``phi``."""

    def __init__(self, embed_dim: int, patches: int, reduction: int = 4, hidden: Sequence[int] = (128, 64)):
        super().__init__()
        inner = embed_dim // reduction
        self.psi = nn.Sequential(nn.Linear(embed_dim, inner, bias=False), nn.ReLU(),
                                 nn.Linear(inner, embed_dim, bias=False), nn.ReLU())
        self.eta = scoring_head(embed_dim, hidden)
        self.phi = scoring_head(patches, hidden)


def patch_residual(query: Levels, prompts: Levels, names: Sequence[str]) -> torch.Tensor:
    """``M`` ``(Q, G)``: per level, each query patch's cosine distance ``(1 - cos) / 2`` to its
    nearest patch among all prompt patches of that level, averaged over the levels."""
    total = None
    for name in names:
        bank = prompts[name].reshape(-1, prompts[name].shape[-1]).float()
        distance = 1.0 - normal_scores(query[name].float(), bank)
        total = distance if total is None else total + distance
    return total / len(names)


# The paper's schedule: AdamW lr 1e-3, weight decay 0.01, constant; 10 epochs x 100 steps of 8 + 8 queries.
PAPER = Schedule(profile="paper", epochs=10, episodes=1600, batch=16, lr=1e-3, weight_decay=0.01, select="last")
# Chosen on the embedded sources' validation split (docs/methods.md): 10 epochs x 5 steps of 8 + 8 queries,
# the epoch with the lowest loss on held-out SOURCE queries kept.
EMBEDDED = Schedule(profile="embedded", epochs=10, episodes=80, batch=16, lr=1e-3, weight_decay=0.01,
                    select="best", val_fraction=0.2, val_episodes=64)


@register_method
class InctrlMethod(TrainableMethod):
    """InCTRL behind the :class:`~nagl.methods.base.Method` interface.

    ``levels`` ``{name: [h, w, C]}`` and ``embed_dim`` are the shapes the model is built
    for (from :meth:`config_for_backbone`); features of another grid or width are refused.
    ``text_prior`` / ``text_prior_reason`` / ``text_encoder`` say whether ``s_t`` is used and
    why (:func:`~nagl.methods.text_prior.text_tower_status`). ``seed`` only sets the
    initial weights; it is not part of the config.
    """

    name = "inctrl"
    level_group: ClassVar[str | None] = "patch"
    needs_embed: ClassVar[bool] = True
    uses_abnormal_refs: ClassVar[bool] = False

    def __init__(self, dim: int, levels: Mapping[str, Sequence[int]] | None = None, embed_dim: int | None = None,
                 text_prior: bool = False, text_prior_reason: str = NO_TEXT_ENCODER,
                 text_encoder: Mapping[str, Any] | None = None, prompt_set: str = "states",
                 logit_scale: float = 100.0, reduction: int = 4, hidden: Sequence[int] = (128, 64),
                 focal_alpha: float = 1.0, focal_gamma: float = 2.0, focal_input: str = "probability",
                 seed: int = 0):
        if not levels:
            raise NaglError("inctrl needs the backbone's patch levels: build it with "
                            "create_method('inctrl', dim, **InctrlMethod.config_for_backbone(backbone))")
        if not embed_dim:
            raise NaglError("inctrl needs a global image embedding, and this backbone has none (embed_dim is None); "
                            "use a backbone that publishes one (effnet-lite0, the open_clip ViTs)")
        shapes = {str(name): [int(v) for v in shape] for name, shape in levels.items()}
        if any(len(shape) != 3 or min(shape) < 1 for shape in shapes.values()):
            raise NaglError(f"inctrl: levels must map names to [h, w, C], got {dict(levels)}")
        grids = {(h, w) for h, w, _ in shapes.values()}
        if len(grids) != 1:
            raise NaglError(f"inctrl: the patch levels must share one grid, got {sorted(grids)}")
        if text_prior and prompt_set not in PROMPT_SETS:
            raise NaglError(f"inctrl: unknown prompt_set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")
        if focal_input not in FOCAL_INPUTS:
            raise NaglError(f"inctrl: focal_input must be one of {', '.join(FOCAL_INPUTS)}, got {focal_input!r}")
        if int(reduction) < 1 or int(embed_dim) // int(reduction) < 1:
            raise NaglError(f"inctrl: reduction must be in 1..{embed_dim}, got {reduction}")
        super().__init__(dim, levels=shapes, embed_dim=int(embed_dim), text_prior=bool(text_prior),
                         text_prior_reason=str(text_prior_reason),
                         text_encoder=dict(text_encoder) if text_encoder else None, prompt_set=prompt_set,
                         logit_scale=float(logit_scale), reduction=int(reduction), hidden=[int(h) for h in hidden],
                         focal_alpha=float(focal_alpha), focal_gamma=float(focal_gamma), focal_input=focal_input)
        self.level_names = sorted(shapes)  # a fixed order: M is the same before and after save / load
        self.grid: tuple[int, int] = next(iter(grids))
        self.patches = self.grid[0] * self.grid[1]
        self.embed_dim = int(embed_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = InctrlHead(self.embed_dim, self.patches, int(reduction), self.config["hidden"])
        self.head.eval()
        self._text: TextPrior | None = None

    @classmethod
    def config_for_backbone(cls, backbone: Any) -> dict[str, Any]:
        """The shapes of the backbone's ``patch`` levels and embedding, and whether it has a text tower."""
        return {**super().config_for_backbone(backbone), **text_tower_status(backbone)}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pixel_map": PIXEL_MAP, "image_score": "s = (s_h + s_p) / 2"}

    # -- text prior ---------------------------------------------------------------------
    def use_text_encoder(self, encode: TextEncoder) -> None:
        """Use ``encode`` (prompts -> ``(N, D)``) as the text tower, instead of loading the backbone's."""
        if not self.config["text_prior"]:
            raise NaglError("inctrl: this model was built without the text prior (text_prior = false: "
                            f"{self.config['text_prior_reason']}); a text encoder would change its scores")
        self._text = TextPrior(encode, self.config["logit_scale"], self.config["prompt_set"])

    def text_scores(self, embed: torch.Tensor, categories: Sequence[str] | None) -> torch.Tensor:
        """``s_t`` ``(B,)``: the text prior of each query, or zeros when it is off."""
        if not self.config["text_prior"]:
            return embed.new_zeros(embed.shape[0])
        if categories is None:
            raise NaglError("inctrl: the text prior needs the queries' category (score(..., category=...))")
        if self._text is None:
            if not self.config["text_encoder"]:
                raise NaglError("inctrl: text_prior is on but no text encoder is configured or attached")
            self.use_text_encoder(load_text_encoder(self.config["text_encoder"]))
        return self._text(embed, categories).to(embed.dtype)

    # -- the forward pass -----------------------------------------------------------------
    def image_heads(self, residual_map: torch.Tensor, query_embed: torch.Tensor, prototype: torch.Tensor,
                    text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, s_i)`` ``(B,)`` from ``M`` ``(B, G)``, ``e_q`` ``(B, D)``, the prompts' mean adapted
        embedding ``(B, D)`` and ``s_t`` ``(B,)``."""
        s_i = torch.sigmoid(self.head.eta(prototype - self.head.psi(query_embed))).squeeze(-1)
        holistic = residual_map + s_i[:, None] + text[:, None]
        s_h = torch.sigmoid(self.head.phi(holistic)).squeeze(-1)
        s_p = residual_map.amax(dim=1)
        return (s_h + s_p) / 2, s_i

    def _check(self, features: Levels, what: str) -> None:
        if not isinstance(features, Mapping):
            raise NaglError(f"inctrl: {what} features must be a dict of levels {self.level_names} and "
                            f"{EMBED!r}, got {type(features).__name__}")
        missing = [name for name in [*self.level_names, EMBED] if name not in features]
        if missing:
            raise NaglError(f"inctrl: {what} features lack the levels {missing}; this model needs "
                            f"{[*self.level_names, EMBED]} (the backbone it was trained with)")
        for name in self.level_names:
            h, w, c = self.config["levels"][name]
            shape = tuple(features[name].shape[1:])
            if shape != (h * w, c):
                raise NaglError(f"inctrl: {what} level {name!r} has {shape[0]} patches of width {shape[-1]}; "
                                f"this model was trained for a {h}x{w} grid ({h * w} patches) of width {c} "
                                f"and refuses another (use the backbone and image size it was trained with)")
        if features[EMBED].ndim != 2 or features[EMBED].shape[1] != self.embed_dim:
            raise NaglError(f"inctrl: {what} embedding has shape {tuple(features[EMBED].shape)}; "
                            f"this model expects (n, {self.embed_dim})")

    def _check_grid(self, grid: Mapping[str, Sequence[int]] | Sequence[int] | None) -> None:
        if grid is None:
            return
        grids = grid.values() if isinstance(grid, Mapping) else [grid]
        for g in grids:
            if tuple(int(v) for v in g) != self.grid:
                raise NaglError(f"inctrl: grid {tuple(g)} given, but this model was trained for the grid "
                                f"{self.grid[0]}x{self.grid[1]} and refuses another")

    @torch.no_grad()
    def score(self, query: Levels, normal: Levels | None = None, abnormal: Levels | None = None,
              abnormal_masks: MaskInput = None, grid: Mapping[str, Sequence[int]] | None = None, *,
              category: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M (Q, h, w), s (Q,))`` of the queries, all of ``category``, given ``K >= 1`` normal prompts."""
        if abnormal is not None and any(t.shape[0] for t in abnormal.values()):
            raise NaglError("inctrl uses normal prompts only; run it in k_abnormal = 0 settings")
        if normal is None or normal.get(EMBED) is None or normal[EMBED].shape[0] == 0:
            raise NaglError("inctrl needs at least one normal prompt image (k_normal >= 1)")
        self._check(query, "query")
        self._check(normal, "normal prompt")
        self._check_grid(grid)
        self.head.eval()
        residual_map = patch_residual(query, normal, self.level_names)
        query_embed = query[EMBED].float()
        prototype = self.head.psi(normal[EMBED].float()).mean(dim=0, keepdim=True)
        text = self.text_scores(query_embed, None if category is None else [category] * query_embed.shape[0])
        s, _ = self.image_heads(residual_map, query_embed, prototype.expand(query_embed.shape[0], -1), text)
        return residual_map.reshape(-1, *self.grid), s

    # -- training (the contract of TrainableMethod) -------------------------------------
    def batch_spec(self, normal_shots: tuple[int, ...], abnormal_shots: tuple[int, ...]) -> BatchSpec:
        """Half the queries normal, half abnormal (each label's pool cycled); prompts are normal images of
        the query's category; no abnormal references, no masks."""
        return BatchSpec(tuple(normal_shots), (0,), mask_size=None, abnormal_query_rate=0.5,
                         level_group=self.level_group, needs_embed=True, balanced=True)

    def trainable_module(self) -> nn.Module:
        return self.head

    def training_settings(self) -> dict[str, Any]:
        keys = ("focal_alpha", "focal_gamma", "focal_input", "text_prior")
        return {key: self.config[key] for key in keys}

    def loss(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``FL(s, y) + FL(s_i, y)`` of a batch, and the image scores ``s`` ``(B,)``."""
        query = batch.query_levels()
        prompts = [batch.normal_levels(i) for i in range(len(batch))]
        self._check(query, "query")
        with torch.no_grad():  # M and s_t hold no trainable parameter
            residual_map = torch.cat([patch_residual({n: query[n][b:b + 1] for n in self.level_names}, prompts[b],
                                                     self.level_names) for b in range(len(batch))])
            text = self.text_scores(query[EMBED].float(), batch.categories())
        prototype = torch.stack([self.head.psi(p[EMBED].float()).mean(dim=0) for p in prompts])
        s, s_i = self.image_heads(residual_map, query[EMBED].float(), prototype, text)
        labels = batch.labels()
        settings = self.config
        loss = sum(binary_focal_loss(x, labels, settings["focal_alpha"], settings["focal_gamma"],
                                     settings["focal_input"]) for x in (s, s_i))
        return loss, s.detach()

    # -- weights ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.head.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise NaglError(f"inctrl checkpoint does not fit a head for D = {self.embed_dim}, G = {self.patches}: "
                            f"tensors with other names or shapes ({sorted(set(state) ^ set(expected))[:3]})")
        self.head.load_state_dict(state)


register_profile("inctrl", "paper", PAPER)
register_profile("inctrl", "embedded", EMBEDDED)
