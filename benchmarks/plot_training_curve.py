"""Plot a run's training curve from its metrics.jsonl: loss per loop and held-out eval per loop.

Usage: python benchmarks/plot_training_curve.py RUN_DIR OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(run: Path, out: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    loops = sorted(k for k in steps[0] if k.startswith("ce_loop"))
    for key in loops:
        ax.plot([r["step"] for r in steps], [r[key] for r in steps], lw=0.6, alpha=0.6, label=f"train {key[3:]}")
    for key in sorted(evals[0]["eval"]) if evals else []:
        ax.plot([r["step"] for r in evals], [r["eval"][key] for r in evals], marker="o", label=f"held-out {key[5:]}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_ylim(top=min(8.5, max(r["loss"] for r in steps)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{run.name}: training curve")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
