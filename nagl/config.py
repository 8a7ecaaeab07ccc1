"""Run configuration: loading, validation into a typed :class:`RunConfig`, and the
hashes stored with results.

The schema ``workflow/schemas/config.schema.yaml`` holds the shape and every
default; Snakemake validates the same file. Names are then checked against the
registries (methods, training profiles, backbones, datasets), and the backbone is
asked whether it takes ``image_size``, so a bad run config fails when it loads
(and so in ``nagl run --dry-run``). Errors name the file, the setting and what is
allowed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from nagl.data.unions import UnionSource, leave_one_out
from nagl.errors import NaglError
from nagl.io import stable_hash
from nagl.settings import project_dir

SCHEMA_PATH = Path("workflow") / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = Path("config") / "config.yaml"
TRAINING_FREE_SOURCE = "-"


@dataclass(frozen=True)
class Shots:
    k_normal: tuple[int, ...]
    k_abnormal: tuple[int, ...]

    def settings(self) -> list[tuple[int, int]]:
        """Every ``(k_normal, k_abnormal)`` cell setting, sorted; ``(0, 0)`` excluded."""
        return [(kn, ka) for kn in sorted(self.k_normal) for ka in sorted(self.k_abnormal) if kn + ka > 0]


@dataclass(frozen=True)
class Training:
    """``seeds``: one checkpoint per training seed and (method, source)."""

    profile: str
    seeds: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "seeds": list(self.seeds)}


@dataclass(frozen=True)
class RunConfig:
    """A validated run config (``config/config.yaml``), defaults filled in."""

    backbone: str
    image_size: int
    eval_resolution: int
    methods: tuple[str, ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    shots: Shots
    seeds: tuple[int, ...]
    training: Training
    results: str
    report: str
    union_sources: str = "none"
    explicit_unions: tuple[UnionSource, ...] = ()  # the unions written in `sources`

    @property
    def unions(self) -> tuple[UnionSource, ...]:
        """The union sources: those written in ``sources``, then those ``union_sources`` adds."""
        added = leave_one_out(self.sources, self.targets) if self.union_sources == "leave-one-out" else []
        return (*self.explicit_unions, *added)

    def training_sources(self) -> list[str]:
        """Every source a trainable method is trained on: the dataset sources, then the unions."""
        return [*self.sources, *(union.name for union in self.unions)]

    def source_datasets(self, source: str) -> tuple[str, ...]:
        """The datasets a source is made of (one for a dataset source)."""
        for union in self.unions:
            if union.name == source:
                return union.datasets
        if source in self.sources:
            return (source,)
        raise NaglError(f"source {source!r} is not in the run config; its sources are "
                        f"{', '.join(self.training_sources()) or '(none)'}")

    def source_targets(self, source: str) -> tuple[str, ...]:
        """The targets a source is evaluated on: every target for a dataset source, only the
        targets that are not its members for a union (so a union is never in-domain)."""
        for union in self.unions:
            if union.name == source:
                return union.targets
        return self.targets
    reference_checks: bool = True  # re-score abnormal-reference cells with swapped references
    protocols: tuple[str, ...] = ("clean",)  # "reference-code" adds the public code's protocol, flagged

    @property
    def trainable_methods(self) -> list[str]:
        return [m for m in self.methods if is_trainable(m)]

    @property
    def training_free_methods(self) -> list[str]:
        return [m for m in self.methods if not is_trainable(m)]

    def evaluation_jobs(self) -> list[tuple[str, str, int | None, str]]:
        """Every evaluation job ``(method, source, training seed, target)`` of the run, in the
        workflow's order; training-free methods have the source ``'-'`` and no training seed.
        A union source is evaluated only on the targets that are not among its datasets."""
        jobs: list[tuple[str, str, int | None, str]] = []
        for target in self.targets:
            for method in self.trainable_methods:
                jobs += [(method, source, train_seed, target) for source in self.training_sources()
                         if target in self.source_targets(source) for train_seed in self.training.seeds]
            jobs += [(method, TRAINING_FREE_SOURCE, None, target) for method in self.training_free_methods]
        return jobs

    def evaluation_groups(self) -> dict[tuple[str, str, int | None], list[str]]:
        """The evaluation jobs of :meth:`evaluation_jobs` grouped into the workflow's jobs: one per
        ``(method, source, training seed)``, over its targets (in order), so a process's start-up
        (importing torch, loading the checkpoint) is paid once for all of them."""
        groups: dict[tuple[str, str, int | None], list[str]] = {}
        for method, source, train_seed, target in self.evaluation_jobs():
            groups.setdefault((method, source, train_seed), []).append(target)
        return groups

    def datasets(self) -> list[str]:
        """The datasets the run needs: its targets, and its sources (with the datasets of its
        union sources) when a method is trained."""
        sources = set(self.sources) | {d for union in self.unions for d in union.datasets}
        return sorted(set(self.targets) | (sources if self.trainable_methods else set()))

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (what the workflow's steps read back)."""
        return {
            "backbone": self.backbone, "image_size": self.image_size, "eval_resolution": self.eval_resolution,
            "methods": list(self.methods), "targets": list(self.targets),
            "sources": [*self.sources, *(union.as_dict() for union in self.explicit_unions)],
            "union_sources": self.union_sources,
            "shots": {"k_normal": list(self.shots.k_normal), "k_abnormal": list(self.shots.k_abnormal)},
            "seeds": list(self.seeds), "training": self.training.as_dict(),
            "results": self.results, "report": self.report,
            "reference_checks": self.reference_checks, "protocols": list(self.protocols),
        }


