"""Mix: domain vs general data by target shares, class balancing, and data-mixing-law fits.

Entry points: :func:`mix_table` (pure: pool table -> manifest + report), :class:`MixStage` (the stage over
a run store), :func:`table_rows` / :func:`report_table` (per-bucket rows for tables), and the
``alive mixing-law`` commands in :mod:`pipeline.mix.cli`.
"""

from .mixer import UNLABELED, MixInfeasibleError, water_fill
from .report import build_report, format_table, summary_lines, table_rows
from .stage import STAGE, MixStage, load_report, mix_table, report_table

__all__ = [
    "STAGE", "MixStage", "UNLABELED", "MixInfeasibleError", "build_report", "format_table", "load_report", "mix_table",
    "report_table", "summary_lines", "table_rows", "water_fill",
]
