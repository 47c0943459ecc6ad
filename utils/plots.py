"""Figures: matplotlib set up once (no display: the Agg backend) and PNGs written atomically; the
per-epoch curves every run draws, and the single plots a defense adds."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (runs need no display; imported only when drawing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` through a hidden temporary file, so no half-written PNG is left, and close it.
    The temporary file goes when the write fails; one a killed process left is overwritten by the next
    figure of that name, and removed by the next run on a run's output (``utils.output``)."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        pyplot().close(fig)


def plot_curves(rows: list[dict], out_dir: Path, prefix: str) -> None:
    """``<prefix>_acc_like_metric_plots.png`` and ``<prefix>_loss_metric_plots.png`` (BackdoorBench names)."""
    plt = pyplot()
    evaluated = [r for r in rows if r.get("clean_acc") is not None]
    panels = [
        ("acc_like_metric_plots", "fraction", [("train_acc", rows), ("clean_acc", evaluated), ("asr", evaluated),
                                               ("ra", evaluated)]),
        ("loss_metric_plots", "loss", [("train_loss", rows), ("clean_test_loss", evaluated),
                                       ("bd_test_loss", evaluated), ("ra_test_loss", evaluated),
                                       ("distance", rows)]),
    ]
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, source in series:
            pts = [(r["epoch"], r[key]) for r in source if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        save_figure(fig, out_dir / f"{prefix}_{name}.png")


def save_plot(path: Path, x: list, series: dict[str, list], *, xlabel: str, ylabel: str) -> None:
    """One PNG of several curves over the same x, written atomically."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o" if len(x) < 30 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    save_figure(fig, path)
