"""Acceptance profiles for a WhiFlash folder's drafters: mean tokens per round at every draft length, on the dev set.

    python recipes/profile_acceptance.py --drafters hf_whiflash/checkpoints/SmolLM2-135M-Instruct

Greedy generation replays exactly from hindsight acceptance tables (one teacher-forced pass per drafter
per dev prompt, on the target's own greedy output), so the tokens per round that drafting k tokens
gives are measured without generating with every k. Writes eagle3/acceptance.json (chains 1..--max-chain:
a chain of k accepts min(a, k) of the longest chain's a) and dflash/acceptance.json (--dflash-blocks: each
block size needs its own pass, as a block's positions attend to each other). WhiFlashAssistant picks its
draft lengths from these profiles and the round costs it measures on the user's machine (calibration.py).
"""

import argparse
import statistics
from pathlib import Path

import torch

from evaluate import references

from hf_whiflash import DEFAULT_TARGET, DFlashDrafter, Eagle3Drafter, load_target
from hf_whiflash.bench import load_prompts
from hf_whiflash.checkpoint import write_acceptance
from hf_whiflash.hindsight import acceptance_tables, walk
from hf_whiflash.names import DFLASH, EAGLE


def tokens_per_round(tables: list[torch.Tensor], budgets: list[int], length: int) -> float:
    """Mean accepted drafts + 1 over every round of every replayed generation, drafting `length` tokens a round."""
    rounds = [a + 1 for table, budget in zip(tables, budgets) for a in walk(table.clamp(max=length), budget)]
    return statistics.mean(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafters", required=True, help="WhiFlash folder with eagle3/ and/or dflash/")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the replayed generations")
    parser.add_argument("--max-chain", type=int, default=8, help="longest EAGLE-3 chain profiled (default 8)")
    parser.add_argument("--dflash-blocks", type=int, nargs="+", default=[4, 8, 16],
                        help="DFlash block sizes profiled (default 4 8 16)")
    parser.add_argument("--references", default="results/dev_references.jsonl",
                        help="cache of the target's greedy dev-set continuations (shared with evaluate.py)")
    args = parser.parse_args()
    folder = Path(args.drafters)
    target, tokenizer = load_target(args.target)
    prompts = load_prompts("dev", None)
    Path(args.references).parent.mkdir(parents=True, exist_ok=True)
    cached = references(target, tokenizer, prompts, args.max_new_tokens, Path(args.references))
    refs = [cached[p["id"]] for p in prompts]
    sequences = [(torch.tensor([r["ids"]]), r["prompt_length"]) for r in refs]
    budgets = [len(r["ids"]) - r["prompt_length"] - 1 for r in refs]  # the prefill produced the first new token
    if (folder / EAGLE).is_dir():
        eagle = Eagle3Drafter.from_pretrained(folder / EAGLE).attach(target)
        tables = [acceptance_tables(target, ids, start, eagle=eagle, eagle_steps=args.max_chain).tables[EAGLE]
                  for ids, start in sequences]
        profile = {k: tokens_per_round(tables, budgets, k) for k in range(1, args.max_chain + 1)}
        write_acceptance(folder / EAGLE, profile)
        print("EAGLE-3 tokens per round by chain length:", {k: round(v, 3) for k, v in profile.items()})
    if (folder / DFLASH).is_dir():
        dflash = DFlashDrafter.from_pretrained(folder / DFLASH).attach(target)
        profile = {}
        for block in args.dflash_blocks:
            tables = [acceptance_tables(target, ids, start, dflash=dflash, block_size=block).tables[DFLASH]
                      for ids, start in sequences]
            profile[block - 1] = tokens_per_round(tables, budgets, block - 1)
        write_acceptance(folder / DFLASH, profile)
        print("DFlash tokens per round by draft length (block size - 1):", {k: round(v, 3) for k, v in profile.items()})


if __name__ == "__main__":
    main()
