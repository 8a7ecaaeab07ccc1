"""The dataset registry: ``config/datasets.yaml`` names every dataset and how to build it.

An entry is ``name: {kind: ..., domain: ..., <flags>, <kind options>}``. The flags
describe the dataset for listings and the results: ``masks`` (true: pixel masks,
false: image-level labels only; pixel metrics are then NULL), ``anomaly``
(``defect`` or ``semantic``: another class is the anomaly) and ``licence``. ``kind`` picks a
builder registered with :func:`register_builder` (in a module of
:mod:`nagl.data.builders`, which imports them all and looks builders up with
``builder_for``; this module imports no builder). A builder writes the dataset in
the canonical (MVTec AD) layout into a staging folder. Everything after that
(image normalisation, validation, manifest, DVC versioning) is the same for every
dataset and lives in ``nagl.data.prepare``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nagl.errors import NaglError
from nagl.registry import Registry
from nagl.settings import project_dir

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")

ANOMALY_KINDS = ("defect", "semantic")
FLAG_KEYS = ("kind", "domain", "description", "masks", "anomaly", "licence")

Builder = Callable[["DatasetSpec", Path], None]
BUILDERS: Registry[Builder] = Registry("dataset kind")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str
    domain: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    masks: bool | None = None  # None: not stated in the registry
    anomaly: str = "defect"
    licence: str | None = None


def register_builder(kind: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``build(spec, out_dir)`` for datasets of ``kind``."""
    return BUILDERS.register(kind)


def registry_path() -> Path:
    return project_dir() / "config" / "datasets.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with repeated keys refused: PyYAML keeps the last silently, DVC (which reads this
    file for ``dvc.yaml``'s ``foreach``) refuses the file."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one entry", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Read and check the registry; errors name the file and the entry."""
    path = Path(path) if path else registry_path()
    if not path.is_file():
        raise NaglError(f"dataset registry {path} not found; run nagl from the project folder "
                        f"or set NAGL_HOME to it")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise NaglError(f"{path}: not valid YAML: {error}") from error
    entries = raw.get("datasets")
    if not isinstance(entries, dict) or not entries:
        raise NaglError(f"{path}: expected a top-level 'datasets:' mapping of name -> entry")
    specs = {}
    for name, entry in entries.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise NaglError(f"{where}: names use lower-case letters, digits, '-' and '_'")
        if not isinstance(entry, dict) or "kind" not in entry or "domain" not in entry:
            raise NaglError(f"{where}: needs at least 'kind' and 'domain'")
        masks, anomaly, licence = entry.get("masks"), entry.get("anomaly", "defect"), entry.get("licence")
        if masks is not None and not isinstance(masks, bool):
            raise NaglError(f"{where}: 'masks' must be true or false, got {masks!r}")
        if anomaly not in ANOMALY_KINDS:
            raise NaglError(f"{where}: 'anomaly' must be one of {', '.join(ANOMALY_KINDS)}, got {anomaly!r}")
        if licence is not None and not isinstance(licence, str):
            raise NaglError(f"{where}: 'licence' must be a string, got {licence!r}")
        options = {k: v for k, v in entry.items() if k not in FLAG_KEYS}
        specs[name] = DatasetSpec(name=name, kind=str(entry["kind"]), domain=str(entry["domain"]),
                                  options=options, description=str(entry.get("description", "")),
                                  masks=masks, anomaly=anomaly, licence=licence)
    return specs


def get_spec(name: str, path: str | Path | None = None) -> DatasetSpec:
    specs = load_registry(path)
    if name not in specs:
        raise NaglError(f"dataset {name!r} is not in the registry {path or registry_path()}; "
                        f"known: {', '.join(sorted(specs))}")
    return specs[name]
