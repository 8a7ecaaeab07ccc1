"""A small but realistic results database for the report tests.

It is built the way the ingest step builds the real one: by executing
``nagl/results/schema.sql`` and inserting rows. Three methods (``nagl``,
trained once per source dataset, and the training-free ``knn-normal`` and
``knn-naive`` with source ``-``), three embedded target datasets with two or
three categories each, shot settings k_normal {1, 2, 4} x k_abnormal {0, 1},
three seeds. In-domain cells (source == target) are present and score clearly
higher, so a report that wrongly averages them in gets different numbers. One
target has no masks: its pixel metrics are NULL. Names carry ``<b>&"`` to
exercise escaping, and the config text carries ``</script>``.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from PIL import Image

import nagl.results
from nagl.io import stable_hash

SCHEMA = Path(nagl.results.__file__).with_name("schema.sql")

BACKBONE = "effnet-lite0"
BACKBONE_IDENTITY = "effnet-lite0@224:0123456789abcdef"
TRAINABLE = "nagl"
METHODS = ("nagl", "knn-normal", "knn-naive")

ODD_TARGET = 'emb-<b>&"metal'
NO_MASK_TARGET = "emb-xray"
TARGETS = {
    "emb-fabric": ["knit", 'weave<b>&"'],
    ODD_TARGET: ["bolt", "plate", "screw"],
    NO_MASK_TARGET: ["chest", "hand"],
}
DOMAINS = {"emb-fabric": "industrial-texture", ODD_TARGET: "objects", NO_MASK_TARGET: "medical-xray"}
DEFECTS = ('crack<b>&"', "stain")
K_NORMAL = (1, 2, 4)
K_ABNORMAL = (0, 1)
SEEDS = (0, 1, 2)
GALLERY_SHOTS = ((1, 0), (4, 1))
GIT_COMMIT = "c677bde0000000000000000000000000000000aa"
CONFIG_TEXT = (
    "# benchmark config\n"
    "methods: [nagl, knn-normal, knn-naive]\n"
    'note: "</script><script>alert(1)</script> <b>bold</b> & more"\n'
)
CREATED_AT = dt.datetime(2025, 6, 1, 12, 0, 0)

_METHOD_BASE = {"nagl": 0.84, "knn-normal": 0.78, "knn-naive": 0.74}
_ABNORMAL_GAIN = {"nagl": 0.05, "knn-normal": 0.0, "knn-naive": 0.015}
_TARGET_OFFSET = {"emb-fabric": 0.02, ODD_TARGET: -0.03, NO_MASK_TARGET: 0.0}
_IMAGES_PER_SECOND = {"nagl": 140.0, "knn-normal": 420.0, "knn-naive": 455.0}
_HEAD_PARAMS = 1_234_567
_BACKBONE_PARAMS = 3_371_304


def dataset_hash(name: str) -> str:
    return stable_hash(("dataset", name), 32)


def sources(method: str) -> list[str]:
    return list(TARGETS) if method == TRAINABLE else ["-"]


def same_as_knn_normal(method: str, k_abnormal: int) -> bool:
    """As in the real methods: with no abnormal reference nagl and knn-naive are knn-normal,
    and knn-normal ignores abnormal references; these cells hold knn-normal's exact numbers."""
    return method == "knn-normal" or k_abnormal == 0


def _knn_normal_value(target: str, category: str, c_index: int, k_normal: int, seed: int) -> float:
    noise = np.random.default_rng(int(stable_hash((target, category, k_normal, seed), 8), 16)).normal(0, 0.012)
    value = (_METHOD_BASE["knn-normal"] + 0.02 * math.log2(k_normal) + _TARGET_OFFSET[target]
             - 0.01 * c_index + noise)
    return float(min(max(value, 0.5), 0.995))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _query_png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 200, size, dtype=np.float64)
    base = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
    noise = rng.normal(0, 12, size=base.shape)
    return _png(np.clip(base + noise, 0, 255).astype(np.uint8))


def _mask_png(label: int, size: int = 24) -> bytes:
    mask = np.zeros((size, size), dtype=np.uint8)
    if label:
        mask[8:15, 10:18] = 255
    return _png(mask)


