"""Matplotlib figures of results: sweep scatter with its Pareto front, step-time breakdown bars,
memory over time per pipeline stage. (The step timeline is :mod:`sim.plot`.)

Figures are built on :class:`matplotlib.figure.Figure` without pyplot (no global backend or
figure state); :func:`save_figure` writes PNG (Agg), SVG or PDF by file suffix, deterministically: the
same input gives the same bytes (fixed ``svg.hashsalt``, no date in the metadata).

Inputs are *plan records*: flat mappings with the column names of :func:`sim.report.csv_row`
(``tokens_per_s``, ``peak_memory_bytes``, ``capacity_bytes``, ``fits``, ``time_compute_s`` ...),
``None`` where a value is absent (a plan that was not simulated has no timing).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sim.errors import ScenarioError
from sim.report import TIME_PARTS
from sim.units import GiB

FIGURE_FORMATS = (".png", ".svg", ".pdf")
SVG_HASHSALT = "clustersim"      # fixed salt for the ids matplotlib writes into SVG files
PNG_DPI = 120

# The parts of the engine's step-time breakdown (Analysis.time_breakdown_s), in its order; a record
# carries them as time_<part>_s.
BREAKDOWN_PARTS = TIME_PARTS
BREAKDOWN_COLORS = {"compute": "#4C72B0", "overlap_slowdown": "#8172B3", "exposed_comm": "#C44E52", "bubble": "#CCB974", "optimizer": "#55A868",
                    "other": "#8C8C8C"}


def new_figure(width_in: float, height_in: float):
    """A pyplot-free figure of the given size (inches)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width_in, height_in))


def save_figure(fig, *paths: str | Path) -> list[Path]:
    """Write ``fig`` to every path (format by suffix: .png, .svg or .pdf); the same figure gives the same bytes."""
    import matplotlib
    out = []
    for path in paths:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in FIGURE_FORMATS:
            raise ScenarioError(f"cannot draw {str(path)!r}; expected a file name ending in "
                                f"{', '.join(FIGURE_FORMATS)}", key="--out")
        if not path.parent.is_dir():
            raise ScenarioError(f"directory {str(path.parent)!r} does not exist; expected a writable path", key="--out")
        metadata = {".svg": {"Date": None}, ".pdf": {"CreationDate": None}, ".png": {"Software": None}}[suffix]
        with matplotlib.rc_context({"svg.hashsalt": SVG_HASHSALT, "svg.fonttype": "path"}):
            fig.savefig(path, format=suffix[1:], dpi=PNG_DPI, metadata=metadata)
        out.append(path)
    return out


