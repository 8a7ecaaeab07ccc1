"""The paper-style main table and the "what abnormal references buy" table.

Rows are methods, columns are target datasets grouped by domain, one block per
number of normal references. Each cell is the cross-domain value of a target
(per seed: the category macro-average, averaged over the sources the method was
not trained on) as mean ± sd over seeds. Everything is computed here from
per-seed values read with SQL, so the group means, the spread and the
abnormal-minus-normal differences all come from the same numbers.

Rows whose evaluation cells hold identical metrics are the same computation
(e.g. ``nagl`` with no abnormal reference is ``knn-normal``); they are shown
once, labelled with every name they stand for. This is decided from the data,
never from method names.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import mean, stdev

import duckdb

from nagl.report.format import MISSING
from nagl.report.sql import clean_protocol, column_names

# The domain groups of the main table, in column order; any other group follows.
DOMAIN_GROUPS = ("industrial", "medical", "semantic")

# (level, metric) -> label: the metrics the main table can show.
TABLE_METRICS = {
    ("image", "auroc"): "Image AUROC",
    ("pixel", "auroc"): "Pixel AUROC",
    ("pixel", "aupro"): "AUPRO@0.3",
}

MethodKey = tuple[str, str]  # (method, backbone)
SeedKey = tuple[int | None, int]  # (train_seed or None, reference seed)


def domain_group(domain: str) -> str:
    """The main table's column group of a ``datasets.domain`` value (the one place this is decided)."""
    if domain == "objects" or domain.startswith("industrial"):
        return "industrial"
    if domain.startswith("medical"):
        return "medical"
    if domain.startswith("semantic"):
        return "semantic"
    return domain


@dataclass(frozen=True)
class Stat:
    """Mean over seeds with its spread; ``sd_train`` only where training seeds exist."""

    mean: float | None
    sd_ref: float | None = None  # over reference draws (seeds)
    sd_train: float | None = None  # over training seeds
    n_ref: int = 0
    n_train: int = 0
    n_categories: int = 0
    n_targets: int = 0

    def text(self, digits: int = 3, signed: bool = False) -> str:
        if self.mean is None:
            return MISSING
        sign = "+" if signed else ""
        text = f"{self.mean:{sign}.{digits}f}"
        if self.sd_ref is not None:
            text += f" ± {self.sd_ref:.{digits}f}"
        if self.sd_train is not None:
            text += f" (train ± {self.sd_train:.{digits}f})"
        return text

    def counts(self) -> str:
        if self.mean is None:
            return "no values"
        parts = [f"{self.n_ref} reference seeds"]
        if self.n_train:
            parts.append(f"{self.n_train} training seeds")
        if self.n_categories:
            parts.append(f"{self.n_categories} categories")
        if self.n_targets:
            parts.append(f"{self.n_targets} targets")
        return ", ".join(parts)


def summarize(values: dict[SeedKey, float | None], n_categories: int = 0, n_targets: int = 0) -> Stat:
    """Mean ± sd of per-seed values, separating training seeds from reference draws.

    Without training seeds (``None``) the sd is over reference seeds. With them,
    ``sd_train`` is the sd over training seeds of the per-training-seed means and
    ``sd_ref`` the mean over training seeds of the sd over reference draws.
    """
    present = {key: v for key, v in values.items() if v is not None}
    if not present:
        return Stat(None)
    by_train: dict[int | None, list[float]] = defaultdict(list)
    for (train_seed, _), value in sorted(present.items(), key=lambda item: (item[0][0] is None, item[0])):
        by_train[train_seed].append(value)
    ref_seeds = {seed for _, seed in present}
    trained = [t for t in by_train if t is not None]
    if not trained:
        runs = by_train[None]
        return Stat(mean(runs), stdev(runs) if len(runs) > 1 else None, None, len(runs), 0, n_categories, n_targets)
    train_means = [mean(by_train[t]) for t in trained]
    ref_sds = [stdev(by_train[t]) for t in trained if len(by_train[t]) > 1]
    return Stat(mean(train_means), mean(ref_sds) if ref_sds else None,
                stdev(train_means) if len(train_means) > 1 else None,
                len(ref_seeds), len(trained), n_categories, n_targets)


