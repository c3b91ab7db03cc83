"""Is the device path ready? One run, under 8 minutes on one GPU (`make gpu-check`; `DEVICE=cpu` in CI).

1. The `cuda`-marked tests (they skip, saying so, where there is no CUDA device).
2. Greedy output token-identical to plain `generate()` on the device, for EAGLE-3, DFlash and WhiFlash, on a
   small random target built on the spot (the GPU machines we borrow have no model downloads).
3. Round timings at the paper's scale: an 8B-shaped random Llama target (bf16) with random drafters, and how a
   round's time splits into verify, drafting, catch-up and routing, for each drafter alone and for rounds that
   switch drafter every time (the worst case for lazy catch-up). On CPU a tiny shape stands in, so the code path
   is exercised without the hours an 8B forward takes there.

Random drafters get almost nothing accepted: the timings are per round, not speedups.
Writes gpu_check.json and gpu_check.md to --out.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_whiflash import DFlashDrafter, Eagle3Drafter, Policy, WhiFlashAssistant
from hf_whiflash.calibration import device_name
from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.stats import Clock, GenerationStats

ROOT = Path(__file__).resolve().parents[1]

# Llama-3.1-8B's shape, and a tiny stand-in for CPU runs.
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}
DFLASH_LAYERS = {"8b": 5, "tiny": 1}  # z-lab's Qwen3-8B drafter has 5 layers


class Alternate(Policy):
    """Switches drafter every round: each round's drafter first absorbs the round the other one drafted."""

    def for_generation(self):
        return Alternate()

    def __init__(self):
        self.rounds = 0

    def choose(self, features, lengths):
        routes = sorted(lengths)
        self.rounds += 1
        return routes[self.rounds % len(routes)]

    def to_dict(self):
        return {"type": "alternate"}


