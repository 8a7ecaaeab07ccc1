"""Why does trained NAGL (1 abnormal reference) lose to knn-normal across domains?

Evidence script for docs/nagl-transfer.md. Reads cached effnet-lite0 features
(``nagl.evaluate.feature_cache``) and the prepared embedded datasets; never trains on
or selects with a target domain.

    nice -n 19 .venv/bin/python benchmarks/nagl_transfer.py diag      # decomposition, existing checkpoints
    nice -n 19 .venv/bin/python benchmarks/nagl_transfer.py loco      # remedies, source-only validation
    nice -n 19 .venv/bin/python benchmarks/nagl_transfer.py posthoc   # chosen remedy on the matrix targets

Sections
- ``diag``: feature statistics per domain; for every (source checkpoint, target) of the
  matrix, the image AUROC of ``S``, of ``1 - s_n`` alone, of ``s_a`` alone, the spread of
  both terms (std over queries of their top-1 % image score, per-image patch range),
  the patch-level AUROC of ``s_a`` inside anomalous queries, and the same for an
  untrained head and for knn-naive's ``s_abn``. Also mask / pseudo-mask coverage.
- ``loco``: leave-one-category-out inside each SOURCE (train on 2 categories, test on
  the third with the protocol's reference splits), for the current embedded profile
  and the candidate remedies. Only these numbers pick a remedy.
- ``posthoc``: the remedy fixed by ``loco``, trained on each full source, scored on the
  matrix's cross-domain targets. Reported, not used for any choice.

All figures are printed; nothing is asserted. 1 torch thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from nagl.data.images import load_mask
from nagl.data.layout import read_manifest
from nagl.evaluate import feature_cache
from nagl.methods import create_method, load_method
from nagl.methods.base import image_scores, nearest_normal, normal_scores, pool_masks, prepare_references
from nagl.methods.nagl import _abnormal_tokens, abnormal_guided
from nagl.models.backbones import create_backbone
from nagl.protocol import draw_reference_split
from nagl.settings import datasets_dir, results_dir

DOMAINS = ["embedded-textures", "embedded-medical", "embedded-objects"]
SHOTS = (1, 2, 4)
SEEDS = (0, 1, 2)
SIZE = 256
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data --

class Domain:
    """Manifest, features (float32) and masks of one prepared dataset."""

    def __init__(self, name: str, cache):
        self.name = name
        self.dir = datasets_dir() / name
        self.manifest = read_manifest(self.dir)
        self.features = cache.load(list(self.manifest["image_sha256"])).float()
        self.row = {p: i for i, p in enumerate(self.manifest["image_path"])}

    def feats(self, frame) -> torch.Tensor:
        return self.features[[self.row[p] for p in frame["image_path"]]]

    def masks(self, frame, size: int = SIZE) -> torch.Tensor:
        return torch.from_numpy(np.stack([load_mask(self.dir / p if isinstance(p, str) else None, size)
                                          for p in frame["mask_path"]]))


def load_domains() -> dict[str, Domain]:
    backbone = create_backbone("effnet-lite0", SIZE)
    cache = feature_cache(backbone)
    return {name: Domain(name, cache) for name in DOMAINS}


def auroc(labels, scores) -> float:
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def top1(maps: torch.Tensor) -> np.ndarray:
    """The shared image score (mean of the top 1 % patches) of ``(Q, G)`` maps."""
    return image_scores(maps[:, None, :]).numpy().astype(np.float64)


# ------------------------------------------------------- the two terms --

def s_a_maps(method, query: torch.Tensor, refs, grid, r_q: torch.Tensor) -> torch.Tensor:
    """``s_a`` ``(Q, G)`` exactly as ``NaglMethod.score`` computes it (r_q precomputed)."""
    pos = method.position(grid)
    keys, values, allowed = _abnormal_tokens(refs, pos)
    proxies = method.head.residual_proxies(keys[None], values[None], allowed[None])
    out = []
    for part, rq in zip(query.split(16), r_q.split(16), strict=False):
        anomaly = method.head.anomaly_proxies(proxies.expand(part.shape[0], -1, -1), rq + pos, part)
        out.append(abnormal_guided(part, anomaly))
    return torch.cat(out)


def cells(domain: Domain, categories=None, seeds=SEEDS):
    """The protocol's reference splits of a domain: (category, seed, split)."""
    for category in sorted(categories or domain.manifest["category"].unique()):
        for seed in seeds:
            yield category, seed, draw_reference_split(domain.manifest, domain.name, category, seed, max(SHOTS), 1)


