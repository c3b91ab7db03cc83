"""`whiflash` command line: generate text with WhiFlash on the default target (or any target)."""

import argparse
import sys
import time
from pathlib import Path

import torch

from .names import DFLASH, EAGLE, GREEDY, SAMPLED, SAMPLING, TARGET

STYLES = {EAGLE: "blue", DFLASH: "yellow", TARGET: "bright_black", "correction": "underline bright_black"}
LEGEND = [("EAGLE-3 draft", STYLES[EAGLE]), ("DFlash draft", STYLES[DFLASH]), ("target", STYLES[TARGET]),
          ("target corrected a draft", STYLES["correction"])]


def terminal(color: str):
    """A rich console for --color: auto lets rich decide (a terminal; NO_COLOR and TERM=dumb respected),
    always forces colours, never prints plain text."""
    from rich.console import Console

    return Console(force_terminal=True if color == "always" else None,
                   color_system=None if color == "never" else "auto", highlight=False, soft_wrap=True)


DTYPE_HELP = ("target dtype, drafters follow it (default float32). bfloat16, or auto (bfloat16 on CUDA and on CPUs "
              "with native bf16 where it is faster), is faster on such machines, but greedy output then matches plain "
              "generate() in the same dtype only up to bf16 rounding: a multi-token verify rounds differently from "
              "one-token decoding, so a near-tie can flip")


def terminal_streamer(assistant, tokenizer, console):
    """Print each round's tokens as they are verified, coloured by who proposed them."""
    from rich.text import Text

    from .streaming import ProvenanceStreamer, TokenTexts

    texts = TokenTexts(tokenizer)

    def show(tokens, sources):
        console.print(Text.assemble(*((text, STYLES[source]) for text, source in zip(texts.add(tokens), sources))),
                      end="", markup=False)
        console.file.flush()

    return ProvenanceStreamer(assistant, show)


def cmd_generate(args) -> int:
    from .assistant import build_assistant
    from .calibration import describe
    from .targets import load_target

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target, dtype=args.dtype)
    assistant = build_assistant(target, args.target, args.mode, args.drafters, eagle_steps=args.eagle_steps,
                                dflash_block_size=args.block_size)
    print(f"{next(target.parameters()).dtype}; draft lengths: {describe(assistant)}", file=sys.stderr)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(target.device)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        settings |= dict(temperature=args.temperature, top_p=args.top_p)

    def timed(**extra):
        start = time.perf_counter()
        out = target.generate(**inputs, **settings, **extra)
        return out, time.perf_counter() - start

    console = terminal(args.color)
    # Untimed warm-up of both ways: the first generate() pays one-off costs (kernel selection, allocations).
    target.generate(**inputs, max_new_tokens=8, do_sample=args.sample, assistant_model=assistant)
    target.generate(**inputs, max_new_tokens=8, do_sample=args.sample)
    out, seconds = timed(assistant_model=assistant, streamer=terminal_streamer(assistant, tokenizer, console))
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    summary = assistant.stats.summary()
    if console.color_system is not None:
        from rich.text import Text

        console.print()
        console.print(Text("  ").join(Text(text, style) for text, style in LEGEND), end="")
    print(f"\n--- WhiFlash ({args.mode}): {new_tokens} tokens in {seconds:.2f} s = {new_tokens / seconds:.1f} tok/s")
    per_route = ", ".join(f"{r} {summary['rounds_per_route'][r]} rounds, acceptance {a:.2f}"
                          for r, a in summary["acceptance_length_per_route"].items())
    print(f"    acceptance length {summary['acceptance_length']:.2f} tokens/round ({per_route}); "
          f"catch-up {100 * summary['catch_up_share']:.1f}% of round time")
    if not args.no_compare:
        torch.manual_seed(args.seed)
        plain, plain_seconds = timed()
        plain_tokens = plain.shape[1] - inputs["input_ids"].shape[1]
        print(f"--- plain generate(): {plain_tokens} tokens in {plain_seconds:.2f} s = "
              f"{plain_tokens / plain_seconds:.1f} tok/s; WhiFlash speedup {plain_seconds / seconds * plain_tokens / new_tokens:.2f}x")
        if not args.sample:
            print(f"    identical output: {'yes' if torch.equal(plain, out) else 'NO'}")
    return 0


