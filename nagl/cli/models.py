"""`nagl backbones`, `nagl weights ...` (local weight files) and `nagl cache ...` (feature cache)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()

weights_app = typer.Typer(help="Local weight files of the CLIP and DINOv2 backbones.", no_args_is_help=True)
cache_app = typer.Typer(help="The feature cache (patch features per backbone and image).", no_args_is_help=True)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def backbones() -> None:
    """Every registered backbone: input size, patch grid, feature width and where its weights come from."""
    from nagl.models.backbones import backbone_info, list_backbones

    table = Table("backbone", "image size", "grid", "dim", "layers", "weights", title="backbones")
    for name in list_backbones():
        info = backbone_info(name)
        table.add_row(name, str(info["image_size"]), f"{info['grid'][0]}x{info['grid'][1]}", str(info["dim"]),
                      info["variant"] or "-", info["weights"])
    console.print(table)


@weights_app.command("list")
def weights_list() -> None:
    """Each backbone's expected weights file, whether it is there, and its sha256."""
    from nagl.models.backbones import managed_weights, weight_status

    table = Table("backbone", "expected file", "present", "sha256", "otherwise loads", title="weights")
    for name in managed_weights():
        status = weight_status(name)
        table.add_row(name, str(status.expected), "yes" if status.present else "no", status.sha256 or "-",
                      str(status.found_elsewhere) if status.found_elsewhere else "-")
    console.print(table)


@weights_app.command("fetch")
def weights_fetch(name: str = typer.Argument(..., help="backbone name, see `nagl weights list`")) -> None:
    """Download NAME's weights (needs network) and save them to the expected file."""
    from nagl.models.backbones import fetch_weights

    path = fetch_weights(name)
    console.print(f"saved {path}")


@weights_app.command("import")
def weights_import(
    name: str = typer.Argument(..., help="backbone name, see `nagl weights list`"),
    file: Path = typer.Argument(..., help="a checkpoint you have (safetensors or a PyTorch state dict)"),
) -> None:
    """Check that FILE loads into backbone NAME and save it to the expected file."""
    from nagl.models.backbones import import_weights

    path = import_weights(name, file)
    console.print(f"saved {path}")


@cache_app.command("info")
def cache_info(root: Path | None = typer.Option(None, help="cache root (default: <cache dir>/features)")) -> None:
    """Key spaces of the feature cache, with their images and disk usage."""
    from nagl.models.cache import cache_summary, default_root

    rows = cache_summary(root)
    table = Table("key", "backbone", "identity", "images", "size", title=f"feature cache {root or default_root()}")
    for row in rows:
        table.add_row(row["key"], row["backbone"], row["identity"], str(row["images"]), _human(row["bytes"]))
    console.print(table)
    console.print(f"total: {sum(r['images'] for r in rows)} images, {_human(sum(r['bytes'] for r in rows))}")


@cache_app.command("clear")
def cache_clear(
    backbone: str | None = typer.Option(None, help="clear only this backbone's features"),
    root: Path | None = typer.Option(None, help="cache root (default: <cache dir>/features)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Delete cached features (all, or one backbone's). Not while features are being computed."""
    from nagl.models.cache import clear_cache, default_root

    what = f"{backbone}'s cached features" if backbone else "all cached features"
    if not yes:
        typer.confirm(f"delete {what} under {root or default_root()}?", abort=True)
    console.print(f"freed {_human(clear_cache(root, backbone))}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `nagl` app."""
    app.command("backbones")(backbones)
    app.add_typer(weights_app, name="weights")
    app.add_typer(cache_app, name="cache")