@torch.no_grad()
def decompose(domain: Domain, heads: dict, categories=None, shots=SHOTS) -> dict:
    """Per (head, k_normal): lists over cells of AUROCs and spreads of the two terms."""
    grid = (32, 32)
    out: dict = {}
    for _category, _seed, split in cells(domain, categories):
        query = domain.feats(split.queries)
        labels = split.queries["label"].to_numpy()
        qmask = pool_masks(domain.masks(split.queries), grid)  # (Q, G)
        abnormal = domain.feats(split.abnormal)
        amask = domain.masks(split.abnormal)
        for k in shots:
            refs = prepare_references(domain.feats(split.normal)[:k], abnormal, amask, grid)
            s_n = normal_scores(query, refs.bank)
            _, r_q = nearest_normal(query.reshape(-1, query.shape[-1]), refs.bank)
            r_q = r_q.reshape(query.shape)
            base = 1.0 - s_n
            s_abn = normal_scores(query, refs.abnormal[refs.patch_mask])
            terms = {"knn-normal": (base, None), "knn-naive": (base, s_abn)}
            for name, method in heads.items():
                terms[name] = (base, s_a_maps(method, query, refs, grid, r_q))
            for name, (b, a) in terms.items():
                row = out.setdefault((name, k), {})
                S = b if a is None else (a + b) / 2
                row.setdefault("S", []).append(auroc(labels, top1(S)))
                row.setdefault("1-s_n", []).append(auroc(labels, top1(b)))
                row.setdefault("sd_img(1-s_n)", []).append(top1(b).std())
                row.setdefault("range(1-s_n)", []).append(float((b.amax(1) - b.amin(1)).mean()))
                if a is not None:
                    row.setdefault("s_a", []).append(auroc(labels, top1(a)))
                    row.setdefault("sd_img(s_a)", []).append(top1(a).std())
                    row.setdefault("range(s_a)", []).append(float((a.amax(1) - a.amin(1)).mean()))
                    anomalous = labels == 1
                    m = qmask[anomalous].flatten().numpy()
                    row.setdefault("patch s_a", []).append(auroc(m, a[anomalous].flatten().numpy()))
                    row.setdefault("patch 1-s_n", []).append(auroc(m, b[anomalous].flatten().numpy()))
                    # share of S's image-score variance that comes from s_a
                    ta, tb = top1(a), top1(b)
                    row.setdefault("corr", []).append(float(np.corrcoef(ta, tb)[0, 1]))
    return out


def mean(values) -> float:
    return float(np.nanmean(values))


def print_rows(title: str, table: dict, columns: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'term / k_normal':<34}" + "".join(f"{c:>14}" for c in columns))
    for (name, k), row in table.items():
        print(f"{name + f'  k{k}':<34}" + "".join(f"{mean(row[c]) if c in row else float('nan'):>14.3f}"
                                                for c in columns))


# ------------------------------------------------------------ sections --

def section_diag(domains: dict[str, Domain]) -> None:
    print("== feature statistics (effnet-lite0, 32x32, C=152) ==")
    for d in domains.values():
        f = d.features
        x = F.normalize(f[::7].reshape(-1, f.shape[-1])[::13], dim=-1)
        cos = x @ x.T
        print(f"{d.name:<20} share of negative values {float((f < 0).float().mean()):.3f}  "
              f"random patch-pair cos mean {float(cos.mean()):.3f} sd {float(cos.std()):.3f}")

    print("\n== reference masks at test time (k_abnormal = 1, image_size 256 -> 32x32) ==")
    for d in domains.values():
        counts, pseudo, pix = [], 0, []
        for _category, _seed, split in cells(d):
            m = d.masks(split.abnormal)
            pooled = pool_masks(m, (32, 32))
            counts.append(int(pooled.sum()))
            pix.append(float(m.float().mean()))
            pseudo += int(pooled.sum() == 0)
        print(f"{d.name:<20} abnormal patches per reference: mean {np.mean(counts):.1f} "
              f"(min {min(counts)}, max {max(counts)}) of 1024; mask pixel share {np.mean(pix):.3f}; "
              f"pseudo-masks {pseudo}/{len(counts)}")

    columns = ["S", "1-s_n", "s_a", "sd_img(1-s_n)", "sd_img(s_a)", "range(1-s_n)", "range(s_a)",
               "patch 1-s_n", "patch s_a", "corr"]
    models = results_dir() / "models" / "nagl" / "effnet-lite0"
    untrained = create_method("nagl", 152, seed=0)
    for target, d in domains.items():
        heads = {f"nagl<-{s.split('-')[1]}": load_method(models / s) for s in DOMAINS}
        heads["nagl untrained"] = untrained
        start = time.perf_counter()
        table = decompose(d, heads)
        print_rows(f"== target {target} (3 categories x 3 seeds, k_abnormal 1; means over cells; "
                   f"{time.perf_counter() - start:.0f} s) ==", table, columns)