@dataclass
class Column:
    target: str
    group: str
    n_categories: int


@dataclass
class TableRow:
    label: str
    training: str  # "training-free" | "trained"
    references: str  # "normal only" | "normal + abnormal"
    members: list[tuple[str, str, int]]  # (method, backbone, k_abnormal) this row stands for
    cells: dict[str, Stat] = field(default_factory=dict)  # target -> value
    in_domain: set[str] = field(default_factory=set)  # targets whose in-domain cells were left out
    mean: Stat = field(default_factory=lambda: Stat(None))
    best: dict[str, int] = field(default_factory=dict)  # column -> 1 (best) or 2 (second); "" is the mean


@dataclass
class Block:
    k_normal: int
    rows: list[TableRow]


@dataclass
class MainTable:
    metric: tuple[str, str]
    label: str
    columns: list[Column]
    blocks: list[Block]
    backbones: list[str]

    @property
    def groups(self) -> list[tuple[str, list[Column]]]:
        grouped: dict[str, list[Column]] = defaultdict(list)
        for column in self.columns:
            grouped[column.group].append(column)
        return [(name, grouped[name]) for name in dict.fromkeys(c.group for c in self.columns)]


@dataclass
class GainRow:
    """What ``k_abnormal`` abnormal references add to a method over none, at one k_normal."""

    method: str
    backbone: str
    k_normal: int
    k_abnormal: int
    cells: dict[str, Stat]
    mean: Stat


# ------------------------------------------------------------------ reading --

