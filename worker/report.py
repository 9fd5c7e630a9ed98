"""The repair report: a JSON document and a PNG plot of the trace and before/after metrics."""
from __future__ import annotations

import io
import math
from typing import Any

SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "pt2": ".pt2"}


def json_safe(value: Any) -> Any:
    """Plain JSON: tensors/arrays become lists, NaN/Inf become null, keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return json_safe(value.tolist())
    if hasattr(value, "model_dump"):
        return json_safe(value.model_dump())
    return str(value)


def plot_png(trace: list[dict[str, Any]], metrics: dict[str, Any], title: str) -> bytes:
    """Trace curves (every numeric key per step) beside a before/after bar chart of ACC and ASR."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_trace, ax_bars = fig.subplots(1, 2)
    keys = sorted({k for row in trace for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys[:8]:
        xs = [row.get("step", i) for i, row in enumerate(trace) if isinstance(row.get(key), (int, float))]
        ys = [row[key] for row in trace if isinstance(row.get(key), (int, float))]
        ax_trace.plot(xs, ys, label=key)
    ax_trace.set_title("repair trace")
    ax_trace.set_xlabel("step")
    if keys:
        ax_trace.legend(fontsize=8)
    else:
        ax_trace.text(0.5, 0.5, "no trace recorded", ha="center", va="center", transform=ax_trace.transAxes)
    names, before, after = [], [], []
    for name in ("acc", "asr", "ra"):
        b, a = (metrics.get("before") or {}).get(name), (metrics.get("after") or {}).get(name)
        if b is not None and a is not None:
            names.append(name.upper())
            before.append(100 * b)
            after.append(100 * a)
    xs = list(range(len(names)))
    ax_bars.bar([x - 0.2 for x in xs], before, width=0.4, label="before")
    ax_bars.bar([x + 0.2 for x in xs], after, width=0.4, label="after")
    ax_bars.set_xticks(xs, names)
    ax_bars.set_ylim(0, 100)
    ax_bars.set_ylabel("%")
    ax_bars.set_title("metrics")
    ax_bars.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
