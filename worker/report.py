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


# ---------------------------------------------------------------- report page data and figures
#
# The HTML report (``worker.report_html``) is rendered from the stored JSON report at request
# time, so every finished job gets it, including jobs that finished before this code existed.
# The functions below turn the defense-specific ``trace`` / ``details`` / ``pruned`` into the
# few shapes the figures need, tolerating any method (missing data means a missing figure).

_COLORS = {"before": "#8c96a8", "after": "#2f6fde", "accent": "#d9480f", "kept": "#e8ecf2", "pruned": "#d9480f"}


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LayerRow(dict):  # type: ignore[type-arg]
    """``{"name", "size" (None if unknown), "pruned": [channel indices]}`` - a dict so templates can read it."""


def layer_rows(report: dict[str, Any]) -> list[LayerRow]:
    """Every prunable layer in network order with its size and pruned channels, from whatever the method recorded."""
    details = report.get("details") or {}
    pruned: dict[str, list[int]] = {str(k): sorted(int(i) for i in v) for k, v in (report.get("pruned") or {}).items()}
    sizes: dict[str, int | None] = {}
    if isinstance(details.get("layers"), list):  # onp
        for row in details["layers"]:
            if isinstance(row, dict) and "name" in row:
                sizes[str(row["name"])] = int(row["size"]) if _num(row.get("size")) else None
    for key in ("uclc", "mask_values"):  # clp / anp, rnp: per-layer value lists
        if isinstance(details.get(key), dict):
            for name, values in details[key].items():
                sizes.setdefault(str(name), len(values) if isinstance(values, list) else None)
    if _num(details.get("layer_size")):  # fine-pruning: one layer (or one residual group)
        for name in details.get("group") or [details.get("layer")]:
            if name:
                sizes.setdefault(str(name), int(details["layer_size"]))
    for name, idx in pruned.items():  # a pruned layer the details did not describe: size unknown
        sizes.setdefault(name, None)
    return [LayerRow(name=name, size=size, pruned=pruned.get(name, [])) for name, size in sizes.items()]


