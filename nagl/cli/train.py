"""`nagl` commands: train, predict."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from nagl.errors import NaglError
from nagl.training.schedule import list_profiles

console = Console(stderr=True)


def _shots(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NaglError(f"--normal-shots {text!r}: give whole numbers separated by commas, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise NaglError(f"--normal-shots {text!r}: give counts >= 1, e.g. 1,2,4 (or 1 for a one-shot model)")
    return values


def train(
    method: str = typer.Option("nagl", help="trainable method"),
    source: str = typer.Option(..., help="prepared source dataset (datasets/<name>)"),
    backbone: str = typer.Option("effnet-lite0", help="backbone whose cached features are used"),
    image_size: int | None = typer.Option(None, help="backbone input size (default: the backbone's)"),
    profile: str = typer.Option("embedded", help=f"training profile: {', '.join(list_profiles())}"),
    seed: int = typer.Option(0, help="training seed: source validation split, initial weights, episode order"),
    normal_shots: str | None = typer.Option(
        None, help="normal-shot counts drawn per episode, e.g. 1,2,4 (one model for all) or 1 (one per shot)"),
    out: Path | None = typer.Option(None, help="checkpoint folder (default results/models/METHOD/BACKBONE/SOURCE/SEED)"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """Train METHOD on the SOURCE dataset (source data only) from cached backbone features."""
    import torch

    from nagl.training.loop import train_source

    torch.set_num_threads(max(1, threads))
    shots = _shots(normal_shots)
    result = train_source(method, source, backbone=backbone, image_size=image_size, profile=profile,
                          seed=seed, overrides={"normal_shots": shots} if shots else None, out_dir=out)
    first = next((h for h in result.history if h.get("train_loss") is not None), {})
    last = result.history[-1] if result.history else {}
    console.print(f"trained {method} on {source} in {result.seconds:.1f} s "
                  f"(epoch {result.selected_epoch} kept; train loss {first.get('train_loss', float('nan')):.4f}"
                  f" -> {last.get('train_loss', float('nan')):.4f}); checkpoint: {result.checkpoint}",
                  highlight=False)


def predict(
    images: Path = typer.Option(..., help="folder of images to check"),
    normal: Path | None = typer.Option(None, help="folder of normal reference images"),
    abnormal: Path | None = typer.Option(None, help="folder of abnormal reference images"),
    abnormal_masks: Path | None = typer.Option(
        None, help="folder of their masks (<stem>.png or <stem>_mask.png; white = defect)"),
    checkpoint: Path | None = typer.Option(None, help="checkpoint folder or file from `nagl train`"),
    method: str | None = typer.Option(None, help="nagl, knn-normal or knn-naive (default: the checkpoint's, else nagl)"),
    backbone: str | None = typer.Option(None, help="backbone (default: the checkpoint's, else effnet-lite0)"),
    out: Path = typer.Option(..., help="folder for scores.csv, maps/ and predict.json"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    """Score every image in IMAGES against the references: scores.csv and heat-map overlays."""
    import torch

    from nagl.predict import predict_folder

    torch.set_num_threads(max(1, threads))
    result = predict_folder(images, normal, out, abnormal=abnormal, abnormal_masks=abnormal_masks,
                            checkpoint=checkpoint, method=method, backbone=backbone)
    console.print(f"{len(result.scores)} images scored with {result.method} ({result.backbone_identity}) "
                  f"in {result.seconds:.1f} s: {result.csv}, overlays in {result.maps}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `nagl` app."""
    app.command("train")(train)
    app.command("predict")(predict)
