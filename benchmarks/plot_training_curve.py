"""Plot a training curve from metrics.jsonl: loss per loop and held-out eval per loop.

Several runs (e.g. a pretraining run and its ``--init-from`` continuation) are drawn one after the
other, with a dashed line where each later stage starts.

Usage: python benchmarks/plot_training_curve.py RUN [RUN ...] OUT.png
(RUN: a run directory or its metrics.jsonl)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_stages(runs: list[Path]) -> tuple[list[dict], list[dict], list[int]]:
    """Step records and eval records of all runs, steps offset so that the stages follow each other."""
    steps, evals, starts, offset = [], [], [], 0
    for run in runs:
        file = run if run.is_file() else run / "metrics.jsonl"
        records = [json.loads(line) for line in file.read_text().splitlines() if line]
        starts.append(offset)
        steps += [dict(r, step=r["step"] + offset) for r in records if "loss" in r]
        evals += [dict(r, step=r["step"] + offset) for r in records if "eval" in r]
        offset = steps[-1]["step"]
    return steps, evals, starts[1:]


def main(runs: list[Path], out: Path) -> None:
    steps, evals, boundaries = read_stages(runs)
    fig, (ax, gain) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=[3, 2])
    for key in sorted(k for k in steps[0] if k.startswith("ce_loop")):
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], lw=0.6, alpha=0.6, label=f"train {key[3:]}")
    for key in sorted(evals[0]["eval"]) if evals else []:
        ax.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=f"held-out {key[5:]}")
    # The per-loop differences are small next to the loss itself: show them relative to loop 1.
    for key in sorted(evals[0]["eval"])[1:] if evals else []:
        gain.plot(
            [r["step"] for r in evals],
            [r["eval"][key] - r["eval"]["loss_loop1"] for r in evals],
            marker="o",
            label=f"held-out {key[5:]}",
        )
    gain.axhline(0, color="black", lw=0.6)
    gain.set_ylabel("held-out loss - loop 1")
    gain.grid(alpha=0.3)
    gain.legend(fontsize=7)
    for axis in (ax, gain):
        for step in boundaries:
            axis.axvline(step, color="grey", ls="--", lw=0.8)
    gain.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_ylim(top=min(8.5, max(r["loss"] for r in steps)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("training curve" + (" (dashed: start of the next stage)" if boundaries else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main([Path(a) for a in sys.argv[1:-1]], Path(sys.argv[-1]))
