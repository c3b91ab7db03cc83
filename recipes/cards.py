"""Model cards for trained drafters, written from the run's own figures (huggingface_hub ModelCard).

    python recipes/cards.py runs/eagle3-smollm2 --acceptance results/acceptance.json --out runs/eagle3-smollm2/README.md

Reads the run folder a recipe wrote (run.json: config and training samples; log.jsonl: the last logged
teacher-forced figures; final/: the drafter) and, with --acceptance, the dev-set acceptance that
recipes/evaluate.py measured for its final/ folder, which becomes the card's `eval_results`.
The trainers' `--push-to-hub REPO` uploads the card built here for their run.
"""

import argparse
import json
from pathlib import Path

from hf_whiflash.drafters.eagle3 import Eagle3Config
from hf_whiflash.names import ROUTES
from hf_whiflash.targets import HUB_ORIGINALS

NAMES = {"eagle3": "An EAGLE-3", "dflash": "A DFlash"}
USAGE = {
    "eagle3": "assistant = WhiFlashAssistant(target, eagle3=Eagle3Drafter.from_pretrained({repo!r}))",
    "dflash": "assistant = WhiFlashAssistant(target, dflash=DFlashDrafter.from_pretrained({repo!r}))",
}


def hub_id(target: str) -> str | None:
    """The Hub id of the target a run trained for: a packaged target's original, a Hub id as is, a folder None."""
    originals = {packaged: hub for hub, packaged in HUB_ORIGINALS.items()}
    if target in originals:
        return originals[target]
    return target if target.count("/") == 1 and not Path(target).exists() else None


def dev_acceptance(result: dict, final: Path) -> dict[str, float] | None:
    """Acceptance length per category that recipes/evaluate.py measured for `final` (None if it has no row)."""
    rows = [r for r in result["results"] if Path(r["folder"]).resolve() == final.resolve()]
    return rows[-1]["acceptance_length"] if rows else None


def engine_note(final: Path) -> str:
    """What a serving engine must know about the EAGLE-3 head in `final`: which target layers it reads."""
    layers = Eagle3Config(json.loads((final / "config.json").read_text())).feature_layers
    if layers is None:
        return ("\n`config.json` names no target layers: the head reads the EAGLE-3 default (`hidden_states` 2, L/2, "
                "L-3), which vLLM and SGLang also pick without them.\n")
    return (f"\n`config.json` names the target layers the head reads in each engine's convention: "
            f"`eagle_aux_hidden_state_layer_ids` {layers} (vLLM: `hidden_states` indices, the stream entering those "
            f"layers) and `eagle_config.eagle_aux_hidden_state_layer_ids` {[i - 1 for i in layers]} (SGLang and "
            f"SpecForge: outputs of those decoder layers).\n")


def drafter_card(run: Path, acceptance: Path | None = None, repo_id: str | None = None):
    """The ModelCard of the drafter in `run`/final."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    info = json.loads((run / "run.json").read_text())
    config = info["config"]
    kind = "eagle3" if "draft_vocab_size" in config else "dflash"
    logged = [json.loads(line) for line in (run / "log.jsonl").open()]
    last = logged[-1] if logged else {}
    evaluation = json.loads(acceptance.read_text()) if acceptance else {"settings": {}, "results": []}
    per_category = dev_acceptance(evaluation, run / "final")
    settings = evaluation["settings"]
    length = f"chain of {settings.get('eagle_steps')}" if kind == "eagle3" else f"block {settings.get('block_size')}"
    results = [EvalResult(task_type="text-generation", task_name="Speculative decoding (greedy)",
                          dataset_type="hf_whiflash/dev_set", dataset_name="WhiFlash dev set", dataset_config=category,
                          metric_type="acceptance_length", metric_value=round(value, 2),
                          metric_name=f"acceptance length ({category}, {length})")
               for category, value in (per_category or {}).items()]
    name = repo_id.split("/")[-1] if repo_id else run.name
    data = ModelCardData(license="apache-2.0", base_model=hub_id(config["target"]), library_name="hf-whiflash",
                         pipeline_tag="text-generation", tags=["speculative-decoding", kind, "draft-model", "whiflash"],
                         model_name=name, eval_results=results or None)
    training = [("target", config["target"]), ("training samples", info.get("train_samples")),
                ("optimizer steps", last.get("step")), ("batch size", config.get("batch_size")),
                ("learning rate", config.get("lr")), ("max length", config.get("max_len")),
                ("last logged loss", round(last["loss"], 4) if "loss" in last else None)]
    training += [(f"last logged {k} (teacher-forced)", round(v, 3)) for k, v in last.items()
                 if k.startswith(("acc", "accept"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in training if v is not None)
    if per_category:
        figures = "| category | acceptance length |\n|---|---|\n" + "\n".join(
            f"| {c} | {v:.2f} |" for c, v in per_category.items())
        evaluated = (f"Greedy acceptance length on the WhiFlash dev set ({length}; tokens per round, "
                     f"`recipes/evaluate.py`):\n\n{figures}")
    else:
        evaluated = ("Not evaluated on the dev set yet: run `recipes/evaluate.py` and rebuild this card with "
                     "`--acceptance`.")
    content = f"""---
{data.to_yaml()}
---

# {name}

{NAMES[kind]} drafter for `{config["target"]}`, trained with the hf_whiflash recipe
(`recipes/train_{kind}.py`): it reads the target's hidden states and proposes tokens that the target
verifies, so output is unchanged and generation faster wherever drafts are accepted.
{engine_note(run / "final") if kind == "eagle3" else ""}
```python
from hf_whiflash import WhiFlashAssistant, {"Eagle3Drafter" if kind == "eagle3" else "DFlashDrafter"}, load_target

target, tokenizer = load_target({config["target"]!r})
{USAGE[kind].format(repo=repo_id or str(run / "final"))}
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Write a haiku about speed."}}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = target.generate(**inputs, max_new_tokens=64, assistant_model=assistant)
```

## Training

| | |
|---|---|
{table}

## Evaluation

{evaluated}
"""
    return ModelCard(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help=f"a recipe's output folder ({' or '.join(ROUTES)} run)")
    parser.add_argument("--acceptance", type=Path, help="recipes/evaluate.py's results file")
    parser.add_argument("--repo-id", help="the Hub repo the drafter goes to (names the card and its snippet)")
    parser.add_argument("--out", type=Path, required=True, help="card to write (markdown)")
    args = parser.parse_args()
    card = drafter_card(args.run, args.acceptance, args.repo_id)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(str(card))
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
