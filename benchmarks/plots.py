"""PNG plots of a benchmark run: time and peak extra memory, vs B and vs M, per distance."""

from __future__ import annotations

from pathlib import Path

WHATS = ("emd", "mmd", "bd", "loss-emd", "loss-mmd", "loss-bd")


def _series(rows, what, x_key, fixed_key, fixed_value, y_key):
    """provider -> sorted [(x, y)] over the measured rows of one distance."""
    series: dict[str, list] = {}
    for r in rows:
        measured = r.get(y_key, 0) > 0 and "extrapolated_from" not in r  # 0 bytes: not on a log axis
        if measured and r["what"] == what and r.get(fixed_key) == fixed_value:
            series.setdefault(r["provider"], []).append((r[x_key], r[y_key]))
    return {name: sorted(points) for name, points in series.items() if len(points) > 1}


def plot_results(
    rows: list[dict], output_dir: Path, stem: str, device_name: str, base_batch: int = 64, base_shape: str = "3x64x64"
) -> list[Path]:
    """Write <stem>-time-vs-batch.png (at base_shape), -time-vs-values.png (at base_batch),
    -memory-vs-batch.png and -memory-vs-values.png; returns the paths (none when matplotlib is
    missing or the run has no sweep). The memory plots need the rows' peak memory: without it
    (--no-memory) a note is printed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return []
    time, memory, values = "forward+backward (ms)", "peak extra memory (MiB)", "values per residual M"
    mib = 1 / 2**20
    plans = [  # name, x, fixed key and value, y and its scale, labels
        ("time-vs-batch", "batch", "shape", base_shape, "full_ms", 1, "batch B", time),
        ("time-vs-values", "values", "batch", base_batch, "full_ms", 1, values, time),
        ("memory-vs-batch", "batch", "shape", base_shape, "extra_bytes", mib, "batch B", memory),
        ("memory-vs-values", "values", "batch", base_batch, "extra_bytes", mib, values, memory),
    ]
    if not any("extra_bytes" in r for r in rows):
        print("note: no peak-memory numbers in these results (run without --no-memory): memory plots skipped")
    providers = sorted({r["provider"] for r in rows})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}  # same colour in every panel
    written = []
    for name, x_key, fixed_key, fixed_value, y_key, y_scale, x_label, y_label in plans:
        panels = [(what, _series(rows, what, x_key, fixed_key, fixed_value, y_key)) for what in WHATS]
        panels = [(what, series) for what, series in panels if series]
        if not panels:
            continue
        columns = min(3, len(panels))
        rows_of_panels = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows_of_panels, columns, figsize=(4.4 * columns, 3.6 * rows_of_panels), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (what, series) in zip(axes.flat, panels):
            for provider, points in series.items():
                xs, ys = zip(*points)
                ax.plot(xs, [y * y_scale for y in ys], marker="o", label=provider, color=colors[provider])
            ax.set(xscale="log", yscale="log", title=what, xlabel=x_label, ylabel=y_label)
            # Label the measured sizes; matplotlib's minor labels on a short log axis overlap.
            ticks = sorted({x for points in series.values() for x, _ in points})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(f"{name.replace('-', ' ')} ({device_name})", fontsize=9)
        fig.tight_layout()
        path = output_dir / f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
