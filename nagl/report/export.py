"""The main table as LaTeX (booktabs) and CSV: what researchers paste into a paper.

Same rows, columns, bold/underline and in-domain marks as the HTML main table
(:mod:`nagl.report.main_table`).
"""

from __future__ import annotations

import csv
import io

from nagl.report.main_table import MainTable, Stat, TableRow
from nagl.report.tables import group_title, normal_refs

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(char, char) for char in str(text))


def _latex_cell(stat: Stat, rank: int | None, marked: bool) -> str:
    if stat.mean is None:
        return "--"
    text = f"{stat.mean:.3f}"
    if stat.sd_ref is not None:
        text += rf" \pm {stat.sd_ref:.3f}"
    text = {1: rf"\mathbf{{{text}}}", 2: rf"\underline{{{text}}}"}.get(rank or 0, text)
    mark = r"^{\dagger}" if marked else ""
    return f"${text}{mark}$"


def _latex_row(row: TableRow, table: MainTable) -> str:
    cells = [_latex_cell(row.cells.get(c.target, Stat(None)), row.best.get(c.target), c.target in row.in_domain)
             for c in table.columns]
    cells.append(_latex_cell(row.mean, row.best.get(""), False))
    return " & ".join([latex_escape(row.label), *cells]) + r" \\"


def to_latex(table: MainTable) -> str:
    """A ``table`` environment with a booktabs ``tabular``: one column per target and the mean."""
    n_columns = 2 + len(table.columns)
    groups = table.groups
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{Cross-domain {latex_escape(table.label)} (mean $\pm$ sd over seeds). "
             r"Best per column and block in bold, second underlined; $^{\dagger}$: the in-domain cell is "
             r"left out.}",
             rf"\begin{{tabular}}{{l{'c' * (n_columns - 1)}}}", r"\toprule"]
    header, rules, start = [""], [], 2
    for name, columns in groups:
        header.append(rf"\multicolumn{{{len(columns)}}}{{c}}{{{latex_escape(group_title(name))}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(columns) - 1}}}")
        start += len(columns)
    header.append("")
    lines += [" & ".join(header) + r" \\", "".join(rules)]
    lines.append(" & ".join(["Method", *(latex_escape(c.target) for _, cols in groups for c in cols), "Mean"])
                 + r" \\")
    for block in table.blocks:
        lines += [r"\midrule", rf"\multicolumn{{{n_columns}}}{{l}}{{\textit{{{normal_refs(block.k_normal)}}}}} \\"]
        current = None
        for row in block.rows:
            if (row.training, row.references) != current:
                current = (row.training, row.references)
                lines.append(rf"\multicolumn{{{n_columns}}}{{l}}{{{row.training.capitalize()}, {row.references}}} \\")
            lines.append(_latex_row(row, table))
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def to_csv(table: MainTable) -> str:
    """One line per table row: block, row group, label, then mean and sd per target and for the mean."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["k_normal", "training", "references", "method"]
    for column in table.columns:
        header += [f"{column.target} mean", f"{column.target} sd"]
    header += ["mean", "mean sd", "n_seeds", "in_domain_left_out", "best", "second"]
    writer.writerow(header)
    for block in table.blocks:
        for row in block.rows:
            line: list = [block.k_normal, row.training, row.references, row.label]
            for stat in [row.cells.get(c.target, Stat(None)) for c in table.columns] + [row.mean]:
                line += [_number(stat.mean), _number(stat.sd_ref)]
            names = {"": "mean", **{c.target: c.target for c in table.columns}}
            line += [row.mean.n_ref, ";".join(sorted(row.in_domain)),
                     ";".join(names[k] for k, rank in row.best.items() if rank == 1),
                     ";".join(names[k] for k, rank in row.best.items() if rank == 2)]
            writer.writerow(line)
    return buffer.getvalue()


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