def schema() -> dict:
    return yaml.safe_load((project_dir() / SCHEMA_PATH).read_text())


def _with_defaults(config: Mapping[str, Any], schema_part: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the schema's ``default`` values filled in, recursively for objects."""
    filled = dict(config)
    for key, spec in schema_part.get("properties", {}).items():
        if key not in filled and "default" in spec:
            filled[key] = spec["default"]
        if spec.get("type") == "object" and isinstance(filled.get(key), Mapping):
            filled[key] = _with_defaults(filled[key], spec)
    return filled


def _choose(origin: str, setting: str, name: str, known: list[str], where: str) -> None:
    if name not in known:
        raise NaglError(f"{origin}: {setting}: unknown {where} {name!r}; choose one of: {', '.join(known)}")


def validate_config(config: Mapping[str, Any], origin: str = "config", check_backbone: bool = True) -> RunConfig:
    """Check ``config`` against the schema, the registries and the cross-field rules.

    ``check_backbone`` False skips building the backbone (on the meta device, which imports
    its library) to check the image size: for the run config the workflow wrote after that check.
    """
    training = config.get("training")
    if isinstance(training, Mapping) and "seed" in training:
        raise NaglError(f"{origin}: training.seed is no longer a setting; write training.seeds, a list of "
                        f"training seeds (e.g. seeds: [{training['seed']}]), one checkpoint each")
    rules = schema()
    validator = jsonschema.Draft202012Validator(rules)
    errors = sorted(validator.iter_errors(dict(config)), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            lines.append(f"  - {where}: {error.message}")
        raise NaglError(f"{origin}: invalid configuration:\n" + "\n".join(lines)
                        + f"\nSee {SCHEMA_PATH} for the allowed settings.")
    raw = _with_defaults(config, rules)
    shots = Shots(tuple(raw["shots"]["k_normal"]), tuple(raw["shots"]["k_abnormal"]))
    targets = tuple(raw["targets"])
    explicit = tuple(UnionSource(s["name"], tuple(s["datasets"]), tuple(t for t in targets if t not in s["datasets"]))
                     for s in raw["sources"] if isinstance(s, Mapping))
    run = RunConfig(
        backbone=raw["backbone"], image_size=int(raw["image_size"]), eval_resolution=int(raw["eval_resolution"]),
        methods=tuple(raw["methods"]), sources=tuple(s for s in raw["sources"] if isinstance(s, str)),
        targets=targets, shots=shots, seeds=tuple(raw["seeds"]),
        training=Training(raw["training"]["profile"], tuple(int(s) for s in raw["training"]["seeds"])),
        results=str(raw["results"]), report=str(raw["report"]),
        union_sources=str(raw["union_sources"]), explicit_unions=explicit,
        reference_checks=bool(raw["reference_checks"]), protocols=tuple(raw["protocols"]))
    _check_names(run, origin, check_backbone)
    if 0 in shots.k_normal and 0 in shots.k_abnormal:
        raise NaglError(f"{origin}: shots: k_normal and k_abnormal both contain 0, and a cell "
                        f"with no references at all cannot be scored; remove 0 from one list")
    if run.trainable_methods and not run.training_sources():
        raise NaglError(f"{origin}: sources is empty but {', '.join(run.trainable_methods)} must be trained "
                        f"on a source dataset; name at least one source")
    return run


def _check_names(run: RunConfig, origin: str, check_backbone: bool = True) -> None:
    """Names against the registries; the backbone must take the image size."""
    from nagl.data.registry import load_registry
    from nagl.methods import list_methods, method_class
    from nagl.models.backbones import backbone_info, list_backbones
    from nagl.training.schedule import list_profiles

    for method in run.methods:
        _choose(origin, "methods", method, list_methods(), "method")
        if not method_class(method).uses_abnormal_refs and 0 not in run.shots.k_abnormal:
            raise NaglError(f"{origin}: method {method!r} uses normal references only, so it is evaluated in "
                            f"k_abnormal = 0 cells only, and shots.k_abnormal {list(run.shots.k_abnormal)} has "
                            f"none: add 0 to shots.k_abnormal or remove the method")
    _choose(origin, "training.profile", run.training.profile, list_profiles(), "training profile")
    known = load_registry()
    for key in ("sources", "targets"):
        for name in getattr(run, key):
            if name not in known:
                raise NaglError(f"{origin}: {key}: dataset {name!r} is not in config/datasets.yaml; "
                                f"known: {', '.join(sorted(known))}")
    _check_unions(run, origin, set(known))
    _choose(origin, "backbone", run.backbone, list_backbones(), "backbone")
    if not check_backbone:
        return
    try:
        backbone_info(run.backbone, run.image_size)
    except NaglError as error:
        raise NaglError(f"{origin}: image_size {run.image_size} does not suit backbone {run.backbone!r}: "
                        f"{error}") from None


def _check_unions(run: RunConfig, origin: str, known: set[str]) -> None:
    """Union sources: members are known datasets, names are new and distinct, each has a target."""
    seen = set(run.sources)
    for union in run.unions:
        where = f"{origin}: sources: union {union.name!r}"
        if union.name in known:
            raise NaglError(f"{where} has the name of a dataset in config/datasets.yaml; give the union another name")
        if union.name in seen:
            added = " (union_sources: leave-one-out adds a union of this name)" if union not in run.explicit_unions else ""
            raise NaglError(f"{where} is named twice{added}; give each source its own name")
        seen.add(union.name)
        for name in union.datasets:
            if name not in known:
                raise NaglError(f"{where}: dataset {name!r} is not in config/datasets.yaml; "
                                f"known: {', '.join(sorted(known))}")
        if not union.targets:
            raise NaglError(f"{where} contains every target ({', '.join(run.targets)}), so no cell could "
                            f"evaluate it without leakage; add a target that is not one of its datasets")


def load_config(path: str | Path | None = None) -> RunConfig:
    path = Path(path) if path else project_dir() / DEFAULT_CONFIG
    if not path.is_file():
        raise NaglError(f"config file {path} not found; pass --config with an existing file "
                        f"(the default is {DEFAULT_CONFIG})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise NaglError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise NaglError(f"{path}: expected a mapping of settings at the top level")
    return validate_config(raw, origin=str(path))


def is_trainable(method: str) -> bool:
    from nagl.methods import is_trainable as registered_trainable

    return registered_trainable(method)


def run_datasets(config: RunConfig | Mapping[str, Any]) -> list[str]:
    """The datasets a run needs (see :meth:`RunConfig.datasets`); a config in its JSON
    form (as the ingest step receives it) is validated first."""
    if not isinstance(config, RunConfig):
        config = validate_config(config)
    return config.datasets()


def cell_settings(config: RunConfig, method: str) -> dict[str, Any]:
    """The settings that determine a cell's numbers (beyond its key and the data)."""
    settings: dict[str, Any] = {
        "method": method,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "eval_resolution": config.eval_resolution,
    }
    if is_trainable(method):
        # The training seed is part of the cell's key (runs.train_seed), not of its settings.
        settings["training"] = {"profile": config.training.profile}
    return settings


def cell_settings_hash(config: RunConfig, method: str) -> str:
    """``config_hash`` of a run row: changes exactly when a cell must be recomputed."""
    return stable_hash(cell_settings(config, method))


def write_effective_config(config: RunConfig) -> str:
    """Write the validated config for the workflow's steps; keep the file if unchanged.

    Rewriting only on change keeps its modification time, so Snakemake sees no
    reason to rerun anything.
    """
    from nagl.io import atomic_write_text
    from nagl.paths import run_config

    path = run_config(config.results)
    text = json.dumps(config.as_dict(), indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return str(path)


def read_effective_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise NaglError(f"run config {path} not found; it is written by the workflow "
                        f"(`nagl run`), not by hand")
    # Written by the workflow from a config it validated, the backbone's image size included.
    return validate_config(json.loads(path.read_text()), origin=str(path), check_backbone=False)
