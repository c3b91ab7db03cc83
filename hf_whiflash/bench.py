"""`whiflash bench`: every decoding system a transformers user could pick, on the same prompts and target.

Systems run interleaved (the order rotates from prompt to prompt) so machine drift hits all of them alike.
Every finished run is appended to `runs.jsonl` in the output folder at once, so a killed bench loses at most
the run in progress, and rerunning the same command resumes where it stopped. Per system, mode (greedy /
sampling) and prompt category: tokens/s, speedup over plain generate() (median of per-prompt ratios, with its
95% bootstrap interval; `speedups` pairs any two systems the same way), acceptance length, share of rounds per
paradigm, catch-up time as % of round time and peak extra memory (weights the system adds to the target's,
plus the peak growth while generating). Writes bench.json, bench.md, speedup.png, trace.png; both name the
machine (CPU model, family and model number), and the hf_whiflash, torch and transformers versions.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from .names import DFLASH, EAGLE, GREEDY, LOOKUP, POLICY_FOLDER, ROUTES, SAMPLED, SAMPLING, TARGET
from .checkpoint import write_text_atomically
from .stats import Clock
from .targets import cpu_info

PROMPT_SETS = {"dev": Path(__file__).parent / "data" / "dev_set.jsonl",  # recipes tune on it
               "held-out": Path(__file__).parent / "data" / "held_out.jsonl"}  # nothing trains or tunes on it
CATEGORIES = ("code", "tool", "math", "chat")
MODES = {GREEDY: dict(do_sample=False), SAMPLED: dict(do_sample=True, **SAMPLING)}


@dataclass
class Run:
    prompt_id: str
    category: str
    system: str
    mode: str
    new_tokens: int
    seconds: float
    peak_mb: float  # weights added to the target's (drafters, assistant model) + peak growth while generating
    repeat: int = 0  # which of the --repeats runs of this prompt, system and mode
    output: str = ""  # digest of the generated ids: greedy runs compare it with plain generate()'s
    acceptance: float | None = None  # tokens per round (accepted drafts + 1)
    rounds_per_route: dict = field(default_factory=dict)
    catch_up_share: float | None = None
    routing_share: float | None = None  # features + policy decision, share of round time
    tokens_per_cost: float | None = None  # tokens per second of modelled round cost (LatencyModel)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator peak, or the process RSS sampled every 2 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._done.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = self._rss()
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._done.set()
            self._thread.join()
            self.peak_mb = max(0, self._peak - self._start) / 2**20


def added_weights_mb(target, extra: dict) -> float:
    """MB of weights a system holds beyond the target's own: drafters and router, or an assistant model, and
    packed weight copies (kernels.py). Tensors it shares with the target (DFlash reads the target's embedding
    and LM head) count once, as target's."""
    model, kernels = extra.get("assistant_model"), extra.get("kernels")
    kernels = getattr(model, "kernels", kernels)
    packed = kernels.packed_mb if kernels is not None else 0.0
    if model is None:
        return packed
    shared = {t.data_ptr() for t in (*target.parameters(), *target.buffers())}
    added = {t.data_ptr(): t.nbytes for t in (*model.parameters(), *model.buffers()) if t.data_ptr() not in shared}
    return sum(added.values()) / 2**20 + packed


def load_prompts(source: str, per_category: int | None) -> list[dict]:
    """`dev`, `held-out` (the packaged prompt sets) or a jsonl file of {"id", "category", "messages"}."""
    path = PROMPT_SETS.get(source) or Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {source}: no such file; use 'dev', 'held-out' or a jsonl of "
                                '{"id", "category", "messages"} rows')
    rows = [json.loads(line) for line in path.open()]
    if per_category is not None:
        rows = [r for c in CATEGORIES for r in [r for r in rows if r["category"] == c][:per_category]]
    return rows


SYSTEMS = ("plain", "plain-packed", "prompt-lookup", "assisted", "eagle3", "dflash", "lookup", "whiflash",
           "whiflash-entropy", "whiflash-neural", "oracle")
ROUTED_SYSTEMS = {"whiflash", "whiflash-entropy", "whiflash-neural", "oracle"}  # a router picks each round's route
NEEDS_DRAFTERS = {"eagle3", "dflash", "lookup", "whiflash", "whiflash-entropy", "whiflash-neural", "oracle"}


