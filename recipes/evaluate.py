"""Greedy acceptance length of drafters on the dev set (or `--prompts held-out`), per category, without running
generation.

    python recipes/evaluate.py --eagle3 runs/eagle3-smollm2/snapshots/step-* --dflash runs/dflash-smollm2/final \
        --out results/acceptance.json

The target's greedy continuations of the dev prompts are computed once (cached next to --out), and
a rerun with the same settings reuses the rows of drafter folders that have not changed since.
For each drafter folder, hindsight acceptance tables are walked as single-drafter generation
would walk them: acceptance length = tokens per round (accepted drafts + the target's token).
Snapshot folders named step-N give an acceptance-vs-training-steps curve (acceptance.png next to --out);
final folders of recipe runs on different amounts of data (`--set max_samples=N`) give an
acceptance-vs-data-size curve (acceptance_data.png). --out keeps the rows of the listed folders only,
so list every folder each time (unchanged ones are not evaluated again).
"""

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from hf_whiflash import DEFAULT_TARGET, DFlashDrafter, Eagle3Drafter, load_target
from hf_whiflash.bench import CATEGORIES, PROMPT_SETS, load_prompts
from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.hindsight import acceptance_tables, walk


def references(target, tokenizer, prompts: list[dict], max_new_tokens: int, cache: Path, name: str
               ) -> dict[str, list[int]]:
    """prompt id -> prompt + greedy continuation token ids (plain generate), cached as jsonl under the target's
    `name` (rows without one are the default target's: caches written before names were kept)."""
    done = {}
    if cache.exists():
        done = {r["id"]: r for r in map(json.loads, cache.open())
                if r["max_new_tokens"] == max_new_tokens and r.get("target", DEFAULT_TARGET) == name}
    with cache.open("a") as f:
        for p in prompts:
            if p["id"] in done:
                continue
            ids = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            out = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            done[p["id"]] = {"id": p["id"], "target": name, "max_new_tokens": max_new_tokens,
                             "prompt_length": ids.shape[1], "ids": out[0].tolist()}
            f.write(json.dumps(done[p["id"]]) + "\n")
            f.flush()
    return done


def acceptance_by_category(target, drafter, route: str, prompts, refs, eagle_steps: int, block_size) -> dict:
    lengths = {c: [] for c in CATEGORIES}
    for p in prompts:
        ref = refs[p["id"]]
        sequence = torch.tensor([ref["ids"]])
        kwargs = {"eagle": drafter} if route == "eagle3" else {"dflash": drafter}
        table = acceptance_tables(target, sequence, ref["prompt_length"], eagle_steps=eagle_steps,
                                  block_size=block_size, **kwargs).tables[route]
        budget = len(ref["ids"]) - ref["prompt_length"] - 1  # the prefill produced the first new token
        lengths[p["category"]] += [a + 1 for a in walk(table, budget)]
    result = {c: statistics.mean(v) for c, v in lengths.items() if v}
    result["overall"] = statistics.mean(x for v in lengths.values() for x in v)
    return result


def training_run(folder: Path) -> dict:
    """The run.json the recipe wrote next to `folder` (its final/ or snapshots/step-N); {} if none."""
    for parent in (folder.parent, folder.parent.parent):
        if (parent / "run.json").exists():
            return json.loads((parent / "run.json").read_text())
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--eagle3", nargs="*", default=[], help="EAGLE-3 drafter folders")
    parser.add_argument("--dflash", nargs="*", default=[], help="DFlash drafter folders")
    parser.add_argument("--eagle-steps", type=int, default=6, help="EAGLE-3 chain length (default 6)")
    parser.add_argument("--block-size", type=int, default=16, help="DFlash block size (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", default="dev", help="'dev', 'held-out' (prompts no training or tuning saw) or "
                                                         "a jsonl of {id, category, messages}")
    parser.add_argument("--per-category", type=int, help="first N prompts per category (default: all)")
    parser.add_argument("--out", default="results/acceptance.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_target(args.target)
    prompts = load_prompts(args.prompts, args.per_category)
    name = args.prompts if args.prompts in PROMPT_SETS else Path(args.prompts).stem
    refs = references(target, tokenizer, prompts, args.max_new_tokens, out.parent / f"{name}_references.jsonl",
                      args.target)
    settings = {k: v for k, v in vars(args).items() if k not in ("eagle3", "dflash", "out")}
    earlier = json.loads(out.read_text()) if out.exists() else {"settings": None}
    done = {}  # rows of an earlier run with the same settings, for drafters that did not change since
    if earlier["settings"] == settings:
        done = {(r["route"], r["folder"], r["version"]): r for r in earlier["results"]}
    rows = []
    for route, cls, folders in (("eagle3", Eagle3Drafter, args.eagle3), ("dflash", DFlashDrafter, args.dflash)):
        for folder in folders:
            version = max(p.stat().st_mtime for p in Path(folder).iterdir())
            row = done.get((route, str(folder), version))
            if row is None:
                drafter = cls.from_pretrained(folder).attach(target)
                result = acceptance_by_category(target, drafter, route, prompts, refs, args.eagle_steps,
                                                args.block_size)
                step = re.search(r"step-(\d+)", str(folder))
                run = training_run(Path(folder))
                row = {"route": route, "folder": str(folder), "version": version,
                       "step": int(step.group(1)) if step else None, "train_samples": run.get("train_samples"),
                       "train_steps": run.get("config", {}).get("max_steps"), "acceptance_length": result}
            rows.append(row)
            print(route, folder, {k: round(v, 2) for k, v in row["acceptance_length"].items()})
            write_text_atomically(out, json.dumps({"settings": settings, "results": rows}, indent=1))  # resumable
    steps_curve = [r for r in rows if r["step"] is not None]
    if steps_curve:
        plot_curve(steps_curve, "step", "training step", out.with_suffix(".png"))
    data_curve = [r for r in rows if r["step"] is None and r.get("train_samples")]
    if len({r["train_samples"] for r in data_curve}) > 1:
        steps = sorted({r["train_steps"] for r in data_curve})
        plot_curve(data_curve, "train_samples", f"training samples ({'/'.join(map(str, steps))} steps each)",
                   out.with_name(out.stem + "_data.png"))


def plot_curve(rows: list[dict], x: str, xlabel: str, path: Path) -> None:
    """Acceptance per category against the row field `x`, one panel per drafter kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = [route for route in ("eagle3", "dflash") if any(r["route"] == route for r in rows)]
    fig, axes = plt.subplots(1, len(routes), figsize=(5 * len(routes), 3.5), squeeze=False)
    for ax, route in zip(axes[0], routes):
        points = sorted((r for r in rows if r["route"] == route), key=lambda r: r[x])
        for category in (*CATEGORIES, "overall"):
            ax.plot([r[x] for r in points], [r["acceptance_length"].get(category) for r in points], marker="o",
                    label=category, linewidth=2.5 if category == "overall" else 1)
        ax.set_title(f"{route}: greedy acceptance length on the dev set")
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
