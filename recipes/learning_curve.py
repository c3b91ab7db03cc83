"""Acceptance against training tokens, its log-linear trend, and what the trend says reaching a goal would cost.

    python recipes/learning_curve.py recipes/configs/learning_curve_smollm2.yaml --out results/learning-curve

The config names evaluate.py result files and, for each evaluated folder, how many training steps it had seen.
Training tokens = steps x batch size x mean tokens per training sequence (the samples the trainers keep, cut
at max_len). Per drafter and category the dev-set points are fitted with acceptance = a + b * log2(tokens);
the fit gives the tokens at which each goal would be reached and, at the throughput file's fastest measured
rates on this class of CPU, the hours of training (target features computed online) and of generating that
many fresh tokens. A log-linear trend of a curve that saturates is optimistic, so both figures are lower bounds.
Writes OUT.json, OUT.png and prints a markdown table.
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import yaml

from data import restore_files
from features import read_samples
from hf_whiflash.checkpoint import write_text_atomically


def mean_sequence_tokens(archive: Path, max_len: int) -> float:
    """Mean tokens of the sequences the trainers train on: the archive's samples as read_samples gives them."""
    with tempfile.TemporaryDirectory() as folder:
        restore_files(archive, Path(folder))
        samples = read_samples(Path(folder), max_len)
    return sum(len(s["input_ids"]) for s in samples) / len(samples)


def points(result_files: dict, route: str, tokens_per_step: float) -> list[dict]:
    """[{tokens, steps, folder, acceptance_length}] of the listed folders, in training order."""
    rows = []
    for path, steps_by_folder in result_files.items():
        found = {r["folder"]: r for r in json.loads(Path(path).read_text())["results"] if r["route"] == route}
        for folder, steps in steps_by_folder.items():
            if folder not in found:
                raise SystemExit(f"{path} has no {route} row for {folder}: evaluate it, or fix the config")
            rows.append({"steps": steps, "tokens": steps * tokens_per_step, "folder": folder,
                         "acceptance_length": found[folder]["acceptance_length"]})
    return sorted(rows, key=lambda r: r["tokens"])


def fit(rows: list[dict], category: str) -> tuple[float, float]:
    """(a, b) of acceptance = a + b * log2(tokens), least squares."""
    x = np.log2([r["tokens"] for r in rows])
    y = np.array([r["acceptance_length"][category] for r in rows])
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def fastest(stage: dict) -> float:
    return max(v for k, v in stage.items() if k.endswith("tokens_per_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (see recipes/configs/learning_curve_smollm2.yaml)")
    parser.add_argument("--out", default="results/learning-curve", help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    sequence_tokens = mean_sequence_tokens(Path(config["data"]), config["max_len"])
    stages = json.loads(Path(config["throughput"]).read_text())["stages"]
    generate_rate = fastest(stages["generation"])
    report = {"config": config, "mean_sequence_tokens": sequence_tokens, "drafters": {}}
    print("| drafter | category | now (tokens) | per doubling | goal | tokens for goal | x now | training h | "
          "fresh data h |\n|---|---|---|---|---|---|---|---|---|")
    for route, spec in config["drafters"].items():
        tokens_per_step = spec["batch_size"] * sequence_tokens
        curves = {name: points(files, route, tokens_per_step) for name, files in spec["prompts"].items()}
        # online features: every training token also costs a target forward
        train_rate = 1 / (1 / fastest(stages[f"train_{route}"]) + 1 / fastest(stages["features"]))
        dev, goals = curves["dev"], []
        for category, goal in config["goals"][route].items():
            a, b = fit(dev, category)
            now = dev[-1]
            tokens = 2 ** ((goal - a) / b) if b > 1e-6 else math.inf  # a flat trend never gets there
            goals.append({"category": category, "goal": goal, "a": a, "per_doubling": b, "tokens": tokens,
                          "times_now": tokens / now["tokens"],
                          "training_hours": (tokens - now["tokens"]) / train_rate / 3600,
                          "fresh_data_hours": tokens / generate_rate / 3600})
            g = goals[-1]
            print(f"| {route} | {category} | {now['acceptance_length'][category]:.2f} ({now['tokens']:.2g}) | "
                  f"+{b:.3f} | {goal} | {tokens:.2g} | {g['times_now']:.0f} | {g['training_hours']:,.0f} | "
                  f"{g['fresh_data_hours']:,.0f} |")
        report["drafters"][route] = {"tokens_per_step": tokens_per_step, "training_tokens_per_s": train_rate,
                                     "generation_tokens_per_s": generate_rate, "curves": curves, "goals": goals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out.with_suffix(".json"), json.dumps(report, indent=1))
    plot(report["drafters"], out.with_suffix(".png"))


def plot(drafters: dict, path: Path) -> None:
    """Per drafter: measured points (dev: filled, other prompt sets: hollow), fits extended to each goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drafters), figsize=(6 * len(drafters), 4), squeeze=False)
    for ax, (route, report) in zip(axes[0], drafters.items()):
        for g, color in zip(report["goals"], ("tab:purple", "tab:blue", "tab:orange")):
            category = g["category"]
            for name, rows in report["curves"].items():
                ax.plot([r["tokens"] for r in rows], [r["acceptance_length"][category] for r in rows], "o",
                        color=color, fillstyle="full" if name == "dev" else "none",
                        label=f"{category} ({name})")
            if math.isfinite(g["tokens"]):
                x = np.geomspace(report["curves"]["dev"][0]["tokens"], g["tokens"], 50)
                ax.plot(x, g["a"] + g["per_doubling"] * np.log2(x), "--", color=color, linewidth=1)
            ax.axhline(g["goal"], color=color, linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (log scale)")
        ax.set_ylabel("greedy acceptance length")
        ax.set_title(f"{route}: measured (dots), log-linear trend (dashed), goals (dotted)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
