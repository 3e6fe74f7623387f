"""Diagnostics: where Fast Fisher Grafting cuts and how experts' curvature overlaps.

The analyses of method.md ("Analyses worth reproducing"), computed by streaming one tensor
name at a time over a base and its experts (never a whole model in memory): kept fraction
per layer x role for FFG against magnitude pruning, row and column sparsity of those masks,
curvature overlap and mask overlap between experts (each with the value chance would give),
and rank-one quality for experts with full moments. Their exact definitions are in
:mod:`.measures`.

The parts, one concern each. Each imports only parts listed before it (``measures`` imports
none of the others), and none uses another's ``_private`` names:

* :mod:`.measures`: the computation. The pure tensor functions (no I/O) and the streaming
  two-pass :class:`~.measures.Inspector`, which returns plain JSON-serialisable data.
* :mod:`.reading`: :func:`findings`, the sentences reading the key numbers (stored in
  ``diagnostics.json``), and the number formatting and labels the summary and the figures share.
* :mod:`.summary`: ``summary.md`` (:func:`render_summary`).
* :mod:`.plots`: the PNG figures (:func:`plot_diagnostics`); matplotlib (the ``plots`` extra)
  is imported there only, and only when a figure is drawn.
* :mod:`.api`: the entry points. :func:`inspect_experts` returns the data (with its
  findings); :func:`write_diagnostics` writes ``diagnostics.json``, ``summary.md`` and the figures.

This module holds no code: it re-exports the public API below.
"""

from __future__ import annotations

from .api import DIAGNOSTICS_FILE, SUMMARY_FILE, inspect_experts, write_diagnostics
from .measures import (
    HIST_BINS,
    KINDS,
    ROLES,
    SCHEMA_VERSION,
    Resolver,
    cosine,
    fraction_histogram,
    jaccard,
    line_kept_fractions,
    overlap_counts,
    parse_name,
    rank1_relative_error,
    top_fraction_mask,
)
from .plots import plot_diagnostics
from .reading import findings
from .summary import render_summary

__all__ = [
    "ROLES",
    "KINDS",
    "HIST_BINS",
    "DIAGNOSTICS_FILE",
    "SUMMARY_FILE",
    "SCHEMA_VERSION",
    "Resolver",
    "parse_name",
    "top_fraction_mask",
    "overlap_counts",
    "jaccard",
    "cosine",
    "line_kept_fractions",
    "fraction_histogram",
    "rank1_relative_error",
    "inspect_experts",
    "findings",
    "render_summary",
    "plot_diagnostics",
    "write_diagnostics",
]
