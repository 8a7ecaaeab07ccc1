"""`nagl datasets ...`: list, show, missing, prepare, validate, push, pull."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from nagl.errors import NaglError

datasets_app = typer.Typer(help="Prepare, inspect and version datasets.", no_args_is_help=True)
# Piped output is not cut to 80 columns: the table is the point of `list`.
console = Console() if sys.stdout.isatty() else Console(width=200)


def _status(name: str) -> dict:
    """What `list` and `show` print about one registry entry."""
    from nagl.data import dvc
    from nagl.data.layout import read_manifest
    from nagl.data.prepare import dataset_path, is_prepared

    status = {"prepared": is_prepared(name), "dvc_hash": dvc.content_hash(name) if dvc.is_dvc_repo() else None}
    if status["prepared"]:
        manifest = read_manifest(dataset_path(name))
        status["manifest"] = manifest
    return status


@datasets_app.command("list")
def list_datasets() -> None:
    """Every dataset of the registry: flags, licence, counts, DVC content hash, prepared or not.

    ``masks`` and ``anomaly`` are the registry's flags; the counts come from the
    manifest once the dataset is prepared.
    """
    from nagl.data.registry import load_registry

    table = Table("name", "domain", "kind", "masks", "anomaly", "licence", "categories", "images", "anomalous",
                  "DVC hash", "prepared", title="datasets (config/datasets.yaml)")
    for name, spec in load_registry().items():
        status = _status(name)
        manifest = status.get("manifest")
        if manifest is not None:
            counts = [str(manifest["category"].nunique()), str(len(manifest)), str(int(manifest["label"].sum()))]
        else:
            counts = ["-", "-", "-"]
        table.add_row(name, spec.domain, spec.kind, _yes_no(spec.masks), spec.anomaly, spec.licence or "-",
                      *counts, (status["dvc_hash"] or "-")[:12], "yes" if status["prepared"] else "no")
    console.print(table)


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


@datasets_app.command("show")
def show_dataset(name: str) -> None:
    """One dataset: its registry entry and per-category, per-defect counts."""
    from nagl.data.prepare import dataset_path
    from nagl.data.registry import get_spec

    spec = get_spec(name)
    status = _status(name)
    console.print(f"[bold]{name}[/]  kind={spec.kind}  domain={spec.domain}")
    if spec.description:
        console.print(spec.description)
    console.print(f"masks: {_yes_no(spec.masks)}  anomaly: {spec.anomaly}  licence: {spec.licence or '(not stated)'}",
                  soft_wrap=True)
    console.print(f"options: {spec.options}")
    console.print(f"path: {dataset_path(name)}  prepared: {'yes' if status['prepared'] else 'no'}")
    console.print(f"DVC content hash: {status['dvc_hash'] or '(not recorded in dvc.lock)'}")
    manifest = status.get("manifest")
    if manifest is None:
        console.print(f"not prepared: run `nagl datasets prepare {name}`")
        return
    table = Table("category", "split", "defect type", "images", "with mask")
    grouped = manifest.groupby(["category", "split", "defect_type"], sort=True)
    for (category, split, defect), rows in grouped:
        table.add_row(category, split, defect, str(len(rows)), str(int(rows["mask_path"].notna().sum())))
    console.print(table)


@datasets_app.command("missing")
def missing(config: Path = typer.Option(None, "--config", help="run config (default: config/config.yaml)")) -> None:
    """The archives a run config still needs: where to place each, its size, URL and checksum.

    Datasets already prepared, or recorded in dvc.lock with the data in the DVC
    cache, need nothing; datasets built from installed packages need no archive.
    """
    from nagl.config import load_config, run_datasets
    from nagl.data.missing import needed_archives

    names = run_datasets(load_config(config))
    needs = needed_archives(names)
    if not needs:
        console.print(f"nothing to place: every dataset of the config ({', '.join(names)}) is prepared "
                      f"or built without an archive")
        return
    # Plain lines, not a table: the path, URL and checksum must never be cut short.
    for need in needs:
        how = ("manual: open the page in a browser (it needs a login or is not a file), save the archive there"
               if need.manual else "automatic where the network allows it (unset NAGL_OFFLINE), or place it by hand")
        console.print(f"{need.dataset}: {need.path.name}\n  place at: {need.path}\n  size:     {need.size_text}\n"
                      f"  checksum: {need.checksum_text}\n  get it:   {need.url or 'see docs/datasets.md'}\n"
                      f"  download: {how}", soft_wrap=True, highlight=False)
    console.print(f"{len(needs)} archive(s) missing for {len({n.dataset for n in needs})} dataset(s) "
                  f"(NAGL_DOWNLOADS sets the folder); or `dvc pull` prepared datasets from a remote that has them.",
                  soft_wrap=True, highlight=False)


@datasets_app.command("prepare")
def prepare(
    names: list[str] = typer.Argument(..., help="dataset names from config/datasets.yaml"),
    force: bool = typer.Option(False, "--force", help="rebuild even if already prepared"),
    version: bool = typer.Option(True, "--version/--no-version",
                                 help="record the dataset with DVC (dvc.lock)"),
) -> None:
    """Build (or restore from DVC), validate and version datasets."""
    from nagl.cleanup import clean_before_prepare, try_run_lock
    from nagl.data.prepare import prepare_dataset
    from nagl.settings import project_dir

    # Free lock: no run is going, so stale staging of these datasets is an interrupted prepare's.
    with try_run_lock(project_dir()) as alone:
        if alone:
            clean_before_prepare(names)
        for name in names:
            with console.status(f"preparing {name} ..."):
                result = prepare_dataset(name, force=force, version=version)
            console.print(f"{name}: {result.action} in {result.seconds:.1f} s, content hash {result.content_hash}",
                          soft_wrap=True)


@datasets_app.command("validate")
def validate(path: Path = typer.Argument(..., help="a dataset folder in the canonical layout")) -> None:
    """Check a dataset folder with the same validator every dataset goes through."""
    from nagl.data.validate import raise_if_invalid, validate_dataset

    if not path.is_dir():
        raise NaglError(f"{path} is not a folder; give the path of a dataset in the MVTec AD layout")
    problems = validate_dataset(path)
    raise_if_invalid(problems, path)
    console.print(f"{path}: valid")


@datasets_app.command("push")
def push(names: list[str] = typer.Argument(..., help="dataset names"),
         remote: str = typer.Option(None, help="DVC remote (default: the project's)")) -> None:
    """Upload the recorded versions of datasets to the DVC remote."""
    from nagl.data import dvc

    dvc.push(names, remote=remote)
    console.print(f"pushed: {', '.join(names)}")


@datasets_app.command("pull")
def pull(names: list[str] = typer.Argument(..., help="dataset names"),
         remote: str = typer.Option(None, help="DVC remote (default: the project's)")) -> None:
    """Restore the recorded versions of datasets from the DVC cache or remote."""
    from nagl.data import dvc

    dvc.pull(names, remote=remote)
    console.print(f"pulled: {', '.join(names)}")


def register(app: typer.Typer) -> None:
    """Add the `datasets` group to the `nagl` app."""
    app.add_typer(datasets_app, name="datasets")
