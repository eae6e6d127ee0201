"""Human-readable evaluation reports (markdown for MLflow artifacts/READMEs, HTML for browsers).

``results`` maps a name to a scalar (number, string, bool, None), to a mapping of metric -> scalar
(its own table section), or to a list of strings (bullet notes)::

    {"train_images": 2000, "knn_k20_top1": 0.91, "linear_best_head": "blocks4_avgpool_lr0.001",
     "retrieval": {"mAP": 0.42, "recall_at_1": 0.8}, "notes": ["k=200 capped ..."]}

Top-level scalars are gathered into one "Metrics" table, first, in insertion order (the flat dict
the eval stage logs to MLflow renders as-is). Numbers are printed with 4 significant digits so
accuracies (fractions) and learning rates both stay readable. Pictures are referenced by path/URI
relative to where the report is stored; image bytes are never embedded, so the report stays small
enough to log as a text artifact.
"""

from __future__ import annotations

import html
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "-"


def format_value(value: Any) -> str:
    """Numpy scalars included: cached metrics often come back as np.float32."""
    if value is None:
        return MISSING
    if isinstance(value, numbers.Integral):  # bools included
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    return str(value)


def _md_cell(value: Any) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number))


def _sections(results: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any] | list[str]]]:
    """(title, table-or-notes) in display order: the top-level scalars first, as "Metrics"."""
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping, got {type(results).__name__}")
    scalars = {k: v for k, v in results.items() if _is_scalar(v)}
    sections: list[tuple[str, Mapping[str, Any] | list[str]]] = [("Metrics", scalars)] if scalars else []
    for name, body in results.items():
        if _is_scalar(body):
            continue
        if isinstance(body, Mapping) and all(_is_scalar(v) for v in body.values()):
            sections.append((str(name), body))
        elif isinstance(body, (list, tuple)):
            sections.append((str(name), [str(note) for note in body]))
        else:
            raise TypeError(f"results[{name!r}] must be a scalar, a mapping of scalars or a list of "
                            f"notes, got {type(body).__name__}")
    return sections


def comparison_table(rows: list[dict]) -> str:
    """Markdown table with one row per run (e.g. backbones in the parent run); columns are the
    union of keys in first-seen order, missing values shown as '-'."""
    if not rows or not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("comparison_table needs a non-empty list of dicts")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return _md_table(columns, [[row.get(c) for c in columns] for row in rows])


def markdown_report(backbone_name: str, results: dict, pictures: list[str]) -> str:
    """A markdown page: title, one section per entry of ``results``, then the pictures."""
    parts = [f"# Evaluation: {backbone_name}"]
    for section, body in _sections(results):
        parts.append(f"## {section}")
        if isinstance(body, Mapping):
            parts.append(_md_table(["metric", "value"], list(body.items())))
        else:
            parts.append("\n".join(f"- {note}" for note in body) or "(none)")
    if pictures:
        parts.append("## Patch PCA")
        parts += [f"![{path.rsplit('/', 1)[-1]}]({path})" for path in pictures]
    return "\n\n".join(parts) + "\n"


def _html_table(body: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(format_value(v))}</td></tr>"
                   for k, v in body.items())
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def html_report(backbone_name: str, results: dict, pictures: list[str]) -> str:
    """The same content as :func:`markdown_report` as a standalone HTML page (all text escaped)."""
    sections = _sections(results)
    title = html.escape(f"Evaluation: {backbone_name}")
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title>",
             "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 8px}"
             "img{image-rendering:pixelated;max-width:100%}</style></head><body>",
             f"<h1>{title}</h1>"]
    for section, body in sections:
        parts.append(f"<h2>{html.escape(section)}</h2>")
        if isinstance(body, Mapping):
            parts.append(_html_table(body))
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in body) + "</ul>")
    if pictures:
        parts.append("<h2>Patch PCA</h2>")
        parts += [f"<p><img src=\"{html.escape(path, quote=True)}\" "
                  f"alt=\"{html.escape(path.rsplit('/', 1)[-1], quote=True)}\"></p>"
                  for path in pictures]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