def _map_png(label: int, strength: float, size: int = 24) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size]
    blob = np.exp(-((yy - 11) ** 2 + (xx - 14) ** 2) / 18.0) * (strength if label else 0.2)
    heat = np.clip(blob * 255, 0, 255).astype(np.uint8)
    return _png(np.stack([heat, np.zeros_like(heat), 255 - heat], axis=-1))


def _gallery_queries(category: str) -> list[tuple[str, int]]:
    anomalous = [(f"{category}/test/{defect}/000.png", 1) for defect in DEFECTS]
    return anomalous + [(f"{category}/test/good/000.png", 0)]


def build_results_db(path: str | Path) -> Path:
    """Write the fixture database to ``path`` (which must not exist) and return it."""
    path = Path(path)
    rng = np.random.default_rng(20250601)
    runs, metrics, scores, gallery = [], [], [], []
    for method in METHODS:
        for source in sources(method):
            for target, categories in TARGETS.items():
                in_domain = source == target
                for c_index, category in enumerate(categories):
                    for k_normal in K_NORMAL:
                        for k_abnormal in K_ABNORMAL:
                            for seed in SEEDS:
                                key = (method, BACKBONE, source, target, category, k_normal, k_abnormal, seed)
                                run_id = stable_hash(key, 24)
                                if same_as_knn_normal(method, k_abnormal):
                                    value = _knn_normal_value(target, category, c_index, k_normal, seed)
                                else:
                                    value = (_METHOD_BASE[method] + 0.02 * math.log2(k_normal)
                                             + _ABNORMAL_GAIN[method] * k_abnormal
                                             + (0.06 if in_domain else 0.0) + _TARGET_OFFSET[target]
                                             - 0.01 * c_index + rng.normal(0, 0.012))
                                    value = float(min(max(value, 0.5), 0.995))
                                runs.append(_run_row(run_id, key, in_domain))
                                metrics.extend(_metric_rows(run_id, value, target != NO_MASK_TARGET))
                                for q, (image_path, label) in enumerate(_gallery_queries(category)):
                                    scores.append({"run_id": run_id, "image_path": image_path,
                                                   "defect_type": image_path.split("/")[2],
                                                   "label": label, "score": round(value * (0.6 + 0.4 * label) + 0.01 * q, 6)})
                                if c_index == 0 and seed == 0 and (k_normal, k_abnormal) in GALLERY_SHOTS:
                                    gallery.extend(_gallery_rows(run_id, category, target, value))
    with duckdb.connect(str(path)) as con:
        con.execute(SCHEMA.read_text(encoding="utf-8"))
        _insert(con, "runs", pd.DataFrame(runs))
        _insert(con, "metrics", pd.DataFrame(metrics))
        _insert(con, "scores", pd.DataFrame(scores))
        _insert(con, "gallery", pd.DataFrame(gallery))
        _insert(con, "reference_splits", pd.DataFrame(_split_rows()))
        _insert(con, "models", pd.DataFrame(_model_rows()))
        _insert(con, "datasets", pd.DataFrame(_dataset_rows()))
        _insert(con, "provenance", pd.DataFrame(_provenance_rows()))
    return path


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    con.register("frame", frame)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM frame")
    con.unregister("frame")


def _run_row(run_id: str, key: tuple, in_domain: bool) -> dict:
    method, backbone, source, target, category, k_normal, k_abnormal, seed = key
    trained = method == TRAINABLE
    speed = _IMAGES_PER_SECOND[method] / (1 + 0.08 * (k_normal + k_abnormal))
    return {
        "run_id": run_id, "method": method, "backbone": backbone,
        "backbone_identity": BACKBONE_IDENTITY, "source": source, "target": target,
        "category": category, "k_normal": k_normal, "k_abnormal": k_abnormal, "seed": seed,
        "in_domain": in_domain, "image_size": 224, "eval_resolution": 256,
        "n_queries": 40 - k_abnormal, "n_anomalous_queries": 20 - k_abnormal,
        "n_pseudo_masks": k_abnormal if target == NO_MASK_TARGET else 0,
        "alias_of": None,
        "config_hash": stable_hash(("config",)), "method_config_hash": stable_hash(("method", method)),
        "checkpoint_hash": stable_hash(("checkpoint", source)) if trained else None,
        "source_dataset_hash": dataset_hash(source) if trained else None,
        "source_datasets": [source] if trained else None,
        "target_dataset_hash": dataset_hash(target),
        "split_hash": stable_hash(("split", target, category, seed)),
        "git_commit": GIT_COMMIT, "nagl_version": "0.1.0", "torch_version": "2.14.1",
        "python_version": "3.11.9",
        "train_seconds": _train_seconds(source) if trained else None,
        "eval_seconds": round(40 / speed, 4), "images_per_second": round(speed, 3),
        "created_at": CREATED_AT,
        "protocol": "clean",
    }