# A WhiFlash system's draft length setting after "@": eagle3@3 (a fixed chain of 3), dflash@7 (block of 7 drafts),
# eagle3@fixed (the calibrated fixed length), eagle3@dynamic (every drafter's draft cut per round by confidence,
# DraftCut); without one, the assistant's default: calibrated lengths, cut per round.
FIXED_LENGTH = {"eagle3": "eagle_steps", "dflash": "dflash_block_size"}
LENGTH_SETTINGS = {"eagle3", "dflash", "lookup", "whiflash", "whiflash-entropy", "whiflash-neural"}  # @fixed, @dynamic


def split_system(name: str) -> tuple[str, dict]:
    """'eagle3@3' -> ('eagle3', {'eagle_steps': 3}); the WhiFlashAssistant settings a system name asks for."""
    base, _, setting = name.partition("@")
    if not setting:
        return base, {}
    if setting in ("dynamic", "fixed") and base in LENGTH_SETTINGS:
        return base, {"dynamic_lengths": setting == "dynamic"}
    if setting.isdigit() and int(setting) > 0 and base in FIXED_LENGTH:
        return base, {FIXED_LENGTH[base]: int(setting) + (base == "dflash")}  # a block = last token + drafts
    raise ValueError(f"system {name!r}: after '@' use a draft count (eagle3@3, dflash@7), 'fixed' or 'dynamic' "
                     f"({', '.join(sorted(LENGTH_SETTINGS))})")