def accuracy_points(report: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Held-out clean accuracy against the number of pruned neurons: the explored curve and the chosen point."""
    details = report.get("details") or {}
    out: dict[str, list[tuple[float, float]]] = {}
    total = details.get("neurons_total")
    cands = details.get("candidates")
    if _num(total) and isinstance(cands, list):  # onp: every candidate scored on the held-out split
        out["candidates"] = sorted((c["fraction"] * total, c["acc"]) for c in cands
                                   if isinstance(c, dict) and _num(c.get("fraction")) and _num(c.get("acc")))
    curve = [(row["num_pruned"], row["acc"]) for row in report.get("trace") or []
             if isinstance(row, dict) and _num(row.get("num_pruned")) and _num(row.get("acc"))]
    if len(curve) > 1:  # fine-pruning's sweep
        out["sweep"] = curve
    held = report.get("heldout_clean_acc") or {}
    if _num(held.get("before")):
        out["before"] = [(0.0, held["before"])]
    if _num(held.get("after")) and _num(report.get("num_pruned")):
        out["chosen"] = [(float(report["num_pruned"]), held["after"])]
    return out if len(out) > 1 or "candidates" in out or "sweep" in out else {}


def trace_groups(trace: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, tuple[list[float], list[float]]]]]:
    """``(phase, x name, {series: (xs, ys)})`` for each phase whose rows advance by step or epoch."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in trace:
        if isinstance(row, dict):
            groups.setdefault(str(row.get("phase", "search")), []).append(row)
    out = []
    for phase, rows in groups.items():
        xkey = next((k for k in ("step", "epoch", "iteration") if sum(_num(r.get(k)) for r in rows) >= 2), None)
        if xkey is None:
            continue
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in rows:
            if not _num(r.get(xkey)):
                continue
            for k, v in r.items():
                if k not in (xkey, "phase") and _num(v):
                    xs, ys = series.setdefault(k, ([], []))
                    xs.append(float(r[xkey]))
                    ys.append(float(v))
        if series:
            out.append((phase, xkey, series))
    return out


def _primary(key: str) -> bool:
    return any(word in key for word in ("reward", "loss", "acc"))


def _svg(fig: Any, name: str) -> str:
    """Inline SVG (text kept as text; ids salted per figure so several can share one page)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"onp-{name}"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):].replace("<svg ", f'<svg role="img" aria-label="{name}" class="plot" ', 1)


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    fig.set_facecolor("white")
    return fig


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25, linewidth=0.6)
    ax.tick_params(labelsize=8)


def metrics_svg(metrics: dict[str, Any]) -> str | None:
    """Grouped bars of ACC / ASR / RA before and after the repair."""
    names, before, after = [], [], []
    for name in ("acc", "asr", "ra"):
        b, a = (metrics.get("before") or {}).get(name), (metrics.get("after") or {}).get(name)
        if _num(b) and _num(a):
            names.append(name.upper())
            before.append(100 * b)
            after.append(100 * a)
    if not names:
        return None
    fig = _figure(4.6, 3.0)
    ax = fig.subplots()
    xs = list(range(len(names)))
    for offset, vals, label in ((-0.2, before, "before"), (0.2, after, "after")):
        bars = ax.bar([x + offset for x in xs], vals, width=0.38, label=label, color=_COLORS[label])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("%", fontsize=8)
    ax.set_title("before / after repair", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncols=2)
    _style(ax)
    return _svg(fig, "metrics")


def trace_svg(trace: list[dict[str, Any]]) -> str | None:
    """The search/optimisation curves (reward, loss, accuracy) per phase, counts on a second axis."""
    groups = trace_groups(trace)
    if not groups:
        return _layer_stats_svg(trace)
    fig = _figure(4.6 * min(len(groups), 2), 3.0)
    axes = fig.subplots(1, min(len(groups), 2), squeeze=False)[0]
    for ax, (phase, xkey, series) in zip(axes, groups[:2]):
        main = [k for k in series if _primary(k)][:4] or list(series)[:4]
        rest = [k for k in series if k not in main][:3]
        for k in main:
            ax.plot(*series[k], label=k, linewidth=1.6)
        ax.set_xlabel(xkey, fontsize=8)
        ax.set_title(f"{phase} trace", fontsize=10)
        _style(ax)
        handles, labels = ax.get_legend_handles_labels()
        if rest:
            twin = ax.twinx()
            for k in rest:
                twin.plot(*series[k], label=k, linewidth=1.0, linestyle="--", alpha=0.8)
            twin.tick_params(labelsize=8)
            twin.spines[["top"]].set_visible(False)
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, frameon=False)
    return _svg(fig, "trace")


def _layer_stats_svg(trace: list[dict[str, Any]]) -> str | None:
    """Per-layer statistics (CLP's channel Lipschitz bounds) when the trace has no steps."""
    rows = [r for r in trace if isinstance(r, dict) and "layer" in r and _num(r.get("max"))]
    if not rows:
        return None
    fig = _figure(4.6, 3.0)
    ax = fig.subplots()
    xs = list(range(len(rows)))
    ax.bar(xs, [r["max"] for r in rows], color=_COLORS["accent"], label="max", width=0.6)
    if all(_num(r.get("mean")) for r in rows):
        ax.bar(xs, [r["mean"] for r in rows], color=_COLORS["after"], label="mean", width=0.6)
    ax.set_xticks(xs, [str(r["layer"]) for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_title(f"{rows[0].get('phase', 'statistic')} per layer", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    return _svg(fig, "trace")


def accuracy_svg(report: dict[str, Any]) -> str | None:
    """Held-out accuracy against neurons pruned: ONP's candidates or Fine-Pruning's sweep, and the chosen repair."""
    pts = accuracy_points(report)
    if not pts:
        return None
    fig = _figure(4.6, 3.0)
    ax = fig.subplots()
    if "candidates" in pts:
        xs, ys = zip(*pts["candidates"])
        ax.scatter(xs, [100 * y for y in ys], s=18, color=_COLORS["before"], label="candidates", zorder=2)
    if "sweep" in pts:
        xs, ys = zip(*pts["sweep"])
        ax.plot(xs, [100 * y for y in ys], marker=".", color=_COLORS["before"], label="pruning sweep")
    for key, color, marker in (("before", "#222", "o"), ("chosen", _COLORS["accent"], "*")):
        if key in pts:
            x, y = pts[key][0]
            ax.scatter([x], [100 * y], s=90 if marker == "*" else 36, color=color, marker=marker, zorder=3,
                       label="unpruned" if key == "before" else "repaired")
    ys_all = [100 * y for pts_ in pts.values() for _, y in pts_]
    lo, hi = min(ys_all), max(ys_all)
    if hi - lo < 4:  # a flat curve: show it flat instead of magnifying float noise
        ax.set_ylim(max(0.0, (lo + hi) / 2 - 3), min(100.0, (lo + hi) / 2 + 3))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("neurons pruned", fontsize=8)
    ax.set_ylabel("held-out clean accuracy (%)", fontsize=8)
    ax.set_title("accuracy vs neurons pruned", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _style(ax)
    return _svg(fig, "accuracy")


def layers_svg(rows: list[LayerRow], max_columns: int = 512) -> str | None:
    """Heat map: one row per layer, one cell per channel (binned beyond ``max_columns``), coloured by pruning."""
    if not rows or not any(r["pruned"] or r["size"] for r in rows):
        return None
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    widths = [r["size"] or (max(r["pruned"]) + 1 if r["pruned"] else 1) for r in rows]
    bins = max(1, math.ceil(max(widths) / max_columns))
    cols = math.ceil(max(widths) / bins)
    grid = np.full((len(rows), cols), np.nan)
    for i, (row, width) in enumerate(zip(rows, widths)):
        mask = np.zeros(width)
        mask[[p for p in row["pruned"] if 0 <= p < width]] = 1.0
        padded = np.pad(mask, (0, cols * bins - width), constant_values=np.nan).reshape(cols, bins)
        with np.errstate(all="ignore"):
            grid[i] = np.nanmean(padded, axis=1) if bins > 1 else padded[:, 0]
    cmap = LinearSegmentedColormap.from_list("pruned", [_COLORS["kept"], _COLORS["pruned"]]).with_extremes(bad="white")
    fig = _figure(9.4, 0.9 + 0.32 * len(rows))
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
    ax.set_xlabel(f"channel{f' (bins of {bins})' if bins > 1 else ''}", fontsize=8)
    ax.tick_params(labelsize=7)
    for i, (row, width) in enumerate(zip(rows, widths)):
        size = row["size"]
        share = f" ({100 * len(row['pruned']) / size:.0f}%)" if size else ""
        ax.text(cols - 0.5 + cols * 0.01, i, f"{len(row['pruned'])}/{size if size else '?'}{share}",
                va="center", ha="left", fontsize=7)
    ax.set_title("pruned neurons per layer (orange = pruned)", fontsize=10)
    return _svg(fig, "layers")


def report_figures(report: dict[str, Any]) -> dict[str, str]:
    """Every figure the report's data supports, as inline SVG, keyed metrics / trace / accuracy / layers."""
    made = {"metrics": metrics_svg(report.get("metrics") or {}), "trace": trace_svg(report.get("trace") or []),
            "accuracy": accuracy_svg(report), "layers": layers_svg(layer_rows(report))}
    return {k: v for k, v in made.items() if v}
