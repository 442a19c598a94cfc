"""The PNG: latency percentiles (p50, p90, p99) per system, one panel per scenario."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLORS = {"p50": "#4c72b0", "p90": "#dd8452", "p99": "#c44e52"}


def plot(result: dict[str, Any], path: Path) -> bool:
    """Write the plot to `path`; False (and a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", flush=True)
        return False
    scenarios = list(result["scenarios"].values())
    columns = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        _panel(ax, scenario)
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    for ax in list(axes.flat)[len(scenarios) :]:
        ax.axis("off")
    fig.suptitle(f"Latency percentiles per system ({result['mode']} run, {result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _panel(ax: Any, scenario: dict[str, Any]) -> None:
    systems = list(scenario["systems"])
    width = 0.26
    field = "first_chunk_ms" if scenario["stream"] else "latency_ms"
    for i, q in enumerate(("p50", "p90", "p99")):
        values = [scenario["systems"][s][field][q] for s in systems]
        xs = [x + (i - 1) * width for x in range(len(systems))]
        ax.bar(xs, values, width, label=q, color=COLORS[q])
    crowded = len(systems) > 4  # the floor's rows: tilt the names so they do not overlap
    ax.set_xticks(
        range(len(systems)),
        systems,
        fontsize=7 if crowded else 8,
        rotation=25 if crowded else 0,
        ha="right" if crowded else "center",
    )
    ax.set_yscale("log")
    ax.set_ylabel("ms" + (" to first chunk" if scenario["stream"] else ""), fontsize=8)
    ax.set_title(scenario["title"], fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
