"""InCTRL's text prior: how normal or anomalous a query's image embedding looks to CLIP's text tower.

``../shared/spec/inctrl-method.md`` section "Text prior". Per category, the prompts of
the normal and the anomaly states are encoded, L2-normalised, averaged per class and
normalised again (``t_n``, ``t_a``); a query's prior is
``s_t = softmax(scale * [cos(e_q, t_n), cos(e_q, t_a)])[1]``.

The prior is on only when the backbone is an open_clip model whose weights file still
holds the text tower (:func:`text_tower_status`); otherwise InCTRL runs with ``s_t = 0``
and records why. The prompt lists below are data: change them here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nagl.errors import NaglError

NO_TEXT_ENCODER = "backbone has no text encoder"

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}",
                 "{} without flaw", "{} without defect", "{} without damage")
ANOMALY_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = tuple(
    [f"a {quality} photo of {article} {{}}." for quality in
     ("cropped", "close-up", "bright", "dark", "jpeg corrupted", "blurry") for article in ("a", "the")]
    + [f"a photo of {article} {{}}." for article in ("a", "the")]
    + [f"a photo of {article} {size} {{}}." for article in ("a", "the") for size in ("small", "large")]
    + [f"a photo of {article} {{}} for {task}." for article in ("a", "the")
       for task in ("visual inspection", "anomaly detection")]
)
# Semantic anomaly detection (one class of CIFAR-10 normal): one prompt per class.
CLASS_PAIR = ("a photo of {} for anomaly detection.", "a photo without {} for anomaly detection.")

PROMPT_SETS = ("states", "class-pair")


def object_name(category: str) -> str:
    """The object's name in a prompt: the category with ``_`` -> space."""
    return category.replace("_", " ")


def class_prompts(category: str, prompt_set: str = "states") -> tuple[list[str], list[str]]:
    """``(normal prompts, anomaly prompts)`` of a category: 7 x 22 and 4 x 22 for ``states``,
    one each for ``class-pair``."""
    name = object_name(category)
    if prompt_set == "states":
        return ([t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES],
                [t.format(s.format(name)) for s in ANOMALY_STATES for t in TEMPLATES])
    if prompt_set == "class-pair":
        return [CLASS_PAIR[0].format(name)], [CLASS_PAIR[1].format(name)]
    raise NaglError(f"inctrl: unknown text prompt set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")


TextEncoder = Callable[[Sequence[str]], torch.Tensor]


