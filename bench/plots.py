"""PNG plots of the bench commands' results, written beside their JSON.

Each function takes the figures a command already has, draws one plot with matplotlib
(the ``dev`` extra; the Agg backend, so no display is needed) and saves it as
``<json stem>-<name>.png`` beside the JSON result. When that JSON is in
``bench/results/`` (the default) the plot is also saved as ``docs/plots/<name>.png``, the
current one, which docs/benchmarks.md shows and git keeps (bench/results is ignored). matplotlib is imported only here and only when a
plot is drawn: without it a command prints a note and writes its JSON as before.

The plots are small (80 dpi) and plain: one figure per question the docs ask.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from bench.common import RESULTS_DIR, ROOT

PLOTS_DIR = os.path.join(ROOT, "docs", "plots")
DPI = 80
SIZE = (7.0, 4.2)  # inches: 560 x 336 pixels at 80 dpi


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None (and a note) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[dev]'): no plots", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, json_path: str, name: str) -> list[str]:
    """Save ``fig`` beside ``json_path`` (and as the current ``name`` plot when the JSON
    is in bench/results: docs/plots/<name>.png); the paths written."""
    stem = os.path.splitext(json_path)[0]
    paths = [f"{stem}-{name}.png"]
    if os.path.dirname(os.path.abspath(json_path)) == os.path.abspath(RESULTS_DIR):
        os.makedirs(PLOTS_DIR, exist_ok=True)
        paths.append(os.path.join(PLOTS_DIR, f"{name}.png"))
    fig.tight_layout()
    for path in paths:
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    for path in paths:
        print(f"plot: {os.path.relpath(path)}", file=sys.stderr)
    return paths


def throughput_grid(rows: Sequence[Mapping[str, Any]], raw: float, json_path: str) -> list[str]:
    """Elements/s by threads per worker, a line per (workers, large_model), with the raw
    torch loop as a level: ``bench.harness_runs``'s rows."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=SIZE)
    series: dict[tuple[int, bool], list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault((r["workers"], r["large_model"]), []).append((r["threads"], r["elements_per_s"]))
    for (workers, large), points in sorted(series.items()):
        points.sort()
        ax.plot(
            [t for t, _ in points],
            [v for _, v in points],
            marker="o",
            linestyle="-" if large else "--",
            label=f"{workers} worker{'s' if workers > 1 else ''}, {'model server' if large else 'in-process'}",
        )
    ax.axhline(raw, color="grey", linestyle=":", label="raw torch loop")
    ax.set_xlabel("threads per worker")
    ax.set_ylabel("elements/s")
    ax.set_xticks(sorted({r["threads"] for r in rows}))
    ax.set_ylim(bottom=0)
    ax.set_title("Harness throughput by workers x threads")
    ax.legend(fontsize="small")
    return _save(plt, fig, json_path, "throughput-workers-threads")


def latency_cdfs(panels: Mapping[str, Mapping[str, Sequence[float]]], json_path: str) -> list[str]:
    """A CDF of per-call latencies (microseconds) per label, one panel per title, on a
    log time axis: e.g. {"batch-1 calls": {"in-process": [...], "model server": [...]}}."""
    panels = {title: {k: v for k, v in series.items() if v} for title, series in panels.items()}
    panels = {title: series for title, series in panels.items() if series}
    plt = _pyplot()
    if plt is None or not panels:
        return []
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(SIZE[0] * (0.6 + 0.4 * len(panels)), SIZE[1]))
    for ax, (title, series) in zip(axes if len(panels) > 1 else [axes], panels.items()):
        for label, samples in series.items():
            xs = sorted(s / 1000 for s in samples)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
        ax.set_xscale("log")
        # plain numbers at 1, 2, 5 x 10^n: a narrow range still gets labels, and none collide
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("share of calls at or below")
        ax.set_ylim(0, 1.0)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize="small", loc="lower right")
    return _save(plt, fig, json_path, "latency-cdf")


def rss_over_swaps(series: Mapping[str, Sequence[float]], json_path: str) -> list[str]:
    """The server's RSS (MiB) after each swap, a line per budget: ``bench.refresh``."""
    series = {k: v for k, v in series.items() if v}
    plt = _pyplot()
    if plt is None or not series:
        return []
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=SIZE)
    for label, mib in series.items():
        ax.plot(range(1, len(mib) + 1), mib, marker=".", label=label)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("swaps (new versions loaded and swapped in)")
    ax.set_ylabel("server RSS after the swap (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Model server RSS over a run of swaps")
    ax.legend(fontsize="small", loc="lower right")
    return _save(plt, fig, json_path, "rss-over-swaps")


def hit_ratios(rows: Sequence[Mapping[str, Any]], json_path: str, title: str) -> list[str]:
    """Hit ratio per way of managing the models, as bars: ``bench.keyed_trace``'s rows."""
    plt = _pyplot()
    if plt is None or not rows:
        return []
    fig, ax = plt.subplots(figsize=SIZE)
    labels = [r["way"].replace(", max_models", ",\nmax_models") for r in rows]
    bars = ax.bar(range(len(rows)), [r["hit_ratio"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        ax.annotate(
            f"{r['hit_ratio']:.2f}\n{r['loads']} loads",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(range(len(rows)), labels, fontsize="small")
    ax.set_ylabel("hit ratio")
    ax.set_ylim(0, 1.15)
    ax.set_title(title)
    return _save(plt, fig, json_path, "hit-ratio-by-policy")
