"""Where the platform keeps things.

Paths resolve against the project directory: ``$NAGL_HOME`` if set, else the
current working directory (Snakemake and the CLI both run from the repo root).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_dir() -> Path:
    return Path(os.environ.get("NAGL_HOME", os.getcwd())).resolve()


def datasets_dir() -> Path:
    """Prepared datasets, one folder each, versioned by DVC."""
    return Path(os.environ.get("NAGL_DATASETS", project_dir() / "datasets"))


def downloads_dir() -> Path:
    """Where source archives are downloaded to, or placed by hand when offline."""
    return Path(os.environ.get("NAGL_DOWNLOADS", project_dir() / "downloads"))


def cache_dir() -> Path:
    """Feature cache and other recomputable artefacts."""
    return Path(os.environ.get("NAGL_CACHE", project_dir() / ".cache" / "nagl"))


def weights_dir() -> Path:
    """Local model weights (CLIP, DINOv2): never fetched behind the user's back."""
    return Path(os.environ.get("NAGL_WEIGHTS", Path.home() / ".cache" / "nagl" / "weights"))


def results_dir() -> Path:
    return Path(os.environ.get("NAGL_RESULTS", project_dir() / "results"))