class ClipTextEncoder:
    """An open_clip text tower with its tokenizer: prompts -> ``(N, D)`` embeddings (unnormalised)."""

    def __init__(self, tower: torch.nn.Module, context_length: int):
        self.tower = tower.eval()
        self.context_length = context_length

    @classmethod
    def build(cls, embed_dim: int, text_cfg: dict[str, Any], quick_gelu: bool = False,
              state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> ClipTextEncoder:
        """The tower of ``text_cfg`` (open_clip's ``text_cfg``) with the tensors ``state``
        loaded strictly, or seeded random weights (tests) when ``state`` is None."""
        from open_clip.model import CLIPTextCfg, _build_text_tower

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = _build_text_tower(int(embed_dim), CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu)
        if state is not None:
            try:
                missing, unexpected = tower.load_state_dict(state, strict=False)
            except RuntimeError as error:
                raise NaglError(f"inctrl: the text tower's weights do not fit: {str(error).splitlines()[-1]}") from error
            if missing or unexpected:
                raise NaglError(f"inctrl: the text tower's weights do not fit: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
        for parameter in tower.parameters():
            parameter.requires_grad_(False)
        return cls(tower, int(text_cfg.get("context_length", 77)))

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        import open_clip

        tokens = open_clip.tokenize(list(prompts), context_length=self.context_length)
        return self.tower(tokens).float()


def text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors of a full open_clip CLIP checkpoint (empty if it has none)."""
    if "token_embedding.weight" not in state:
        return {}
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def clip_text_config(open_clip_model: str) -> tuple[int, dict[str, Any]]:
    """``(embed_dim, text_cfg)`` of an open_clip model config."""
    import open_clip

    cfg = open_clip.get_model_config(open_clip_model)
    if cfg is None or "text_cfg" not in cfg:
        raise NaglError(f"open_clip {open_clip.__version__} has no text config for {open_clip_model!r}")
    return int(cfg["embed_dim"]), dict(cfg["text_cfg"])


def text_tower_status(backbone: Any) -> dict[str, Any]:
    """Whether ``backbone`` offers a text tower with loaded weights, as method settings:
    ``{"text_prior": bool, "text_prior_reason": str, "text_encoder": dict | None}``.

    ``text_encoder`` says how to rebuild the tower later: the backbone's name, the
    digest of the weights file it was built from (which must still match), the tower's
    shape (``embed_dim``, open_clip's ``text_cfg``) and its activation (QuickGELU or not).
    """
    off = {"text_prior": False, "text_prior_reason": NO_TEXT_ENCODER, "text_encoder": None}
    from nagl.models.backbones import BACKBONES, find_weights, weights_digest

    spec = BACKBONES.get(backbone.name).weights if backbone.name in BACKBONES else None
    if spec is None or spec.kind != "open_clip" or not spec.open_clip_model:
        return off
    if str(backbone.weights_id).startswith("random"):
        return {**off, "text_prior_reason": "backbone weights are random (no trained text tower)"}
    path = find_weights(backbone.name)
    if weights_digest(path) != backbone.weights_id:
        return {**off, "text_prior_reason": f"backbone was built from another file than its weights file {path}"}
    if not _has_text_tower(path):
        return {**off, "text_prior_reason": f"weights file {path} holds the image tower only; "
                                            f"import the full CLIP checkpoint to keep the text tower"}
    from open_clip.transformer import QuickGELU

    embed_dim, text_cfg = clip_text_config(spec.open_clip_model)
    return {"text_prior": True, "text_prior_reason": "backbone has a text tower with loaded weights",
            "text_encoder": {"backbone": backbone.name, "weights_id": str(backbone.weights_id),
                             "embed_dim": embed_dim, "text_cfg": text_cfg,
                             "quick_gelu": any(isinstance(m, QuickGELU) for m in backbone.modules())}}


def _has_text_tower(path: Path) -> bool:
    """Whether a weights file holds CLIP's text tower (a safetensors file's names are read without its tensors)."""
    from safetensors import safe_open

    from nagl.models.weights import _is_safetensors, read_state_dict

    if _is_safetensors(path):
        with safe_open(str(path), framework="pt") as handle:
            return "token_embedding.weight" in handle.keys()
    return bool(text_state_dict(read_state_dict(path)))


def load_text_encoder(settings: dict[str, Any]) -> ClipTextEncoder:
    """The text tower described by :func:`text_tower_status`'s ``text_encoder``, from the
    backbone's weights file; refuses a file other than the one the model was built with."""
    from nagl.models.backbones import find_weights, weights_digest
    from nagl.models.weights import read_state_dict

    path = find_weights(settings["backbone"])
    if weights_digest(path) != settings["weights_id"]:
        raise NaglError(f"inctrl: the weights file {path} of backbone {settings['backbone']!r} is not the one "
                        f"this model was built with ({settings['weights_id']}); restore that file or retrain")
    return ClipTextEncoder.build(settings["embed_dim"], settings["text_cfg"], bool(settings["quick_gelu"]),
                                 state=text_state_dict(read_state_dict(path)))


class TextPrior:
    """``s_t`` of image embeddings given their categories; class embeddings cached per category."""

    def __init__(self, encode: TextEncoder, logit_scale: float = 100.0, prompt_set: str = "states"):
        self.encode = encode
        self.logit_scale = float(logit_scale)
        self.prompt_set = prompt_set
        self._classes: dict[str, torch.Tensor] = {}

    def class_embeddings(self, category: str) -> torch.Tensor:
        """``(2, D)``: the normalised mean normal and anomaly prompt embeddings ``t_n``, ``t_a``."""
        if category not in self._classes:
            normal, anomaly = class_prompts(category, self.prompt_set)
            rows = [F.normalize(F.normalize(self.encode(p), dim=-1).mean(dim=0), dim=0) for p in (normal, anomaly)]
            self._classes[category] = torch.stack(rows)
        return self._classes[category]

    def __call__(self, embed: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
        """``(B,)`` anomaly probabilities of ``embed`` ``(B, D)``, each against its own category."""
        if len(categories) != embed.shape[0]:
            raise NaglError(f"inctrl: {len(categories)} categories for {embed.shape[0]} queries")
        classes = torch.stack([self.class_embeddings(c) for c in categories])  # (B, 2, D)
        if classes.shape[-1] != embed.shape[-1]:
            raise NaglError(f"inctrl: text embeddings have width {classes.shape[-1]}, image embeddings "
                            f"{embed.shape[-1]}; the text tower must be the backbone's own")
        cos = torch.einsum("bd,bkd->bk", F.normalize(embed.float(), dim=-1), classes)
        return (self.logit_scale * cos).softmax(dim=-1)[:, 1]
