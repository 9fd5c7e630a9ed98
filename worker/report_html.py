"""The self-contained HTML report: one file with inline CSS and inline SVG plots, no external assets.

It is rendered from the stored JSON report, so it can be produced for any finished job (by the
API at ``GET /v1/repairs/{id}/report.html``, or offline from a downloaded ``report.json``).
All report values are escaped (Jinja2 autoescape): layer names and file names come from uploads.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from .report import layer_rows, report_figures

TEMPLATES = Path(__file__).parent / "templates"


def _known(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: f"{100 * v:.2f}%" if _known(v) else "—"
    env.filters["num"] = lambda v, d=3: (f"{v:.{d}f}" if isinstance(v, float) else str(v)) if _known(v) else "—"
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    return env


def _channels(indices: list[int], limit: int = 40) -> str:
    text = ", ".join(map(str, indices[:limit]))
    return text + (f", … (+{len(indices) - limit})" if len(indices) > limit else "")


def render_html(report: dict[str, Any], *, status: str = "succeeded") -> str:
    """The report page for one finished repair."""
    rows = layer_rows(report)
    layers = [{**r, "count": len(r["pruned"]), "share": (len(r["pruned"]) / r["size"]) if r["size"] else None,
               "channels": _channels(r["pruned"])} for r in rows]
    manifest = report.get("manifest") or {}
    return _env().get_template("report.html").render(
        r=report, m=report.get("metrics") or {}, manifest=manifest, status=status, layers=layers,
        figures=report_figures(report), pruned_layers=sum(1 for r in rows if r["pruned"]),
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