def _metric_rows(run_id: str, value: float, has_masks: bool) -> list[dict]:
    image = {"auroc": value, "ap": value - 0.05, "f1max": value - 0.12}
    pixel = {"auroc": min(value + 0.04, 0.999), "ap": value - 0.4, "f1max": value - 0.35, "aupro": value - 0.09}
    rows = [{"run_id": run_id, "level": "image", "metric": name, "value": v} for name, v in image.items()]
    rows += [{"run_id": run_id, "level": "pixel", "metric": name, "value": v if has_masks else None}
             for name, v in pixel.items()]
    return rows


def _gallery_rows(run_id: str, category: str, target: str, value: float) -> list[dict]:
    rows = []
    for q, (image_path, label) in enumerate(_gallery_queries(category)):
        rows.append({
            "run_id": run_id, "image_path": image_path, "label": label,
            "image_png": _query_png(q + 7 * len(category)),
            "mask_png": _mask_png(label) if target != NO_MASK_TARGET else None,
            "map_png": _map_png(label, value),
        })
    return rows


def _split_rows() -> list[dict]:
    rows = []
    for target, categories in TARGETS.items():
        for category in categories:
            for seed in SEEDS:
                split_hash = stable_hash(("split", target, category, seed))
                for position in range(max(K_NORMAL)):
                    rows.append({"split_hash": split_hash, "target": target, "category": category,
                                 "seed": seed, "role": "normal", "position": position,
                                 "image_path": f"{category}/train/good/{position + 10 * seed:03d}.png",
                                 "image_sha256": stable_hash((target, category, seed, position), 64),
                                 "mask_path": None})
                rows.append({"split_hash": split_hash, "target": target, "category": category,
                             "seed": seed, "role": "abnormal", "position": 0,
                             "image_path": f"{category}/test/stain/{100 + seed:03d}.png",
                             "image_sha256": stable_hash((target, category, seed, "abnormal"), 64),
                             "mask_path": (f"{category}/ground_truth/stain/{100 + seed:03d}_mask.png"
                                           if target != NO_MASK_TARGET else None)})
    return rows


def _train_seconds(source: str) -> float:
    return 300.0 + 45.0 * list(TARGETS).index(source)


def _model_rows() -> list[dict]:
    rows = []
    for method in METHODS:
        for source in sources(method):
            trained = method == TRAINABLE
            rows.append({
                "method": method, "backbone": BACKBONE, "source": source,
                "checkpoint_hash": stable_hash(("checkpoint", source)) if trained else None,
                "training_profile": "default" if trained else None,
                "params_total": _BACKBONE_PARAMS + (_HEAD_PARAMS if trained else 0),
                "params_trainable": _HEAD_PARAMS if trained else 0,
                "train_seconds": _train_seconds(source) if trained else None,
                "source_dataset_hash": dataset_hash(source) if trained else None,
            })
    return rows


def _dataset_rows() -> list[dict]:
    return [{"name": name, "domain": DOMAINS[name], "content_hash": dataset_hash(name),
             "n_categories": len(categories), "n_images": 60 * len(categories),
             "n_anomalous": 20 * len(categories), "has_masks": name != NO_MASK_TARGET,
             "anomaly": "defect", "licence": None}
            for name, categories in TARGETS.items()]


def _provenance_rows() -> list[dict]:
    return [
        {"key": "config", "value": CONFIG_TEXT},
        {"key": "git_commit", "value": GIT_COMMIT},
        {"key": "ingested_at", "value": "2025-06-01T12:30:00+00:00"},
        {"key": "versions.nagl", "value": "0.1.0"},
        {"key": "versions.torch", "value": "2.14.1"},
        {"key": "versions.duckdb", "value": duckdb.__version__},
    ]