class SeedValues:
    """Cross-domain per-seed values of one metric, per (method, backbone, k_normal, k_abnormal, target)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, level: str, metric: str) -> None:
        train_seed = "r.train_seed" if "train_seed" in column_names(con, "runs") else "NULL::INTEGER"
        clean = clean_protocol(con)
        rows = con.execute(f"""
            WITH per_source AS (
                SELECT r.method, r.backbone, r.source, r.target, r.k_normal, r.k_abnormal,
                       {train_seed} AS train_seed, r.seed,
                       AVG(m.value) AS value, COUNT(m.value) AS n_categories
                FROM runs r JOIN metrics m USING (run_id)
                WHERE NOT r.in_domain AND m.level = ? AND m.metric = ? {clean}
                GROUP BY ALL)
            SELECT method, backbone, k_normal, k_abnormal, target, train_seed, seed,
                   AVG(value) AS value, MAX(n_categories) AS n_categories
            FROM per_source GROUP BY ALL ORDER BY ALL""", [level, metric]).fetchall()
        self.values: dict[tuple, dict[SeedKey, float | None]] = defaultdict(dict)
        self.n_categories: dict[tuple, int] = defaultdict(int)
        for method, backbone, k_normal, k_abnormal, target, train_seed, seed, value, n_categories in rows:
            key = (method, backbone, k_normal, k_abnormal, target)
            self.values[key][(train_seed, seed)] = value if value is None or math.isfinite(value) else None
            self.n_categories[key] = max(self.n_categories[key], n_categories)

    def cell(self, key: tuple) -> Stat:
        return summarize(self.values.get(key, {}), self.n_categories.get(key, 0), 1)

    def average(self, head: tuple, targets: list[str]) -> Stat:
        """Per seed, the mean over ``targets`` that have a value; then mean ± sd over seeds."""
        per_seed: dict[SeedKey, list[float]] = defaultdict(list)
        n_categories, n_targets = 0, 0
        for target in targets:
            values = {k: v for k, v in self.values.get((*head, target), {}).items() if v is not None}
            if values:
                n_targets += 1
                n_categories += self.n_categories[(*head, target)]
            for seed_key, value in values.items():
                per_seed[seed_key].append(value)
        return summarize({k: mean(v) for k, v in per_seed.items()}, n_categories, n_targets)

    def difference(self, head: tuple, base: tuple, targets: list[str]) -> Stat:
        """``head`` minus ``base`` paired by seed, averaged over ``targets`` as in :meth:`average`."""
        per_seed: dict[SeedKey, list[float]] = defaultdict(list)
        n_targets = 0
        for target in targets:
            with_refs = self.values.get((*head, target), {})
            without = self.values.get((*base, target), {})
            pairs = {k: with_refs[k] - without[k] for k in with_refs
                     if with_refs[k] is not None and without.get(k) is not None}
            n_targets += bool(pairs)
            for seed_key, value in pairs.items():
                per_seed[seed_key].append(value)
        return summarize({k: mean(v) for k, v in per_seed.items()}, 0, n_targets)


def _signatures(con: duckdb.DuckDBPyConnection) -> dict[tuple, tuple]:
    """Per (method, backbone, k_normal, k_abnormal): every cross-domain cell metric, as a comparable tuple.

    For each (target, category, seed, metric) the distinct values over the
    method's cross-domain sources and training seeds: a trained method whose sources
    and training seeds all give the same numbers (e.g. one that ignores its weights
    without abnormal references) matches a training-free method with those numbers.
    """
    rows = con.execute(f"""
        SELECT r.method, r.backbone, r.k_normal, r.k_abnormal, r.target, r.category, r.seed,
               m.level, m.metric,
               list_sort(list_distinct(list(COALESCE(CAST(m.value AS VARCHAR), 'NULL')))) AS vals
        FROM runs r JOIN metrics m USING (run_id)
        WHERE NOT r.in_domain {clean_protocol(con)} GROUP BY ALL ORDER BY ALL""").fetchall()
    signatures: dict[tuple, list] = defaultdict(list)
    for method, backbone, k_normal, k_abnormal, *cell, vals in rows:
        signatures[(method, backbone, k_normal, k_abnormal)].append((*cell, tuple(vals)))
    return {key: tuple(cells) for key, cells in signatures.items()}


def _trained_methods(con: duckdb.DuckDBPyConnection) -> set[MethodKey]:
    return {(m, b) for m, b in con.execute(
        "SELECT DISTINCT method, backbone FROM runs WHERE source <> '-'").fetchall()}


def _columns(con: duckdb.DuckDBPyConnection) -> list[Column]:
    rows = con.execute("""
        SELECT r.target, COALESCE(d.domain, 'other') AS domain, COUNT(DISTINCT r.category) AS n_categories
        FROM runs r LEFT JOIN datasets d ON d.name = r.target GROUP BY ALL""").fetchall()
    columns = [Column(target, domain_group(domain), n) for target, domain, n in rows]
    order = {name: i for i, name in enumerate(DOMAIN_GROUPS)}
    return sorted(columns, key=lambda c: (order.get(c.group, len(order)), c.group, c.target))


def _alias(member: tuple[str, str, int], shown: tuple[str, str, int], multi_backbone: bool) -> str:
    method, backbone, k_abnormal = member
    if (method, backbone) == shown[:2]:
        return f"also with {k_abnormal} abnormal"
    name = f"{method} ({backbone})" if multi_backbone else method
    return f"= {name}, {k_abnormal} abnormal"


def _merge_identical(keys: list[tuple[str, str, int]], signatures: dict[tuple, tuple], k_normal: int,
                     trained: set[MethodKey], multi_backbone: bool) -> list[TableRow]:
    """One row per distinct computation among the (method, backbone, k_abnormal) of one k_normal."""
    groups: dict[tuple, list[tuple[str, str, int]]] = defaultdict(list)
    for key in keys:
        groups[signatures[(key[0], key[1], k_normal, key[2])]].append(key)
    rows = []
    for members in groups.values():
        per_method = defaultdict(int)
        for method, backbone, _ in members:
            per_method[(method, backbone)] += 1
        # The name shown: the method that is this computation in the most settings (a method that
        # ignores its abnormal references), then training-free, fewest abnormal references, name.
        members.sort(key=lambda m: (-per_method[(m[0], m[1])], (m[0], m[1]) in trained, m[2], m[0], m[1]))
        method, backbone, k_abnormal = members[0]
        label = f"{method} ({backbone})" if multi_backbone else method
        if k_abnormal:
            label += f" + {k_abnormal} abnormal"
        if len(members) > 1:
            label += " (" + "; ".join(_alias(m, members[0], multi_backbone) for m in members[1:]) + ")"
        rows.append(TableRow(label=label, members=members,
                             training="trained" if (method, backbone) in trained else "training-free",
                             references="normal + abnormal" if k_abnormal else "normal only"))
    return rows


def _in_domain_targets(con: duckdb.DuckDBPyConnection) -> dict[MethodKey, set[str]]:
    found: dict[MethodKey, set[str]] = defaultdict(set)
    for method, backbone, target in con.execute(
            "SELECT DISTINCT method, backbone, target FROM runs WHERE in_domain ORDER BY ALL").fetchall():
        found[(method, backbone)].add(target)
    return found


def _mark_best(rows: list[TableRow], columns: list[str]) -> None:
    """Bold (1) the highest mean of each column, underline (2) the second highest; ties share."""
    for column in columns:
        values = [(row.mean if column == "" else row.cells.get(column, Stat(None))).mean for row in rows]
        distinct = sorted({v for v in values if v is not None}, reverse=True)
        for row, value in zip(rows, values, strict=True):
            if value is not None and value in distinct[:2]:
                row.best[column] = distinct.index(value) + 1


ROW_GROUP_ORDER = (("training-free", "normal only"), ("training-free", "normal + abnormal"),
                   ("trained", "normal only"), ("trained", "normal + abnormal"))


def load_main_table(con: duckdb.DuckDBPyConnection, level: str = "image", metric: str = "auroc") -> MainTable:
    values = SeedValues(con, level, metric)
    signatures = _signatures(con)
    trained = _trained_methods(con)
    in_domain = _in_domain_targets(con)
    columns = _columns(con)
    targets = [c.target for c in columns]
    backbones = sorted({b for _, b, *_ in signatures})
    blocks = []
    for k_normal in sorted({k for _, _, k, _ in signatures}):
        keys = sorted((m, b, ka) for m, b, kn, ka in signatures if kn == k_normal)
        rows = _merge_identical(keys, signatures, k_normal, trained, len(backbones) > 1)
        for row in rows:
            method, backbone, k_abnormal = row.members[0]
            head = (method, backbone, k_normal, k_abnormal)
            row.cells = {t: values.cell((*head, t)) for t in targets}
            row.mean = values.average(head, targets)
            row.in_domain = in_domain.get((method, backbone), set()) & set(targets)
        rows.sort(key=lambda r: (ROW_GROUP_ORDER.index((r.training, r.references)),
                                 -(r.mean.mean if r.mean.mean is not None else -math.inf), r.label))
        _mark_best(rows, [*targets, ""])
        blocks.append(Block(k_normal, rows))
    return MainTable((level, metric), TABLE_METRICS[(level, metric)], columns, blocks, backbones)


def load_gains(con: duckdb.DuckDBPyConnection, table: MainTable) -> list[GainRow]:
    """Per method and k_normal, each k_abnormal > 0 minus 0 abnormal references, paired by seed."""
    values = SeedValues(con, *table.metric)
    targets = [c.target for c in table.columns]
    settings = sorted({key[:4] for key in values.values})
    present = set(settings)
    gains = []
    for method, backbone, k_normal, k_abnormal in settings:
        base = (method, backbone, k_normal, 0)
        if k_abnormal == 0 or base not in present:
            continue
        head = (method, backbone, k_normal, k_abnormal)
        cells = {t: values.difference(head, base, [t]) for t in targets}
        gains.append(GainRow(method, backbone, k_normal, k_abnormal, cells, values.difference(head, base, targets)))
    return gains