LAMBDAS = (0.0, 0.25, 0.5, 1.0)
CONFIGS = {"lr1e-3 (embedded)": {}, "lr1e-4": {"lr": 1e-4}}


@torch.no_grad()
def heldout_auroc(method, domain: Domain, category: str, shots=(1, 4)) -> dict[float, float]:
    """Image AUROC of ``1 - s_n + lam * s_a`` on one held-out SOURCE category (protocol splits,
    seeds 0-2, k_abnormal 1), mean over seeds and shots, for every ``lam`` in LAMBDAS
    (``lam = 1`` ranks exactly like NAGL's ``S``, ``lam = 0`` is knn-normal)."""
    grid = (32, 32)
    scores: dict[float, list[float]] = {lam: [] for lam in LAMBDAS}
    for _, _seed, split in cells(domain, [category]):
        query = domain.feats(split.queries)
        labels = split.queries["label"].to_numpy()
        for k in shots:
            refs = prepare_references(domain.feats(split.normal)[:k], domain.feats(split.abnormal),
                                      domain.masks(split.abnormal), grid)
            s_n = normal_scores(query, refs.bank)
            _, r_q = nearest_normal(query.reshape(-1, query.shape[-1]), refs.bank)
            a = s_a_maps(method, query, refs, grid, r_q.reshape(query.shape))
            for lam in LAMBDAS:
                scores[lam].append(auroc(labels, top1(1.0 - s_n + lam * a)))
    return {lam: float(np.mean(v)) for lam, v in scores.items()}


def train_curve(domain: Domain, categories: list[str], overrides: dict, seed: int = 0,
                heldout: str | None = None):
    """The embedded profile's training (``nagl.training.loop``) on ``categories`` of a
    source, keeping every epoch's weights; per epoch the in-source validation loss /
    AUROC (as recorded by the loop) and, with ``heldout``, the held-out category's AUROCs."""
    import copy

    from nagl.training.loop import train_on_source

    manifest = domain.manifest
    lookup = {sha: domain.features[domain.row[p]]
              for sha, p in zip(manifest["image_sha256"], manifest["image_path"], strict=False)}
    extra: dict[int, dict] = {}

    def record(epoch, model):
        extra[epoch] = {"state": copy.deepcopy(model.trainable_module().state_dict())}
        if heldout:
            extra[epoch]["heldout"] = heldout_auroc(model, domain, heldout)

    # select 'last': the returned model is the last epoch's; every epoch's state is kept.
    result = train_on_source(domain.dir, lookup, backbone_identity="effnet-lite0", profile="embedded",
                             seed=seed, grid=(32, 32), overrides={**overrides, "select": "last"},
                             categories=categories, on_epoch=record, progress=False)
    history = [{"epoch": row["epoch"], "val_loss": row["val_loss"], "val_auroc": row["val_auroc"],
                **extra[row["epoch"]]} for row in result.history]
    return result.method, history


def select(history, rule: str) -> dict:
    if rule == "val-loss":  # what the embedded profile does
        return min(history[1:], key=lambda r: r["val_loss"])
    return history[-1]


def section_loco(domains: dict[str, Domain], configs=None, out: Path | None = None) -> None:
    """Leave one SOURCE category out: train on the other two, score the third."""
    import json

    rows = []
    for source, d in domains.items():
        categories = sorted(d.manifest["category"].unique())
        for held in categories:
            for name, overrides in CONFIGS.items():
                if configs and name not in configs:
                    continue
                start = time.perf_counter()
                _, history = train_curve(d, [c for c in categories if c != held], overrides, heldout=held)
                for h in history:
                    rows.append({"source": source, "heldout": held, "config": name, "epoch": h["epoch"],
                                 "val_loss": h["val_loss"], "val_auroc": h["val_auroc"],
                                 **{f"lam{lam}": v for lam, v in h["heldout"].items()}})
                print(f"{source} held-out {held:<11} {name:<18} {time.perf_counter() - start:.0f} s  "
                      + "  ".join(f"e{h['epoch']}:{h['heldout'][1.0]:.2f}/{h['val_loss']:.3f}" for h in history),
                      flush=True)
    if out:
        Path(out).write_text(json.dumps(rows))
    summarise_loco(rows)


