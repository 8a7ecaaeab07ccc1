"""Local weight files of the ViT backbones (DINOv2, CLIP): finding, reading, writing them.

This module only handles files. Which backbone has which file is declared beside
its factory (``@register_backbone(name, weights=WeightSpec(...))`` in
:mod:`nagl.models.backbones`, which also holds the by-name ``nagl weights``
operations); the functions here take the :class:`WeightSpec`.

Weights are never downloaded behind the user's back. A backbone's weights are
looked up, in this order:

1. an explicit path (``create_backbone(name, weights=PATH)``);
2. the environment variable ``NAGL_WEIGHTS_<NAME>`` (upper case, ``-`` -> ``_``),
   e.g. ``NAGL_WEIGHTS_DINOV2_VITS14``;
3. the expected file ``weights_dir() / <file>``;
4. files the user already has in the Hugging Face hub cache, the torch hub cache
   or open_clip's download cache (looked up, never fetched).

``nagl weights fetch NAME`` downloads (HF hub, through open_clip for CLIP) and
``nagl weights import NAME FILE`` takes a checkpoint the user has; both check
that it loads and write it, as a safetensors state dict, to the expected file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nagl.errors import MissingDataError, NaglError
from nagl.io import atomic_path, sha256_file
from nagl.settings import weights_dir


@dataclass(frozen=True)
class WeightSpec:
    """Where one backbone's weights come from and where they are kept."""

    backbone: str
    file_name: str  # under weights_dir()
    kind: str  # "timm" or "open_clip": the key layout of the checkpoint
    source: str  # human-readable origin, for messages and docs
    hub_repo: str  # Hugging Face hub repository holding the checkpoint
    hub_files: tuple[str, ...]  # candidate file names in that repository, preferred first
    torch_hub_files: tuple[str, ...] = ()  # names under <torch hub dir>/checkpoints
    open_clip_model: str = ""  # open_clip model name and pretrained tag (fetch through open_clip)
    open_clip_tag: str = ""
    open_clip_cache_files: tuple[str, ...] = ()  # names under ~/.cache/clip (open_clip URL downloads)


def env_var(name: str) -> str:
    """The environment variable that overrides ``name``'s weights file."""
    return "NAGL_WEIGHTS_" + name.upper().replace("-", "_")


def expected_path(spec: WeightSpec) -> Path:
    """Where ``nagl weights fetch/import`` puts the weights."""
    return weights_dir() / spec.file_name


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def user_cache_candidates(spec: WeightSpec) -> list[Path]:
    """Files in the user's existing caches that hold these weights (present ones only)."""
    from huggingface_hub import try_to_load_from_cache

    found: list[Path] = []
    for file_name in spec.hub_files:
        cached = try_to_load_from_cache(spec.hub_repo, file_name, cache_dir=_hf_cache_dir())
        if isinstance(cached, str) and os.path.isfile(cached):
            found.append(Path(cached))
    for file_name in spec.torch_hub_files:
        path = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if path.is_file():
            found.append(path)
    for file_name in spec.open_clip_cache_files:
        path = Path(os.path.expanduser("~/.cache/clip")) / file_name
        if path.is_file():
            found.append(path)
    return found


def _missing_message(spec: WeightSpec) -> str:
    name = spec.backbone
    return (f"weights for backbone {name!r} not found: expected the file {expected_path(spec)}. "
            f"Get it with `nagl weights fetch {name}` (needs network), or copy a checkpoint of "
            f"{spec.source} there with `nagl weights import {name} FILE`, "
            f"or point {env_var(name)} at a weights file.")


