"""PNG plots of profile reports (matplotlib: the optional ``plot`` extra, imported only when asked)."""

from __future__ import annotations

import os
from pathlib import Path

from melt_core.errors import InvalidArgumentError, MissingDependencyError, OutputNotWritableError
from melt_core.profiling import MemoryReport

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def plot_memory(report: MemoryReport, path: Path) -> Path:
    """Memory (weights + KV cache, GB) against the loop count: one line per model and sequence
    length — Ouro rising, MELT flat, the plain model as a dashed reference; measured runs, when
    present, as hollow markers (weights + measured peak above the baseline)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'melt[plot]'") from None

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    seq_lens = sorted({e.seq_len for e in report.entries})
    styles = {"ouro": ("tab:red", "o"), "melt": ("tab:blue", "s")}
    for seq_len in seq_lens:
        at = [e for e in report.entries if e.seq_len == seq_len]
        for model, (color, marker) in styles.items():
            rows = sorted((e for e in at if e.model == model), key=lambda e: e.loops)
            loops = [e.loops for e in rows]
            alpha = 0.4 + 0.6 * (seq_lens.index(seq_len) + 1) / len(seq_lens)
            ax.plot(
                loops,
                [e.total_bytes / 1e9 for e in rows],
                marker=marker,
                color=color,
                alpha=alpha,
                label=f"{rows[0].name}, {seq_len:,} tokens",
            )
            measured = [e for e in rows if e.measured is not None]
            if measured:
                ax.scatter(
                    [e.loops for e in measured],
                    [(e.weights_bytes + e.measured.peak_delta_bytes) / 1e9 for e in measured],
                    facecolors="none",
                    edgecolors=color,
                    s=90,
                    label=f"{rows[0].name} measured, {seq_len:,}",
                )
        plain = next(e for e in at if e.model == "plain")
        ax.axhline(
            plain.total_bytes / 1e9,
            color="gray",
            linestyle="--",
            alpha=0.7,
            label=f"{plain.name} (no loops), {seq_len:,} tokens",
        )
        for ref in (e for e in at if e.model == "reference"):
            ax.axhline(ref.total_bytes / 1e9, color="black", linestyle=":", alpha=0.7, label=f"{ref.name}, {seq_len:,}")
    loops = sorted({e.loops for e in report.entries if e.model == "ouro"})
    ax.set_xticks(loops, [str(t) for t in loops])  # a linear axis: Ouro's memory reads as the line it is
    ax.set_xlabel("loops per token")
    ax.set_ylabel("weights + KV cache (GB)")
    ax.set_title(f"{report.source}: memory vs loops ({report.dtype}, batch {report.batch})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
