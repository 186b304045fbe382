"""PNG plots of profile reports (matplotlib: the optional ``plot`` extra, imported only when asked)."""

from __future__ import annotations

import os
from pathlib import Path

from melt_core.errors import InvalidArgumentError, MissingDependencyError, OutputNotWritableError
from melt_core.profiling import MemoryReport

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
LINE_STYLES = ("-", "--", ":", "-.")  # one per sequence length, shortest first


def plot_memory(report: MemoryReport, path: Path) -> Path:
    """Memory (weights + KV cache, GB, a log axis) against the loop count: one line per model and
    sequence length — Ouro rising, MELT flat, the plain model and the reference model as horizontal
    lines. A colour per model, a line style per sequence length (solid: the shortest); measured runs,
    when present, as hollow markers on a thin line (weights + measured peak above the baseline)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'melt[plot]'") from None

    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    seq_lens = sorted({e.seq_len for e in report.entries})
    styles = {"ouro": ("tab:red", "o"), "melt": ("tab:blue", "s")}
    for seq_len in seq_lens:
        at = [e for e in report.entries if e.seq_len == seq_len]
        dashes = LINE_STYLES[seq_lens.index(seq_len) % len(LINE_STYLES)]
        tokens = f"{seq_len:,} tokens"
        for model, (color, marker) in styles.items():
            rows = sorted((e for e in at if e.model == model), key=lambda e: e.loops)
            ax.plot(
                [e.loops for e in rows],
                [e.total_bytes / 1e9 for e in rows],
                marker=marker,
                color=color,
                linestyle=dashes,
                label=f"{rows[0].name}, {tokens}",
            )
            measured = [e for e in rows if e.measured is not None]
            if measured:
                ax.plot(  # hollow markers on a thin line of the sequence length's style
                    [e.loops for e in measured],
                    [(e.weights_bytes + e.measured.peak_delta_bytes) / 1e9 for e in measured],
                    marker=marker,
                    markersize=9,
                    markerfacecolor="none",
                    color=color,
                    linestyle=dashes,
                    linewidth=0.8,
                    alpha=0.8,
                    label=f"{rows[0].name} measured, {tokens}",
                )
        plain = next(e for e in at if e.model == "plain")
        ax.axhline(
            plain.total_bytes / 1e9, color="tab:gray", linestyle=dashes, label=f"{plain.name} (no loops), {tokens}"
        )
        for ref in (e for e in at if e.model == "reference"):
            ax.axhline(ref.total_bytes / 1e9, color="tab:green", linestyle=dashes, label=f"{ref.name}, {tokens}")
    loops = sorted({e.loops for e in report.entries if e.model == "ouro"})
    ax.set_xticks(loops, [str(t) for t in loops])  # a linear axis: Ouro's memory reads as the line it is
    ax.set_xlabel("loops per token")
    # a log axis: a model's lines at a short and a long sequence stay apart, however far Ouro rises
    ax.set_yscale("log")
    ax.margins(y=0.06)
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("weights + KV cache (GB, log scale)")
    ax.set_title(f"{report.source}: memory vs loops ({report.dtype}, batch {report.batch})")
    ax.grid(alpha=0.3, which="both")
    # below the axes, one column per sequence length
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(seq_lens), frameon=False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:  # written whole or not at all
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputNotWritableError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path


def check_plot_path(path: Path) -> None:
    """Before any work: a known image suffix and an existing folder to write into."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidArgumentError(f"--plot {path}: use an image file name ending in {', '.join(PLOT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise OutputNotWritableError(f"cannot write {path}: {path.parent} is not a folder")