def random_target(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A Llama target with random weights, made directly on `device` (8B: no CPU copy, seconds on a GPU)."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, initializer_range=0.02,
                         pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        target = LlamaForCausalLM(config).to(dtype)
    return target.eval()


def random_drafters(target, shape: str, block_size: int):
    with torch.device(target.device):
        return (Eagle3Drafter.for_target(target, seed=1),
                DFlashDrafter.for_target(target, num_layers=DFLASH_LAYERS[shape], block_size=block_size, seed=2))


def run_cuda_tests() -> dict:
    """pytest over the test files that hold `cuda`-marked tests."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.cuda" in p.read_text())
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", *files], cwd=ROOT,
                            capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-500:]
    print(f"cuda-marked tests: {summary}")
    return {"files": [Path(f).name for f in files], "exit_code": result.returncode, "summary": summary}


def check_lossless(device: torch.device, new_tokens: int) -> dict:
    """Greedy WhiFlash output == plain greedy output on `device`, per system, on a small random target."""
    # Random drafters are almost never right; a small random target's greedy text falls into loops, where lookup
    # (in WhiFlash's routes) is, so verification takes both branches (accept and reject).
    target = random_target("tiny", device, torch.float32)
    eagle3, dflash = random_drafters(target, "tiny", block_size=8)
    systems = {
        "eagle3": dict(eagle3=eagle3, lookup=False, eagle_steps=4),
        "dflash": dict(dflash=dflash, lookup=False),
        "whiflash": dict(eagle3=eagle3, dflash=dflash, policy=Alternate(), eagle_steps=4),
    }
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (1, n), generator=generator) for n in (8, 20, 40)]
    results = {}
    for name, kwargs in systems.items():
        assistant = WhiFlashAssistant(target, **kwargs)
        identical, accepted, rounds = 0, 0, 0
        for prompt in prompts:
            ids = prompt.to(device)
            expected = target.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            out = target.generate(ids, max_new_tokens=new_tokens, do_sample=False, assistant_model=assistant)
            identical += torch.equal(out, expected)
            accepted += sum(r.accepted for r in assistant.stats.rounds)
            rounds += len(assistant.stats.rounds)
        results[name] = {"identical": identical, "prompts": len(prompts), "rounds": rounds, "accepted": accepted}
        print(f"lossless {name}: {identical}/{len(prompts)} identical, {accepted} drafts accepted in {rounds} rounds")
    return results


def time_rounds(shape: str, device: torch.device, dtype: torch.dtype, context: int, new_tokens: int,
                repeats: int) -> dict:
    """Median per-round seconds and their split, per system, on a random `shape` target."""
    target = random_target(shape, device, dtype)
    eagle3, dflash = random_drafters(target, shape, block_size=16)
    systems = {
        "eagle3 (chain 6)": dict(eagle3=eagle3, eagle_steps=6),
        "dflash (block 16)": dict(dflash=dflash, dflash_block_size=16),
        "switching every round": dict(eagle3=eagle3, dflash=dflash, policy=Alternate(), eagle_steps=6,
                                      dflash_block_size=16),
    }
    ids = torch.randint(2, SHAPES[shape]["vocab_size"], (1, context), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    results = {"plain": _plain_seconds_per_token(target, ids, new_tokens, repeats)}
    for name, kwargs in systems.items():
        assistant = WhiFlashAssistant(target, lookup=False, dynamic_lengths=False, **kwargs)
        runs = []
        for _ in range(repeats + 1):  # the first run warms kernels up and is dropped
            target.generate(ids, max_new_tokens=new_tokens, do_sample=False, assistant_model=assistant)
            runs.append(_round_split(assistant.stats))
        results[name] = _median_run(runs[1:])
    return results


def _plain_seconds_per_token(target, ids, new_tokens: int, repeats: int) -> dict:
    clock, times = Clock(ids.device), []
    for _ in range(repeats + 1):
        start = clock()
        target.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        times.append((clock() - start) / new_tokens)
    return {"seconds_per_token": sorted(times[1:])[len(times[1:]) // 2]}


def _round_split(stats: GenerationStats) -> dict:
    """Mean seconds per round, split into its parts (drafting = draft_s less its routing and catch-up)."""
    n = len(stats.rounds)
    verify, draft, catch_up, route = (stats.time(part) / n for part in ("verify_s", "draft_s", "catch_up_s", "route_s"))
    return {"rounds": n, "seconds_per_round": verify + draft, "verify_s": verify,
            "drafting_s": draft - catch_up - route, "catch_up_s": catch_up, "routing_s": route,
            "caught_up_per_round": stats.time("caught_up") / n, "drafted_per_round": stats.time("drafted") / n}


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["seconds_per_round"])[len(runs) // 2]


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    t = report["timing"]
    lines = [f"# Device check: {report['machine']['device_name']}", "",
             f"torch {report['machine']['torch']}, {t['shape']} random target, {t['dtype']}, "
             f"{t['context']}-token prompt, {t['new_tokens']} new tokens, median of {t['repeats']} runs.", "",
             f"cuda-marked tests: {report['cuda_tests']['summary']}", "",
             "| system | greedy outputs identical | drafts accepted / rounds |", "|---|---|---|"]
    lines += [f"| {name} | {r['identical']}/{r['prompts']} | {r['accepted']} / {r['rounds']} |"
              for name, r in report["lossless"].items()]
    lines += ["", f"Plain decoding: {t['results']['plain']['seconds_per_token'] * 1e3:.2f} ms a token.", "",
              "| system | ms a round | verify | drafting | catch-up | routing | drafted | caught up |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in t["results"].items():
        if name != "plain":
            lines.append(f"| {name} | {r['seconds_per_round'] * 1e3:.2f} | "
                         + " | ".join(f"{r[p] / r['seconds_per_round']:.0%}"
                                      for p in ("verify_s", "drafting_s", "catch_up_s", "routing_s"))
                         + f" | {r['drafted_per_round']:.1f} | {r['caught_up_per_round']:.1f} |")
    write_text_atomically(out / "gpu_check.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (a GPU) or cpu (the tiny shape: a quick smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check", help="folder for the results")
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per system (after one warm-up)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device: run with --device cpu (DEVICE=cpu make gpu-check)")
    shape, dtype = ("8b", torch.bfloat16) if device.type == "cuda" else ("tiny", torch.float32)
    context, new_tokens = (512, 64) if device.type == "cuda" else (64, 24)
    started = time.perf_counter()
    report = {
        "machine": {"device_name": device_name(device), "torch": torch.__version__,
                    "python": platform.python_version()},
        "cuda_tests": run_cuda_tests(),
        "lossless": check_lossless(device, new_tokens=64),
        "timing": {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "context": context,
                   "new_tokens": new_tokens, "repeats": args.repeats,
                   "results": time_rounds(shape, device, dtype, context, new_tokens, args.repeats)},
    }
    report["seconds"] = time.perf_counter() - started
    write_report(args.out, report)
    print((args.out / "gpu_check.md").read_text() + f"\nwrote {args.out}/gpu_check.md ({report['seconds']:.0f} s)")
    failed = report["cuda_tests"]["exit_code"] not in (0, 5) or any(
        r["identical"] != r["prompts"] for r in report["lossless"].values())  # pytest 5: no test selected
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
