"""Run configuration: loading, validation, and the hashes stored with results.

The schema is ``workflow/schemas/config.schema.yaml``; Snakemake validates the
same file with ``validate(config, schema)``. Errors name the file, the setting
and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from nagl.errors import NaglError
from nagl.io import stable_hash
from nagl.settings import project_dir

SCHEMA_PATH = Path("workflow") / "schemas" / "config.schema.yaml"
DEFAULT_CONFIG = Path("config") / "config.yaml"
TRAINING_FREE_SOURCE = "-"


def schema() -> dict:
    return yaml.safe_load((project_dir() / SCHEMA_PATH).read_text())


def validate_config(config: dict, origin: str = "config") -> dict:
    """Check ``config`` against the schema and the cross-field rules; fill defaults."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for error in errors:
            where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
            lines.append(f"  - {where}: {error.message}")
        raise NaglError(f"{origin}: invalid configuration:\n" + "\n".join(lines)
                        + f"\nSee {SCHEMA_PATH} for the allowed settings.")
    config = copy.deepcopy(config)
    config.setdefault("results", "results")
    config.setdefault("report", "reports/leaderboard.html")
    config["training"].setdefault("seed", 0)
    if 0 in config["shots"]["k_normal"] and 0 in config["shots"]["k_abnormal"]:
        raise NaglError(f"{origin}: shots: k_normal and k_abnormal both contain 0, and a cell "
                        f"with no references at all cannot be scored; remove 0 from one list")
    trainable = [m for m in config["methods"] if is_trainable(m)]
    if trainable and not config["sources"]:
        raise NaglError(f"{origin}: sources is empty but {', '.join(trainable)} must be trained "
                        f"on a source dataset; name at least one source")
    from nagl.data.registry import load_registry

    known = load_registry()
    for key in ("sources", "targets"):
        for name in config[key]:
            if name not in known:
                raise NaglError(f"{origin}: {key}: dataset {name!r} is not in config/datasets.yaml; "
                                f"known: {', '.join(sorted(known))}")
    return config


def load_config(path: str | Path | None = None) -> dict:
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
    from nagl.methods import method_class  # local: keeps config loading light

    return method_class(method).trainable


def run_datasets(config: dict) -> list[str]:
    """The datasets a run needs: its targets, and its sources when a method is trained."""
    trains = any(is_trainable(method) for method in config["methods"])
    return sorted(set(config["targets"]) | (set(config["sources"]) if trains else set()))


def cell_settings(config: dict, method: str) -> dict[str, Any]:
    """The settings that determine a cell's numbers (beyond its key and the data)."""
    settings = {
        "method": method,
        "backbone": config["backbone"],
        "image_size": config["image_size"],
        "eval_resolution": config["eval_resolution"],
    }
    if is_trainable(method):
        settings["training"] = config["training"]
    return settings


def cell_settings_hash(config: dict, method: str) -> str:
    """``config_hash`` of a run row: changes exactly when a cell must be recomputed."""
    return stable_hash(cell_settings(config, method))


def effective_config_path(config: dict) -> Path:
    return Path(config["results"]) / "run-config.json"


def write_effective_config(config: dict) -> str:
    """Write the validated config for the workflow's steps; keep the file if unchanged.

    Rewriting only on change keeps its modification time, so Snakemake sees no
    reason to rerun anything.
    """
    import json

    from nagl.io import atomic_write_text

    path = effective_config_path(config)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return str(path)


def read_effective_config(path: str | Path) -> dict:
    import json

    path = Path(path)
    if not path.is_file():
        raise NaglError(f"run config {path} not found; it is written by the workflow "
                        f"(`nagl run`), not by hand")
    return validate_config(json.loads(path.read_text()), origin=str(path))
