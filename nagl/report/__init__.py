"""The HTML leaderboard report: ``build_report(db_path, out_path)`` (also ``nagl report``)."""

from nagl.report.build import build_report

__all__ = ["build_report"]
