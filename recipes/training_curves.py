"""Training-set against dev-set accuracy per draft position, by training step and epoch, from the in-run
evaluations the trainers log (`eval_prompts` and `eval_every` in a recipe config): a drafter under-fits while
both curves are low and rising, has stalled where both are flat, and over-fits where the training curve
keeps rising while the dev curve falls.

    python recipes/training_curves.py runs/dflash-smollm2 runs/eagle3-smollm2 --out results/training-curves

Writes OUT.json (every evaluation of every run) and OUT.png (one panel per run: draft positions 1, 2, 3, 4
and 6, training set solid, dev set dashed), and prints each run's first and last evaluation.
"""

import argparse
import json
from pathlib import Path

from hf_whiflash.checkpoint import write_text_atomically

POSITIONS = (1, 2, 3, 4, 6)  # draft positions plotted and printed (1: the first draft)


def evaluations(run: Path) -> dict[str, list[dict]]:
    """split -> [{"step", "epoch", "accuracy", "counted"}] by step, from run/log.jsonl (a resumed run may log a
    step twice: the later row counts)."""
    log = run / "log.jsonl"
    if not log.is_file():
        raise SystemExit(f"{log} not found: pass the `out` folder of a recipe run")
    by_split: dict[str, dict[int, dict]] = {}
    for row in map(json.loads, log.open()):
        if "split" in row:
            by_split.setdefault(row["split"], {})[row["step"]] = {k: row[k] for k in ("step", "epoch", "accuracy",
                                                                                     "counted")}
    if not by_split:
        raise SystemExit(f"{log} holds no evaluations: train with eval_prompts and eval_every set")
    return {split: [rows[step] for step in sorted(rows)] for split, rows in by_split.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="recipe output folders (their log.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("results/training-curves"), help="writes OUT.json, OUT.png")
    args = parser.parse_args()
    report = {str(run): evaluations(run) for run in args.runs}
    print("| run | split | step | epoch | " + " | ".join(f"position {p}" for p in POSITIONS) + " |")
    print("|---|---|---|---|" + "---|" * len(POSITIONS))
    for run, splits in report.items():
        for split, rows in splits.items():
            for row in (rows[0], rows[-1]) if len(rows) > 1 else rows:
                accuracy = [f"{row['accuracy'][p - 1]:.3f}" if p <= len(row["accuracy"]) else "–" for p in POSITIONS]
                print(f"| {run} | {split} | {row['step']} | {row['epoch']} | " + " | ".join(accuracy) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.out.with_suffix(".json"), json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(6 * len(report), 4), squeeze=False)
    for ax, (run, splits) in zip(axes[0], report.items()):
        for position, color in zip(POSITIONS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
            for split, rows in splits.items():
                shown = [r for r in rows if position <= len(r["accuracy"])]
                ax.plot([r["step"] for r in shown], [r["accuracy"][position - 1] for r in shown],
                        "-" if split == "train" else "--", marker=".", color=color,
                        label=f"position {position}, {split}")
        steps_per_epoch = next((r["step"] / r["epoch"] for rows in splits.values() for r in rows if r["epoch"]), None)
        if steps_per_epoch:  # epochs on a second axis: under- or over-fitting shows against passes over the data
            top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
            top.set_xlabel("epoch")
        ax.set_xlabel("training step")
        ax.set_ylabel("top-1 accuracy (teacher-forced)")
        ax.set_title(f"{Path(run).name}: training set solid, dev set dashed", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
