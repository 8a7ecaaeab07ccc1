"""Progress of `nagl run`: jobs done / total per rule, current jobs, elapsed and time left.

Snakemake logs structured events (``record.event``: run info with the job counts,
job info, job finished, job error) on its logger. :func:`follow` replaces its
terminal output by a :class:`WorkflowProgress` handler for the duration of a run
and writes Snakemake's own full log to ``<results>/logs/snakemake-<time>.log``.
On a terminal the progress is a live rich display; elsewhere (CI, pipes) it is a
plain line every ``interval`` seconds. With ``verbose`` Snakemake's log is shown
as is and no progress display is drawn.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

LOG_TAIL_LINES = 15


@dataclass
class FailedJob:
    rule: str
    wildcards: dict
    logs: list[str]


@dataclass
class JobCounts:
    """What the run has to do and what it has done, from Snakemake's events."""

    total: Counter = field(default_factory=Counter)  # rule -> jobs to run
    done: Counter = field(default_factory=Counter)  # rule -> jobs finished
    running: dict[int, tuple[str, dict]] = field(default_factory=dict)  # jobid -> (rule, wildcards)
    jobs: dict[int, tuple[str, dict, list[str]]] = field(default_factory=dict)  # jobid -> (rule, wildcards, logs)
    failed: list[FailedJob] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        return sum(self.total.values())

    @property
    def n_done(self) -> int:
        return sum(self.done.values())


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _job_name(rule: str, wildcards: dict) -> str:
    values = ", ".join(f"{value}" for value in wildcards.values())
    return f"{rule} ({values})" if values else rule


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return [f"(cannot read {path}: {error.strerror})"]
    return text.splitlines()[-lines:] or ["(the log is empty)"]


class WorkflowProgress(logging.Handler):
    """A logging handler that turns Snakemake's job events into a progress display."""

    def __init__(self, console: Console, interval: float = 10.0) -> None:
        super().__init__(level=logging.DEBUG)
        self.console = console
        self.interval = interval
        self.counts = JobCounts()
        self.started = time.monotonic()
        self._last_line = -float("inf")
        self._last_text = ""
        self._lock = threading.RLock()  # render() runs in rich's refresh thread too
        self.live: Live | None = None
        self.log_file: Path | None = None  # Snakemake's own log of this run

    # -------------------------------------------------------------- events --

    def emit(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "event", "") or "")
        with self._lock:
            if event == "run_info" and isinstance(getattr(record, "stats", None), dict):
                self.counts.total = Counter({rule: n for rule, n in record.stats.items() if rule != "total"})
                self._plain(f"{self.counts.n_total} jobs to run: "
                            + ", ".join(f"{rule} {n}" for rule, n in self.counts.total.items()), force=True)
            elif event == "job_info":
                logs = list(getattr(record, "log", None) or [])
                wildcards = dict(getattr(record, "wildcards", None) or {})
                self.counts.jobs[record.jobid] = (record.rule_name, wildcards, logs)
                self.counts.running[record.jobid] = (record.rule_name, wildcards)
            elif event == "job_finished":
                job = self.counts.jobs.get(record.job_id)
                self.counts.running.pop(record.job_id, None)
                if job is not None:
                    self.counts.done[job[0]] += 1
                self._plain(self.summary())
            elif event == "job_error":
                self.counts.running.pop(record.jobid, None)
                rule, wildcards, logs = self.counts.jobs.get(record.jobid, (record.rule_name, {}, []))
                failed = FailedJob(rule, wildcards, list(getattr(record, "log", None) or logs))
                self.counts.failed.append(failed)
                self._report_failure(failed)
            elif event == "" and record.levelno >= logging.WARNING:
                self._print(Text(str(record.getMessage()), style="red" if record.levelno >= logging.ERROR else "yellow"))
            elif event == "" and str(record.msg or "").startswith("Nothing to be done"):
                self._print(str(record.msg))
            if self.live is not None:
                self.live.refresh()

    # ------------------------------------------------------------- output --

    def summary(self) -> str:
        """One line: jobs done / total, per rule, elapsed and estimated time left."""
        counts = self.counts
        elapsed = time.monotonic() - self.started
        rules = ", ".join(f"{rule} {counts.done[rule]}/{n}" for rule, n in counts.total.items())
        left = ""
        if 0 < counts.n_done < counts.n_total and not counts.failed:
            left = f", about {_duration(elapsed / counts.n_done * (counts.n_total - counts.n_done))} left"
        return (f"[progress] {counts.n_done}/{counts.n_total} jobs done ({rules}); "
                f"elapsed {_duration(elapsed)}{left}")

    def render(self) -> Group:
        with self._lock:
            return self._render()

    def _render(self) -> Group:
        counts = self.counts
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("rule")
        table.add_column("done", justify="right")
        table.add_column("", min_width=24)
        for rule, total in counts.total.items():
            done = counts.done[rule]
            width = 24
            filled = round(width * done / total) if total else width
            table.add_row(rule, f"{done}/{total}", Text("█" * filled + "░" * (width - filled), style="green"))
        running = [_job_name(rule, wildcards) for rule, wildcards in counts.running.values()]
        current = Text("running: " + ("; ".join(running[:4]) + (" …" if len(running) > 4 else "")
                                       if running else "—"), style="cyan")
        return Group(Text(self.summary().removeprefix("[progress] "), style="bold"), table, current)

    def _print(self, renderable) -> None:
        if self.live is not None:
            self.live.console.print(renderable)
        else:
            self.console.print(renderable, soft_wrap=True)

    def _plain(self, line: str, force: bool = False) -> None:
        """Non-interactive output: at most one progress line per ``interval`` seconds."""
        if self.live is not None:
            return
        now = time.monotonic()
        if line != self._last_text and (force or now - self._last_line >= self.interval):
            self._last_line, self._last_text = now, line
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)

    def _report_failure(self, failed: FailedJob) -> None:
        lines = [f"[failed] {_job_name(failed.rule, failed.wildcards)}"]
        for log in failed.logs:
            lines.append(f"  log: {log}; its last lines:")
            lines += [f"    {line}" for line in log_tail(log)]
        if not failed.logs:
            lines.append("  (this rule writes no log)")
        self._print(Text("\n".join(lines), style="red"))