def find_weights(name: str, spec: WeightSpec | None, explicit: str | os.PathLike | None = None) -> Path:
    """The weights file to load for backbone ``name``, whose default file is ``spec``
    (None: it has none); see the module docstring for the order.

    Raises :class:`MissingDataError` naming the expected file and the fetch command.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise MissingDataError(f"weights file {path} (given for backbone {name!r}) does not exist; "
                                   f"pass the path of an existing checkpoint")
        return path
    override = os.environ.get(env_var(name))
    if override:
        path = Path(override)
        if not path.is_file():
            raise MissingDataError(f"{env_var(name)}={override} but that file does not exist; "
                                   f"fix or unset {env_var(name)}")
        return path
    if spec is None:
        raise NaglError(f"backbone {name!r} has no default weights; pass weights=PATH or random_init=True")
    target = expected_path(spec)
    if target.is_file():
        return target
    cached = user_cache_candidates(spec)
    if cached:
        return cached[0]
    raise MissingDataError(_missing_message(spec))


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte header length and then the JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, loaded without unpickling code (safetensors or ``weights_only``).

    Unwraps the common ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a
    ``module.`` prefix left by DataParallel.
    """
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, TorchScript archive, pickled code ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NaglError(f"cannot read weights file {path}: {reason}. It must be a safetensors file or a "
                        f"plain PyTorch state dict (TorchScript archives are not accepted); "
                        f"re-download it or run `nagl weights fetch`") from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NaglError(f"weights file {path} does not hold a state dict of tensors; "
                        f"give a checkpoint saved with torch.save(model.state_dict()) or safetensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def visual_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors of an open_clip checkpoint (full CLIP or tower only)."""
    if any(key.startswith("visual.") for key in state):
        return {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    return state


def _reduce(spec: WeightSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What we keep of a checkpoint: the CLIP image tower, and the text tower when the checkpoint
    has one (InCTRL's text prior reads it); or the whole ViT."""
    if spec.kind == "open_clip" and "token_embedding.weight" not in state:
        state = visual_state_dict(state)
    # safetensors refuses tensors that share memory; give each its own.
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def import_weights(spec: WeightSpec, source: str | os.PathLike, check: Callable[[Path], object]) -> Path:
    """Write the checkpoint ``source`` to the expected file, if ``check(path)`` (which
    builds the backbone from it) passes.

    The file is written as a safetensors state dict (for CLIP, the image tower and the text tower if any),
    atomically; returns its path.
    """
    from safetensors.torch import save_file

    name = spec.backbone
    source = Path(source)
    if not source.is_file():
        raise NaglError(f"checkpoint {source} does not exist; give the path of a {spec.source} checkpoint")
    state = _reduce(spec, read_state_dict(source))
    target = expected_path(spec)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={"backbone": name, "source": spec.source})
        try:
            check(tmp)
        except NaglError as error:
            raise NaglError(f"checkpoint {source} does not load into backbone {name!r} "
                            f"({spec.source} expected): {error}") from error
    return target


def _download(spec: WeightSpec) -> Path:
    if spec.open_clip_model:
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.open_clip_model, spec.open_clip_tag)
        if not cfg:
            raise NaglError(f"open_clip has no pretrained tag {spec.open_clip_tag!r} for "
                            f"{spec.open_clip_model!r}; upgrade open_clip_torch")
        if spec.open_clip_tag not in cfg.get("hf_hub", spec.open_clip_tag):
            # open_clip's table points laion400m_e32 at the e31 repository: take the release URL.
            cfg = {key: value for key, value in cfg.items() if key != "hf_hub"}
        return Path(download_pretrained(cfg))
    from huggingface_hub import hf_hub_download

    errors = []
    for file_name in spec.hub_files:
        try:
            return Path(hf_hub_download(spec.hub_repo, file_name))
        except Exception as error:  # try the next candidate; report all at the end
            errors.append(f"{file_name}: {error}")
    raise OSError("; ".join(errors))


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Fail fast when offline, instead of the hub client's minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("NAGL_OFFLINE") == "1":
        raise OSError("NAGL_OFFLINE is set")
    if constants.HF_HUB_OFFLINE:
        raise OSError("HF_HUB_OFFLINE is set")
    url = urlparse(constants.ENDPOINT)
    with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                  timeout=timeout):
        pass


def fetch_weights(spec: WeightSpec, check: Callable[[Path], object]) -> Path:
    """Download the weights (HF hub / open_clip) and import them into place (see :func:`import_weights`)."""
    name = spec.backbone
    try:
        _check_hub_reachable()
        downloaded = _download(spec)
    except NaglError:
        raise
    except Exception as error:  # offline, DNS failure, HTTP error, hub offline mode ...
        raise MissingDataError(
            f"could not download weights for {name!r} ({spec.source}, Hugging Face hub "
            f"{spec.hub_repo}): {type(error).__name__}: {error}. Without network: fetch on a machine "
            f"that has it and copy {spec.file_name} to {expected_path(spec)}, or run "
            f"`nagl weights import {name} FILE` with a checkpoint you have.") from error
    return import_weights(spec, downloaded, check)


@dataclass(frozen=True)
class WeightStatus:
    backbone: str
    expected: Path
    present: bool
    sha256: str | None  # of the expected file, when present
    found_elsewhere: Path | None  # env-var override or user cache that would be used instead


def weight_status(spec: WeightSpec, with_hash: bool = True) -> WeightStatus:
    """Whether the weights are in place, and what would be loaded otherwise."""
    name = spec.backbone
    target = expected_path(spec)
    present = target.is_file()
    elsewhere = None
    override = os.environ.get(env_var(name))
    if override and Path(override).is_file():
        elsewhere = Path(override)
    elif not present:
        cached = user_cache_candidates(spec)
        elsewhere = cached[0] if cached else None
    digest = sha256_file(target) if present and with_hash else None
    return WeightStatus(name, target, present, digest, elsewhere)
