"""The Pareto front of validation accuracy against latency, as JSON and as a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glit_deploy.atomic_io import atomic_write


def pareto_front(points: list[dict[str, Any]], latency: str = "predicted_ms", score: str = "top1"
                 ) -> list[dict[str, Any]]:
    """Points that no other point beats on both lower latency and higher accuracy."""
    front: list[dict[str, Any]] = []
    best = float("-inf")
    for p in sorted(points, key=lambda p: (p[latency], -p[score])):
        if p[score] > best:
            front.append(p)
            best = p[score]
    return front


def plot_pareto(points: list[dict[str, Any]], front: list[dict[str, Any]], winners: dict[str, dict[str, Any]],
                out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for level, colour in ((1, "tab:blue"), (2, "tab:orange")):
        sel = [p for p in points if p.get("level") == level]
        if sel:
            ax.scatter([p["predicted_ms"] for p in sel], [p["top1"] for p in sel], s=12, alpha=0.5, c=colour,
                       label=f"level {level} candidates")
    if front:
        ax.step([p["predicted_ms"] for p in front], [p["top1"] for p in front], where="post", c="black",
                label="Pareto front")
    markers = ["*", "P", "X", "D", "^", "v"]
    for i, (label, w) in enumerate(winners.items()):
        ax.axvline(w["budget_ms"], ls="--", c="grey", lw=0.8)
        if w.get("digest"):
            ax.scatter([w["measured_ms"]], [w["top1"]], marker=markers[i % len(markers)], s=140, c="red",
                       zorder=5, label=f"winner for {label} (measured)")
    ax.set(xlabel="latency (ms; candidates predicted, winners measured)", ylabel="validation top-1 (%)",
           title="search: accuracy against latency")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