def failure_hint(progress: WorkflowProgress) -> str:
    """What to read after a failed run: each failed job's log, and Snakemake's own log."""
    lines = [f"failed: {_job_name(job.rule, job.wildcards)}; log: {', '.join(job.logs) or 'none'}"
             for job in progress.counts.failed]
    if progress.log_file is not None:
        lines.append(f"Snakemake's log of this run: {progress.log_file}")
    return "".join(f"{line}\n" for line in lines)


def _snakemake_formatter() -> logging.Formatter:
    from snakemake.logging import DefaultFormatter

    return DefaultFormatter()


@contextlib.contextmanager
def follow(log_dir: Path | None, verbose: bool = False, interval: float = 10.0,
           console: Console | None = None) -> Iterator[WorkflowProgress]:
    """Show the progress of the Snakemake run inside this block; keep its log in ``log_dir`` (if given).

    Call it inside ``SnakemakeApi(...)``: Snakemake sets up its logger there.
    """
    from snakemake.logging import logger

    console = console or Console(stderr=True)
    progress = WorkflowProgress(console, interval)
    file_handler: logging.Handler = logging.NullHandler()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        progress.log_file = log_dir / f"snakemake-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.log"
        file_handler = logging.FileHandler(progress.log_file, encoding="utf-8")
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(_snakemake_formatter())
    streams = [h for h in logger.handlers if h.name == "DefaultStreamHandler"]
    logger.addHandler(file_handler)
    if not verbose:
        for handler in streams:
            logger.removeHandler(handler)
        logger.addHandler(progress)
    live = Live(console=console, get_renderable=progress.render, refresh_per_second=2) \
        if console.is_terminal and not verbose else None
    progress.live = live
    try:
        with live if live is not None else contextlib.nullcontext():
            yield progress
    finally:
        progress.live = None
        logger.removeHandler(file_handler)
        file_handler.close()
        if not verbose:
            logger.removeHandler(progress)
            for handler in streams:
                logger.addHandler(handler)
        if progress.counts.n_total and not verbose:
            progress._plain(progress.summary(), force=True)