def cmd_bench(args) -> int:
    from . import bench
    from .calibration import describe
    from .latency import LatencyModel
    from .targets import load_target, shipped_drafters

    if args.quick:
        args.per_category, args.max_new_tokens = args.per_category or 2, min(args.max_new_tokens, 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.assistant and "assisted" not in args.systems:
        args.systems.append("assisted")
    drafters = args.drafters or shipped_drafters(args.target)
    started = time.time()
    out = Path(args.out or f"results/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = dict(target=args.target, drafters=str(drafters), assistant=args.assistant, prompts=args.prompts,
                    per_category=args.per_category, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                    modes=args.modes, systems=args.systems, seed=args.seed, requested_dtype=args.dtype)
    try:  # everything that can be checked before the models load (which takes a while)
        bench.check_systems(args.systems, drafters, args.assistant)
        prompts = bench.load_prompts(args.prompts, args.per_category)
        log = bench.RunLog(out, settings)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if log.runs:
        print(f"resuming: {len(log.runs)} runs already in {out}/runs.jsonl", file=sys.stderr)
    print(f"loading {args.target} and the systems' models...", file=sys.stderr)
    target, tokenizer = load_target(args.target, dtype=args.dtype)
    systems = bench.build_systems(target, drafters, args.systems, args.assistant)
    lengths = {name: describe(a) for name, a in ((n, bench.whiflash_assistant(e)) for n, e in systems.items()) if a}
    for name, text in lengths.items():
        print(f"{name}: {text}", file=sys.stderr)
    assistants = [a for a in map(bench.whiflash_assistant, systems.values()) if a is not None]
    both = next((a for a in assistants if a.eagle3 is not None and a.dflash is not None), None)
    # One latency model for the whole run: the oracle routes with it, and every system's routing is
    # also scored in tokens per modelled round cost (free of timing noise).
    reference = both or (assistants[0] if assistants else None)
    latency = None if reference is None else reference.latency or LatencyModel.measure(reference)
    runs, trace = bench.benchmark(target, tokenizer, prompts, systems, args.modes, args.max_new_tokens,
                                  args.repeats, args.seed, latency, log=log)
    meta = bench.meta_for(args.command_line, started, **settings, draft_lengths=lengths,
                          dtype=str(next(target.parameters()).dtype))
    result = bench.write_outputs(out, runs, trace, meta)
    print(bench.markdown(result["summary"], result["meta"]))
    print(f"wrote {out}/bench.json, bench.md, speedup.png" + (", trace.png" if trace else ""))
    return 0


def cmd_calibrate(args) -> int:
    from .assistant import build_assistant
    from .calibration import calibrated_latency, describe, device_name, latency_table
    from .targets import cache_root, load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = load_target(args.target, dtype=args.dtype)
    assistant = build_assistant(target, args.target, "whiflash", args.drafters)
    latency = calibrated_latency(assistant, cache_root() / "calibration", refresh=True)
    assistant = build_assistant(target, args.target, "whiflash", args.drafters)  # chooses from the new costs
    print(f"Round costs on {device_name(target.device)}, {torch.get_num_threads()} threads, "
          f"{next(target.parameters()).dtype} (ms):\n\n{latency_table(latency)}\n")
    print(f"draft lengths: {describe(assistant)}")
    return 0


def at_least_1(text: str) -> int:
    """An argparse type: argument errors come before anything loads."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    from .assistant import MODE_ROUTES
    from .targets import DEFAULT_TARGET

    top = argparse.ArgumentParser(prog="whiflash", description="WhiFlash speculative decoding for transformers.")
    commands = top.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a WhiFlash generation, then compare with plain generate()",
                              description="Generate a chat reply with WhiFlash (streamed), then time plain "
                                          "generate() on the same prompt and report speed and acceptance.")
    gen.add_argument("prompt", help="the user message (the target's chat template is applied)")
    gen.add_argument("--target", default=DEFAULT_TARGET,
                     help=f"target model: {DEFAULT_TARGET!r} (offline default), a Hub id or a local folder")
    gen.add_argument("--drafters", help="WhiFlash folder with eagle3/ and/or dflash/ (default: the drafters "
                                        "shipped for the target)")
    gen.add_argument("--mode", choices=sorted(MODE_ROUTES), default="whiflash",
                     help="whiflash routes between both drafters; eagle3 / dflash use one drafter only")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                     help="sampling temperature (with --sample; default %(default)s)")
    gen.add_argument("--top-p", type=float, default=SAMPLING["top_p"],
                     help="nucleus sampling threshold (with --sample; default %(default)s)")
    gen.add_argument("--eagle-steps", type=int, help="EAGLE-3 chain length per round")
    gen.add_argument("--block-size", type=int, help="DFlash block size (last token + block_size-1 drafts)")
    gen.add_argument("--no-compare", action="store_true", help="skip the plain generate() comparison")
    gen.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                     help="colour each token by the drafter that proposed it (auto: when printing to a terminal)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32", help=DTYPE_HELP)
    gen.set_defaults(run=cmd_generate)

    b = commands.add_parser("bench", help="compare plain generate(), prompt lookup and WhiFlash modes",
                            description="Run every system on the same prompts (interleaved) and write bench.json, "
                                        "bench.md and PNG plots: speedup per category, and a per-token trace.")
    b.add_argument("--quick", action="store_true", help="2 prompts per category, 64 new tokens (< 10 min on 2 cores)")
    b.add_argument("--target", default=DEFAULT_TARGET, help="target model (default: %(default)s)")
    b.add_argument("--drafters", help="WhiFlash folder (default: the drafters shipped for the target)")
    b.add_argument("--assistant", help="a smaller model with the target's tokenizer for transformers' own assisted "
                                       "generation (adds the 'assisted' system), e.g. Qwen2.5-Coder-0.5B-Instruct "
                                       "with --target Qwen2.5-Coder-1.5B-Instruct (needs ~9 GB RAM)")
    b.add_argument("--prompts", default="dev", help="'dev' (packaged dev set), 'held-out' (prompts no training or tuning "
                   "saw) or a jsonl of {id, category, messages}")
    b.add_argument("--per-category", type=at_least_1, help="use the first N prompts of each category (default: all)")
    b.add_argument("--systems", nargs="+", default=["plain", "prompt-lookup", "eagle3", "dflash", "lookup", "whiflash"],
                   help="systems to compare: plain, prompt-lookup (transformers' own), assisted (needs --assistant), "
                        "eagle3, dflash, lookup (each route alone), whiflash (every route, the folder's router), "
                        "whiflash-entropy, "
                        "whiflash-neural (needs a trained router in the drafters folder), oracle (hindsight "
                        "routing, greedy only; for measurement), plain-packed (plain decoding with WhiFlash's packed "
                        "weights). Without '@', calibrated lengths cut per round by confidence; a draft length "
                        "after '@' fixes it (eagle3@3: chain of 3; dflash@7: 7 drafts a block); '@fixed' keeps the "
                        "calibrated length every round; '@dynamic' also cuts drafters without an acceptance profile "
                        "(default: %(default)s)")
    b.add_argument("--modes", nargs="+", choices=[GREEDY, SAMPLED], default=[GREEDY, SAMPLED],
                   help=f"decoding modes (sampling: temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']})")
    b.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generation (default 128)")
    b.add_argument("--repeats", type=at_least_1, default=1,
                   help="runs per prompt and system, each sampling with its own seed; the median counts")
    b.add_argument("--out", help="output folder (default: results/bench-<time>); rerunning a killed bench with "
                                 "the same --out resumes it")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32", help=DTYPE_HELP)
    b.set_defaults(run=cmd_bench)

    c = commands.add_parser("calibrate", help="measure round costs on this machine and choose the draft lengths",
                            description="Measure the target's verify cost by number of candidates and each "
                                        "drafter's cost by draft length on this machine (replacing the cached "
                                        "measurement), and print the draft lengths they make best. WhiFlash does "
                                        "this by itself on first use; rerun it after changing the machine's load.")
    c.add_argument("--target", default=DEFAULT_TARGET, help="target model (default: %(default)s)")
    c.add_argument("--drafters", help="WhiFlash folder (default: the drafters shipped for the target)")
    c.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="float32", help=DTYPE_HELP)
    c.set_defaults(run=cmd_calibrate)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.command_line = "whiflash " + " ".join(sys.argv[1:] if argv is None else argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        parser().error("--max-new-tokens must be at least 1")
    from .checkpoint import CheckpointError
    from .settings import SettingsError

    try:
        return args.run(args)
    except (FileNotFoundError, CheckpointError, SettingsError) as error:  # the message says what to fix
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