# ---- sweep scatter ---------------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (memory, throughput) that no other point beats: none needs at most the
    same memory for at least the same throughput, with one of the two strictly better. Ordered by
    memory ascending (then throughput rising); of exact duplicates only the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _num(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    return None if value is None or isinstance(value, bool) else float(value)


def _label(record: Mapping[str, Any]) -> str:
    return str(record.get("label") or record.get("plan_id") or record.get("name") or "?")


def plan_summary(record: Mapping[str, Any]) -> str:
    """``TP8 PP2 CP1 DP4 Z1 sel mbs1`` from a record's plan columns (missing ones left out)."""
    parts = []
    for key, tag in (("tp", "TP"), ("pp", "PP"), ("cp", "CP"), ("dp", "DP"), ("zero", "Z")):
        if record.get(key) is not None:
            parts.append(f"{tag}{int(float(record[key]))}")
    if record.get("recompute") not in (None, "none"):
        parts.append(f"rc-{record['recompute']}")
    if record.get("schedule") not in (None, "1f1b"):
        vs = record.get("virtual_stages")
        parts.append(str(record["schedule"]) + (f"x{int(float(vs))}" if vs not in (None, 1, "1") else ""))
    if record.get("micro_batch_size") is not None:
        parts.append(f"mbs{int(float(record['micro_batch_size']))}")
    return " ".join(parts)


def sweep_scatter(records: Sequence[Mapping[str, Any]], *, title: str = ""):
    """Throughput (tokens/s) against peak memory per GPU (GiB) of every plan.

    Fitting plans are dots; simulated plans that do not fit are red crosses; plans that do not fit and
    were not simulated (no throughput) are ticks along the bottom at their memory. The Pareto front of
    the fitting plans is a step line, each distinct GPU capacity a vertical dashed line, and the
    fastest fitting plan is annotated."""
    from matplotlib.transforms import blended_transform_factory

    fig = new_figure(10, 5.5)
    ax = fig.add_subplot()
    ok, over_sim, over_mem = [], [], []
    for r in records:
        mem, thr = _num(r, "peak_memory_bytes"), _num(r, "tokens_per_s")
        if mem is None:
            continue
        fits = bool(r.get("fits"))
        if thr is not None:
            (ok if fits else over_sim).append((mem / GiB, thr, r))
        elif not fits:
            over_mem.append(mem / GiB)
    if ok:
        ax.scatter([p[0] for p in ok], [p[1] for p in ok], s=16, color="#4C72B0", alpha=0.75, zorder=2,
                   label=f"fits ({len(ok)})")
    if over_sim:
        ax.scatter([p[0] for p in over_sim], [p[1] for p in over_sim], s=22, marker="x", color="#C44E52",
                   zorder=2, label=f"does not fit, simulated ({len(over_sim)})")
    if over_mem:
        rug = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(over_mem, [0.015] * len(over_mem), linestyle="none", marker="|", markersize=10, color="#C44E52",
                alpha=0.6, transform=rug, label=f"does not fit, not simulated ({len(over_mem)})")
    if ok:
        front = [ok[i] for i in pareto_front([(p[0], p[1]) for p in ok])]
        xs = [p[0] for p in front]
        ys = [p[1] for p in front]
        xmax = max(p[0] for p in ok + over_sim)
        ax.step(xs + [xmax], ys + [ys[-1]], where="post", color="black", linewidth=1.2, zorder=3,
                label=f"Pareto front ({len(front)})")
        top = max(ok, key=lambda p: (p[1], -p[0]))
        ax.scatter([top[0]], [top[1]], s=70, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
        ax.annotate(f"{_label(top[2])}\n{plan_summary(top[2])}\n{top[1]:,.0f} tokens/s, {top[0]:.1f} GiB",
                    (top[0], top[1]), xytext=(-14, -8), textcoords="offset points", fontsize=8, ha="right",
                    va="top", bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#bbb", "alpha": 0.9},
                    arrowprops={"arrowstyle": "-", "linewidth": 0.8})
    capacities = sorted({c / GiB for c in (_num(r, "capacity_bytes") for r in records) if c is not None})
    for cap in capacities:
        ax.axvline(cap, color="grey", linestyle="--", linewidth=1, zorder=1)
        ax.annotate(f"capacity {cap:g} GiB", (cap, 1.0), xycoords=("data", "axes fraction"), xytext=(-3, -3),
                    textcoords="offset points", rotation=90, ha="right", va="top", fontsize=8, color="grey")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("peak memory per GPU (GiB)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(title or "plans: throughput vs memory")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    if ok or over_sim or over_mem:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


# ---- step-time breakdown ---------------------------------------------------------------------------

def breakdown_bars(labels: Sequence[str], breakdowns: Sequence[Mapping[str, float] | None], *, title: str = "",
                   notes: Sequence[str] | None = None):
    """Stacked horizontal bars of the step-time parts (seconds), one bar per label; a ``None``
    breakdown (not simulated) is drawn as an empty bar marked "n/a" (or its note)."""
    n = len(labels)
    fig = new_figure(9, 1.6 + 0.45 * max(n, 1))
    ax = fig.add_subplot()
    parts = list(BREAKDOWN_PARTS) + sorted({k for b in breakdowns if b for k in b} - set(BREAKDOWN_PARTS))
    lefts = [0.0] * n
    for part in parts:
        widths = [float(b.get(part, 0.0)) if b else 0.0 for b in breakdowns]
        ax.barh(range(n), widths, left=lefts, height=0.6, color=BREAKDOWN_COLORS.get(part, "#937860"),
                label=part.replace("_", " "))
        lefts = [left + w for left, w in zip(lefts, widths)]
    for y, (b, total) in enumerate(zip(breakdowns, lefts)):
        text = f" {total:.4g} s" if b else " " + ((notes[y] if notes and notes[y] else None) or "n/a")
        ax.text(total, y, text, va="center", fontsize=8)
    ax.set_yticks(range(n), [str(x) for x in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(lefts + [1e-9]) * 1.18)
    ax.set_xlabel("step time (s)")
    ax.set_title(title or "where the step time goes", pad=24)
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(parts), frameon=False)
    fig.tight_layout()
    return fig


def record_breakdown(record: Mapping[str, Any]) -> dict[str, float] | None:
    """The ``time_<part>_s`` values of a record, or None when the plan was not simulated. A CSV
    written before a part existed (``overlap_slowdown``) has none of it: 0."""
    values = {p: _num(record, f"time_{p}_s") for p in BREAKDOWN_PARTS}
    if values["compute"] is None:
        return None
    if "time_overlap_slowdown_s" not in record:
        values["overlap_slowdown"] = 0.0
    if any(v is None for v in values.values()):
        return None
    return values   # type: ignore[return-value]


# ---- memory over time ------------------------------------------------------------------------------

def memory_over_time(step, capacity_bytes: float | None = None, *, title: str = ""):
    """Allocated bytes over the step of the first simulated device of every pipeline stage
    (``DeviceRun.memory_samples``), one step line per stage, with the usable capacity."""
    import matplotlib

    fig = new_figure(10, 4.8)
    ax = fig.add_subplot()
    firsts: dict[int, Any] = {}
    for run in step.devices:
        firsts.setdefault(run.stage, run)
    cmap = matplotlib.colormaps["viridis"]
    stages = sorted(firsts)
    peak = 0.0
    for k, stage in enumerate(stages):
        run = firsts[stage]
        samples = list(run.memory_samples) or [(0.0, run.peak_bytes)]
        xs = [t for t, _ in samples] + [step.step_time_s]
        ys = [b / GiB for _, b in samples]
        ys.append(ys[-1])
        peak = max(peak, max(ys))
        ax.step(xs, ys, where="post", linewidth=1.1, color=cmap(k / max(len(stages) - 1, 1)) if len(stages) > 1
                else "#4C72B0", label=f"stage {stage}")
    if capacity_bytes:
        ax.axhline(capacity_bytes / GiB, color="#C44E52", linestyle="--", linewidth=1,
                   label=f"capacity {capacity_bytes / GiB:g} GiB")
        peak = max(peak, capacity_bytes / GiB)
    ax.set_xlim(0, step.step_time_s)
    ax.set_ylim(0, peak * 1.08 if peak else 1)
    ax.set_xlabel("time in the step (s)")
    ax.set_ylabel("allocated memory per GPU (GiB)")
    ax.set_title(title or "memory over one step, per pipeline stage")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(stages) // 24, frameon=False)
    fig.tight_layout()
    return fig