def check_systems(systems: list[str], drafters_folder, assistant_name: str | None = None) -> None:
    """Raise ValueError, before any model loads, for systems that do not exist or lack what they need."""
    unknown = [s for s in systems if split_system(s)[0] not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    systems = [split_system(s)[0] for s in systems]
    if "assisted" in systems and assistant_name is None:
        raise ValueError("the 'assisted' system needs --assistant MODEL: a smaller model with the target's tokenizer")
    if drafters_folder is None and NEEDS_DRAFTERS & set(systems):
        raise ValueError(f"no trained drafters for this target, and systems {sorted(NEEDS_DRAFTERS & set(systems))} "
                         "need them: pass --drafters FOLDER (train them with recipes/), or compare only --systems "
                         "plain prompt-lookup assisted")
    if "whiflash-neural" in systems and not (Path(drafters_folder) / POLICY_FOLDER).is_dir():
        raise ValueError(f"{drafters_folder} has no trained router ({POLICY_FOLDER}/): train one with "
                         "recipes/train_router.py, or leave whiflash-neural out of --systems")


def build_systems(target, drafters_folder, systems: list[str], assistant_name: str | None = None) -> dict:
    """name -> extra generate() kwargs (a WhiFlash assistant, a smaller assistant model, or prompt lookup), or
    for plain-packed, {"kernels": PackedLinears}: plain decoding with the packed weights WhiFlash generates
    with, to tell the kernels' share of a speedup from speculation's. `assistant_name`: the smaller
    same-tokenizer model that transformers' own assisted generation uses."""
    from .assistant import WhiFlashAssistant
    from .kernels import PackedLinears
    from .routing import EntropyPolicy, NeuralPolicy
    from .targets import load_target

    check_systems(systems, drafters_folder, assistant_name)
    folder = Path(drafters_folder) if drafters_folder is not None else None

    def assistant(routes, settings: dict, policy=None):
        return {"assistant_model": WhiFlashAssistant.from_pretrained(target, folder, routes=routes, policy=policy,
                                                                     **settings)}

    makers = {  # base system name -> (its WhiFlashAssistant settings from split_system -> generate() kwargs)
        "plain": lambda _: {},
        "plain-packed": lambda _: {"kernels": PackedLinears([target])},
        "prompt-lookup": lambda _: {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 2},
        "assisted": lambda _: {"assistant_model": load_target(assistant_name, dtype=target.dtype,
                                                              device=target.device)[0]},
        "eagle3": lambda settings: assistant((EAGLE,), settings),
        "dflash": lambda settings: assistant((DFLASH,), settings),
        "lookup": lambda settings: assistant((LOOKUP,), settings),
        "whiflash": lambda settings: assistant(ROUTES, settings),  # the folder's own router
        "whiflash-entropy": lambda settings: assistant(ROUTES, settings, EntropyPolicy()),
        "whiflash-neural": lambda settings: assistant(ROUTES, settings,
                                                      NeuralPolicy.from_pretrained(folder / POLICY_FOLDER)),
        # Routes with an OracleRouter made for each prompt by prepare_oracle (a plain policy until then), whose
        # hindsight replays fixed lengths.
        "oracle": lambda _: assistant(ROUTES, {"dynamic_lengths": False}, EntropyPolicy()),
    }
    return {name: makers[base](settings) for name, (base, settings) in ((n, split_system(n)) for n in systems)}


def whiflash_assistant(extra: dict):
    """The WhiFlashAssistant among a system's generate() kwargs, if any (not a plain assistant model)."""
    from .assistant import WhiFlashAssistant

    assistant = extra.get("assistant_model")
    return assistant if isinstance(assistant, WhiFlashAssistant) else None


def prepare_oracle(target, assistant, ids, max_new_tokens: int, latency) -> None:
    """Route `assistant` with hindsight of this prompt: the target's own greedy continuation, and each
    drafter's acceptance on it."""
    from .hindsight import acceptance_tables
    from .routing import OracleRouter

    reference = target.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    lengths = assistant.draft_lengths[GREEDY]  # 0: that drafter does not draft on this machine
    hindsight = acceptance_tables(target, reference, ids.shape[1], assistant.eagle3 if lengths[EAGLE] else None,
                                  assistant.dflash if lengths[DFLASH] else None, lengths[EAGLE], lengths[DFLASH] + 1,
                                  assistant.lookup if lengths[LOOKUP] else None)
    assistant.policy = OracleRouter(hindsight.tables, latency)


def tokens_per_cost(stats, latency, sampling: bool) -> float | None:
    """Tokens per second of modelled round cost: what routing achieves independently of timing noise."""
    rounds = [r for r in stats.rounds if r.route != TARGET and r.drafted]
    cost = sum(latency.round_seconds(r.route, r.drafted, sampling) for r in rounds)
    return sum(r.accepted + 1 for r in rounds) / cost if cost else None


def system_generate(target, ids, extra: dict, **kwargs):
    """target.generate() as a system runs it: with its extra kwargs, or (plain-packed) inside its packed weights."""
    if "kernels" in extra:
        with extra["kernels"].active():
            return target.generate(ids, **kwargs)
    return target.generate(ids, **kwargs, **extra)


def run_one(target, ids, system: str, extra: dict, mode: str, max_new_tokens: int, seed: int, prompt,
            latency=None, repeat: int = 0) -> Run:
    torch.manual_seed(seed)
    clock = Clock(target.device)
    with PeakMemory(target.device) as memory:
        start = clock()
        out = system_generate(target, ids, extra, max_new_tokens=max_new_tokens, **MODES[mode])
        seconds = clock() - start
    run = Run(prompt["id"], prompt["category"], system, mode, out.shape[1] - ids.shape[1], seconds,
              added_weights_mb(target, extra) + memory.peak_mb, repeat,
              hashlib.sha256(out[0, ids.shape[1]:].cpu().numpy().tobytes()).hexdigest()[:16])
    assistant = whiflash_assistant(extra)
    if assistant is not None:
        summary = assistant.stats.summary()
        run.acceptance = summary["acceptance_length"]
        run.rounds_per_route = summary["rounds_per_route"]
        run.catch_up_share = summary["catch_up_share"]
        run.routing_share = summary["routing_share"]
        if latency is not None:
            run.tokens_per_cost = tokens_per_cost(assistant.stats, latency, mode == SAMPLED)
    return run


def prompt_ids(tokenizer, prompt: dict, device) -> torch.Tensor:
    return tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"].to(device)  # [1, prompt_len]


def runs_in(system: str, mode: str) -> bool:
    """The oracle routes with hindsight of greedy output, so it runs in greedy mode only."""
    return system != "oracle" or mode == GREEDY


def warm_up(target, ids, systems: dict, modes: list[str], max_new_tokens: int, latency) -> None:
    """One untimed generation per system and mode before any timing. Without it the first timed run
    pays one-off costs (kernel selection, allocator growth, lazy imports): once, a single 10 s plain
    generation on the first prompt made code read 2.4x."""
    for mode in modes:
        for name, extra in systems.items():
            if not runs_in(name, mode):
                continue
            if name == "oracle":
                prepare_oracle(target, extra["assistant_model"], ids, max_new_tokens, latency)
            system_generate(target, ids, extra, max_new_tokens=max_new_tokens, **MODES[mode])


def benchmark(target, tokenizer, prompts: list[dict], systems: dict, modes: list[str], max_new_tokens: int,
              repeats: int, seed: int, latency=None, progress=True, log: "RunLog | None" = None):
    """All runs, plus the per-round trace of one greedy WhiFlash generation (for the trace plot). With a `log`,
    runs it already holds are not run again, and every new run is appended to it as soon as it finishes."""
    from tqdm import tqdm

    done = log.runs if log is not None else {}
    trace = log.trace() if log is not None else None
    warm_up(target, prompt_ids(tokenizer, prompts[0], target.device), systems, modes, min(16, max_new_tokens),
            latency)
    names, runs = list(systems), []
    total = sum(len(prompts) * repeats * sum(runs_in(n, m) for n in names) for m in modes)
    with tqdm(total=total, desc="bench", disable=not progress, initial=len(done)) as bar:
        for mode in modes:
            for i, prompt in enumerate(prompts):
                ids = prompt_ids(tokenizer, prompt, target.device)
                order = names[i % len(names):] + names[:i % len(names)]  # rotate: drift hits every system
                keys = [(mode, prompt["id"], name, r) for r in range(repeats) for name in order if runs_in(name, mode)]
                runs += [done[key] for key in keys if key in done]
                if all(key in done for key in keys):
                    continue
                if "oracle" in systems and runs_in("oracle", mode):
                    prepare_oracle(target, systems["oracle"]["assistant_model"], ids, max_new_tokens, latency)
                for key in (key for key in keys if key not in done):
                    name, repeat = key[2], key[3]
                    # Each repeat draws afresh (its own seed, the same for every system): sampled speed depends on
                    # what is drawn, so repeats average over draws as well as over timing noise.
                    runs.append(run_one(target, ids, name, systems[name], mode, max_new_tokens,
                                        seed + i + repeat * len(prompts), prompt, latency, repeat))
                    bar.update(1)
                    assistant = whiflash_assistant(systems[name])
                    if trace is None and mode == GREEDY and assistant is not None and len(assistant.drafters) > 1:
                        trace = {"prompt_id": prompt["id"], "rounds": assistant.stats.to_dict()["rounds"]}
                        if log is not None:
                            log.save_trace(trace)
                    if log is not None:
                        log.append(runs[-1])
    return runs, trace


class RunLog:
    """A bench's output folder as it fills: `request.json` (the settings the runs belong to), `runs.jsonl`
    (one finished run per line, appended and flushed at once) and `trace.json`; bench.json once finished.
    Opening it checks, before any model loads, that the folder is writable and holds no unfinished runs
    of other settings; a bench of the same settings resumes (a finished one is only summarized again)."""

    def __init__(self, out: Path, request: dict):
        self.out = Path(out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            raise ValueError(f"cannot write bench results to {self.out} ({error.strerror}): pass a writable --out") \
                from None
        request_path = self.out / "request.json"
        if request_path.is_file() and json.loads(request_path.read_text()) != request:
            raise ValueError(f"{self.out} holds bench runs of other settings (see {request_path}): pass another --out, "
                             "or delete that folder to start over")
        write_text_atomically(request_path, json.dumps(request, indent=1))
        self.runs = {(r.mode, r.prompt_id, r.system, r.repeat): r for r in self._read_runs()}
        if (self.out / "bench.json").is_file():  # measured runs are never thrown away by a rerun
            print(f"note: {self.out} holds a finished bench of these settings: its summary is written again from "
                  "its runs, nothing is measured (pass another --out to measure again)", file=sys.stderr)

    def _read_runs(self) -> list[Run]:
        path = self.out / "runs.jsonl"
        if not path.is_file():
            return []
        lines = path.read_text().split("\n")
        if lines[-1]:  # a kill mid-append leaves a torn last line: that run is simply run again
            print(f"note: dropping an unfinished last line of {path}", file=sys.stderr)
            path.write_text("\n".join(lines[:-1]) + "\n" if len(lines) > 1 else "")
        return [Run(**json.loads(line)) for line in lines[:-1]]

    def append(self, run: Run) -> None:
        with open(self.out / "runs.jsonl", "a") as f:
            f.write(json.dumps(asdict(run)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def trace(self) -> dict | None:
        path = self.out / "trace.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_trace(self, trace: dict) -> None:
        write_text_atomically(self.out / "trace.json", json.dumps(trace))


def speedups(runs: list[Run], mode: str, system: str, category: str = "overall",
             baseline: str = "plain") -> list[float]:
    """Per prompt that both ran: `system`'s tok/s over `baseline`'s, each the median of its repeats. Against
    another drafting system (baseline="eagle3@3"), their median and median_interval tell whether one is faster
    on these prompts: paired by prompt, the comparison is not blurred by how prompts differ from each other."""
    def rates(name: str) -> dict[str, float]:
        per_prompt = {}
        for r in runs:
            if r.mode == mode and r.system == name and category in ("overall", r.category):
                per_prompt.setdefault(r.prompt_id, []).append(r.tokens_per_s)
        return {prompt: statistics.median(values) for prompt, values in per_prompt.items()}

    ours, theirs = rates(system), rates(baseline)
    return [ours[prompt] / theirs[prompt] for prompt in ours if prompt in theirs]


def summarize(runs: list[Run]) -> dict:
    """{mode: {system: {category|"overall": metrics}}}; speedup = median over prompts of tok/s vs plain."""
    plain_output = {(r.mode, r.prompt_id): r.output for r in runs if r.system == "plain"}
    table = {}
    for mode in sorted({r.mode for r in runs}):
        for system in dict.fromkeys(r.system for r in runs):
            for category in (*CATEGORIES, "overall"):
                chosen = [r for r in runs if r.mode == mode and r.system == system
                          and (category == "overall" or r.category == category)]
                if not chosen:
                    continue
                ratios = speedups(runs, mode, system, category)
                rounds = {}
                for r in chosen:
                    for route, n in r.rounds_per_route.items():
                        rounds[route] = rounds.get(route, 0) + n
                drafting = sum(n for route, n in rounds.items() if route != TARGET)
                acceptance = [r.acceptance for r in chosen if r.acceptance is not None]
                catch_up = [r.catch_up_share for r in chosen if r.catch_up_share is not None]
                routing = [r.routing_share for r in chosen if r.routing_share is not None]
                per_cost = [r.tokens_per_cost for r in chosen if r.tokens_per_cost is not None]
                compared = [r.output == plain_output[mode, r.prompt_id] for r in chosen
                            if mode == GREEDY and (mode, r.prompt_id) in plain_output]
                table.setdefault(mode, {}).setdefault(system, {})[category] = {
                    "prompts": len({r.prompt_id for r in chosen}),
                    "tokens_per_s": statistics.median(r.tokens_per_s for r in chosen),
                    "speedup": statistics.median(ratios) if ratios else None,
                    "speedup_interval": median_interval(ratios) if ratios else None,
                    "acceptance": statistics.mean(acceptance) if acceptance else None,
                    "route_share": {k: v / drafting for k, v in rounds.items() if k != TARGET} if drafting else {},
                    "catch_up_pct": 100 * statistics.mean(catch_up) if catch_up else None,
                    "routing_pct": 100 * statistics.mean(routing) if routing else None,
                    "tokens_per_cost": statistics.mean(per_cost) if per_cost else None,
                    "peak_mb": statistics.median(r.peak_mb for r in chosen),
                    "identical": statistics.mean(compared) if compared else None,  # greedy: share equal to plain
                    "over_single_routes": over_single_routes(runs, mode, system, category),
                }
    return table


def over_single_routes(runs: list[Run], mode: str, system: str, category: str) -> dict:
    """A routing system's tok/s over each single-route system of the run (eagle3, dflash, lookup, with or without
    '@'), paired by prompt: {baseline: {"ratio": median, "interval": 95% bootstrap}}; {} for other systems."""
    if system.split("@")[0] not in ROUTED_SYSTEMS:
        return {}
    singles = dict.fromkeys(r.system for r in runs if r.mode == mode and r.system.split("@")[0] in ROUTES)
    paired = {baseline: speedups(runs, mode, system, category, baseline) for baseline in singles}
    return {baseline: {"ratio": statistics.median(ratios), "interval": median_interval(ratios)}
            for baseline, ratios in paired.items() if ratios}


def median_interval(values: list[float], resamples: int = 1000) -> list[float]:
    """95% bootstrap interval of the median of `values` (resampled with replacement): where the median speedup
    could land on other prompts like these. On a 2-core VM two systems running the same chain differed by up
    to 9% in a category of 20 prompts; the interval tells such noise from a real gap."""
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[round(0.025 * resamples)], medians[round(0.975 * resamples) - 1]]


def markdown(summary: dict, meta: dict) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    cpu, versions = meta["cpu"], meta["versions"]
    family = f"family {cpu['family']} model {cpu['model']}" if cpu["family"] else "family and model not reported"
    lines = [f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; {meta.get('dtype', 'torch.float32')}; {meta['date']}; "
             f"{meta['duration_s'] / 60:.1f} min  ",
             f"CPU: {cpu['model_name']}, {family}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  "]
    lines += [f"{name}: {text}  " for name, text in meta.get("draft_lengths", {}).items()] + [""]
    for mode, systems in summary.items():
        lines += [f"### {mode}", "",
                  "| system | " + " | ".join(f"{c} speedup" for c in CATEGORIES) + " | overall speedup (95% interval)"
                  + " | tok/s | acceptance | EAGLE-3 / DFlash / lookup rounds | catch-up % | routing % | tokens/cost-s"
                  " | extra peak MB | identical to plain |",
                  "|---" * (len(CATEGORIES) + 10) + "|"]
        for system, cats in systems.items():
            overall = cats["overall"]
            share = overall["route_share"]
            routes = " / ".join(f"{100 * share.get(r, 0):.0f}%" for r in ROUTES) if share else "–"
            identical = "–" if overall["identical"] is None else f"{100 * overall['identical']:.0f}%"
            interval = "" if overall["speedup_interval"] is None else " ({:.2f}-{:.2f})".format(
                *overall["speedup_interval"])
            lines.append(f"| {system} | " + " | ".join(fmt(cats.get(c, {}).get("speedup"), ".2f") + "x"
                                                      for c in (*CATEGORIES, "overall"))
                         + f"{interval} | {overall['tokens_per_s']:.1f} | {fmt(overall['acceptance'], '.2f')} | "
                         f"{routes} | {fmt(overall['catch_up_pct'], '.1f')} | {fmt(overall['routing_pct'], '.2f')} | "
                         f"{fmt(overall['tokens_per_cost'], '.1f')} | {overall['peak_mb']:.0f} | {identical} |")
        lines += ["", *route_shares(systems), "", *single_route_ratios(systems), ""]
    return "\n".join(lines)


def single_route_ratios(systems: dict) -> list[str]:
    """Markdown table: each routing system over each single route alone, paired by prompt, per category."""
    rows = [(name, baseline) for name, cats in systems.items() for baseline in cats["overall"].get("over_single_routes", {})]
    if not rows:
        return []
    cell = lambda paired: "–" if paired is None else "{:.2f}x ({:.2f}-{:.2f})".format(  # noqa: E731
        paired["ratio"], *paired["interval"])
    lines = ["Routing over each route alone (tok/s ratio paired by prompt, median and 95% interval):", "",
             "| system | over | " + " | ".join((*CATEGORIES, "overall")) + " |", "|---" * (len(CATEGORIES) + 3) + "|"]
    for name, baseline in rows:
        cats = systems[name]
        lines.append(f"| {name} | {baseline} | " + " | ".join(
            cell(cats[c]["over_single_routes"].get(baseline)) if c in cats else "–" for c in (*CATEGORIES, "overall"))
            + " |")
    return lines


def route_shares(systems: dict) -> list[str]:
    """Markdown table: per routing system and category, the share of drafting rounds each route drafted."""
    routed = {name: cats for name, cats in systems.items() if len(cats["overall"]["route_share"]) > 1}
    if not routed:
        return []
    lines = ["Rounds per route (" + " / ".join(ROUTES) + "):", "",
             "| system | " + " | ".join((*CATEGORIES, "overall")) + " |", "|---" * (len(CATEGORIES) + 2) + "|"]
    for name, cats in routed.items():
        cells = [" / ".join(f"{100 * cats[c]['route_share'].get(r, 0):.0f}%" for r in ROUTES) if c in cats else "–"
                 for c in (*CATEGORIES, "overall")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict, trace: dict | None, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    modes = list(summary)
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        systems = [s for s in summary[mode] if s != "plain"]
        groups = [c for c in (*CATEGORIES, "overall") if any(c in summary[mode][s] for s in systems)]
        width = 0.8 / max(1, len(systems))
        for k, system in enumerate(systems):
            values = [summary[mode][system].get(c, {}).get("speedup") or 0 for c in groups]
            ax.bar([g + k * width for g in range(len(groups))], values, width, label=system)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(groups))], groups)
        ax.set_ylabel("speedup vs plain generate()")
        ax.set_title(mode)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "speedup.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if trace:
        written.append(out / "trace.png")
        plot_trace(trace, written[-1], plt)
    return written


def plot_trace(trace: dict, path: Path, plt) -> None:
    """One generation token by token: who proposed each token (EAGLE-3, DFlash, lookup, or the target's own
    correction/bonus), and where drafts were rejected."""
    colours = {EAGLE: "tab:blue", DFLASH: "tab:orange", LOOKUP: "tab:green", TARGET: "lightgrey"}
    fig, ax = plt.subplots(figsize=(12, 2.6))
    x = 0
    for r in trace["rounds"]:
        for _ in range(r["accepted"]):
            ax.add_patch(plt.Rectangle((x, 0), 0.9, 1, color=colours[r["route"]]))
            x += 1
        if r["drafted"] > r["accepted"]:
            ax.plot(x + 0.45, 1.25, marker="x", color="red", markersize=5)  # first rejected draft
        ax.add_patch(plt.Rectangle((x, 0), 0.9, 1, color=colours[TARGET]))  # the target's own token
        x += 1
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles + [plt.Line2D([], [], marker="x", color="red", linestyle="")],
              ["EAGLE-3 (accepted)", "DFlash (accepted)", "lookup (accepted)", "target (correction / bonus)",
               "draft rejected here"], loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=5, fontsize=8)
    ax.set_xlim(0, max(x, 1))
    ax.set_ylim(0, 1.5)
    ax.set_yticks([])
    ax.set_xlabel("generated token")
    ax.set_title(f"WhiFlash trace, prompt {trace['prompt_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine(device: torch.device) -> str:
    from .calibration import device_name

    return f"{device_name(device)}, {os.cpu_count()} cores, torch {torch.__version__}"


def cpu() -> dict:
    """The host CPU. Family and model (x86 /proc/cpuinfo) tell apart generations that share a model name
    ("AMD EPYC" is Zen 1 to Zen 5 in VMs); None where the system does not report them."""
    return {"model_name": cpu_info("model name") or platform.processor() or "unknown CPU",
            "family": cpu_info("cpu family") or None, "model": cpu_info("model") or None}


def versions() -> dict:
    """The versions a result depends on; hf_whiflash's from the installed package's metadata."""
    try:
        own = importlib.metadata.version("hf-whiflash")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        own = "not installed"
    return {"hf_whiflash": own, "torch": torch.__version__, "transformers": transformers.__version__}


def write_outputs(out: Path, runs: list[Run], trace, meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    result = {"meta": meta, "summary": summary, "runs": [asdict(r) for r in runs], "trace": trace}
    write_text_atomically(out / "bench.json", json.dumps(result, indent=1))
    write_text_atomically(out / "bench.md", markdown(summary, meta))
    plot(summary, trace, out)
    return result


def meta_for(command: str, started: float, run_device: torch.device, **settings) -> dict:
    return {"command": command, "machine": machine(run_device), "cpu": cpu(), "versions": versions(),
            "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "duration_s": time.time() - started, **settings}
