"""`whiflash` command line: generate text with WhiFlash on the default target (or any target)."""

import argparse
import sys
import time

import torch

from .routing import DFLASH, EAGLE

MODES = {"whiflash": (EAGLE, DFLASH), "eagle3": (EAGLE,), "dflash": (DFLASH,)}


def build_assistant(target, target_name: str, mode: str, drafters: str | None, eagle_steps: int | None,
                    block_size: int | None):
    """WhiFlashAssistant from --drafters, else the drafters shipped for the target, else untrained ones."""
    from .assistant import WhiFlashAssistant
    from .dflash import DFlashDrafter
    from .eagle3 import Eagle3Drafter
    from .targets import shipped_drafters

    routes = MODES[mode]
    overrides = {k: v for k, v in (("eagle_steps", eagle_steps), ("dflash_block_size", block_size)) if v}
    folder = drafters or shipped_drafters(target_name)
    if folder is not None:
        return WhiFlashAssistant.from_pretrained(target, folder, routes=routes, **overrides)
    print(f"note: no trained drafters for {target_name!r} (pass --drafters FOLDER); using untrained drafters, "
          "so expect no speedup.", file=sys.stderr)
    eagle = Eagle3Drafter.for_target(target, seed=0) if EAGLE in routes else None
    dflash = DFlashDrafter.for_target(target, seed=0) if DFLASH in routes else None
    return WhiFlashAssistant(target, eagle, dflash, **overrides)


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from .targets import load_target

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target)
    assistant = build_assistant(target, args.target, args.mode, args.drafters, args.eagle_steps, args.block_size)
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

    out, seconds = timed(assistant_model=assistant, streamer=TextStreamer(tokenizer, skip_prompt=True))
    new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    summary = assistant.stats.summary()
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


def parser() -> argparse.ArgumentParser:
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
    gen.add_argument("--mode", choices=sorted(MODES), default="whiflash",
                     help="whiflash routes between both drafters; eagle3 / dflash use one drafter only")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample)")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (with --sample)")
    gen.add_argument("--eagle-steps", type=int, help="EAGLE-3 chain length per round")
    gen.add_argument("--block-size", type=int, help="DFlash block size (last token + block_size-1 drafts)")
    gen.add_argument("--no-compare", action="store_true", help="skip the plain generate() comparison")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    gen.set_defaults(run=cmd_generate)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        parser().error("--max-new-tokens must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
