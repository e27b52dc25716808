"""Routing rules: which ``[[rules]]`` apply to which series of a study, and why the others
don't. Matching is per series; ``[route] mode`` says whether a series gets the first rule
that matches it or every one."""

from node.route.router import Router, StudyLike, Submitted
from node.route.rules import (
    Criterion,
    Evaluation,
    Scan,
    SeriesFacts,
    Unreadable,
    Verdict,
    criteria,
    evaluate,
    facts_of,
    series_facts,
)

__all__ = [
    "Criterion",
    "Submitted",
    "Router",
    "Evaluation",
    "Scan",
    "SeriesFacts",
    "StudyLike",
    "Unreadable",
    "Verdict",
    "criteria",
    "facts_of",
    "evaluate",
    "series_facts",
]