def summarise_loco(rows) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    print("\n== held-out-category image AUROC by epoch (mean of 3 folds; S = 1 - s_n + s_a, i.e. lam 1) ==")
    print(frame.pivot_table(index=["source", "config"], columns="epoch", values="lam1.0").round(3).to_string())
    print("\n== in-source validation loss by epoch (what the embedded profile selects on) ==")
    print(frame.pivot_table(index=["source", "config"], columns="epoch", values="val_loss").round(3).to_string())
    print("\n== held-out AUROC of 1 - s_n + lam * s_a at the checkpoint each rule selects (mean of folds) ==")
    picked = []
    for (source, held, config), g in frame.groupby(["source", "heldout", "config"]):
        g = g.sort_values("epoch")
        for rule in ("val-loss", "last"):
            r = g.iloc[1:].loc[g.iloc[1:]["val_loss"].idxmin()] if rule == "val-loss" else g.iloc[-1]
            picked.append({"source": source, "heldout": held, "config": config, "rule": rule,
                           "epoch": int(r["epoch"]), **{f"lam{lam}": r[f"lam{lam}"] for lam in LAMBDAS}})
    picked = pd.DataFrame(picked)
    print(picked.groupby(["source", "config", "rule"])[[f"lam{lam}" for lam in LAMBDAS]].mean().round(3).to_string())
    print("\nper fold:")
    print(picked.round(3).to_string(index=False))


def section_posthoc(domains: dict[str, Domain], config: str, rule: str) -> None:
    """POST-HOC report, not used for any choice: train on each full source with the
    config / selection rule fixed by ``loco``, score every cross-domain target
    (all categories, seeds 0-2, k_normal 1/2/4, k_abnormal 1) for every lam."""
    print(f"== POST-HOC cross-domain image AUROC: config {config}, selection {rule} ==")
    print(f"{'source -> target':<40}{'k':>3}" + "".join(f"{'lam ' + str(lam):>11}" for lam in LAMBDAS))
    totals: dict = {}
    for source, d in domains.items():
        model, history = train_curve(d, sorted(d.manifest["category"].unique()), CONFIGS[config])
        chosen = select(history, rule)
        model.head.load_state_dict(chosen["state"])
        model.head.eval()
        for target, t in domains.items():
            if target == source:
                continue
            for k in SHOTS:
                per_cat = [heldout_auroc(model, t, c, shots=(k,))
                           for c in sorted(t.manifest["category"].unique())]
                row = {lam: float(np.mean([p[lam] for p in per_cat])) for lam in LAMBDAS}
                for lam in LAMBDAS:
                    totals.setdefault((k, lam), []).append(row[lam])
                print(f"{source + ' -> ' + target:<40}{k:>3}" + "".join(f"{row[lam]:>11.3f}" for lam in LAMBDAS)
                      + f"   (epoch {chosen['epoch']})", flush=True)
    for k in SHOTS:
        print(f"{'mean of 6 cross-domain pairs':<40}{k:>3}"
              + "".join(f"{np.mean(totals[(k, lam)]):>11.3f}" for lam in LAMBDAS))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("section", choices=["diag", "loco", "loco-summary", "posthoc"])
    parser.add_argument("--config", action="append", help="loco: only these CONFIGS (default all)")
    parser.add_argument("--rule", default="val-loss", choices=["val-loss", "last"], help="posthoc: checkpoint rule")
    parser.add_argument("--out", action="append", help="loco: write rows (JSON) here; loco-summary: read these")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.section == "loco-summary":
        import json

        summarise_loco([row for path in args.out for row in json.loads(Path(path).read_text())])
        return
    domains = load_domains()
    if args.section == "loco":
        section_loco(domains, args.config, Path(args.out[0]) if args.out else None)
    else:
        if args.section == "diag":
            section_diag(domains)
        else:
            section_posthoc(domains, args.config[0], args.rule)


if __name__ == "__main__":
    main()
