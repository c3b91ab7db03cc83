"""Acceptance profiles for a WhiFlash folder's drafters: mean tokens per round at every draft length, greedy
and sampling, on the dev set.

    python recipes/profile_acceptance.py --drafters hf_whiflash/checkpoints/SmolLM2-135M-Instruct

Greedy generation replays exactly from hindsight acceptance tables (one teacher-forced pass per drafter
per dev prompt, on the target's own greedy output), so the tokens per round that drafting k tokens
gives are measured without generating with every k. Sampling (the processors generate() builds for the
default SAMPLING settings: temperature 0.7, top-p 0.9 and generate()'s top-k 50) replays
draws: each draft is accepted with its teacher-forced chance sum_x min(p, q) (hindsight.acceptance_chances),
--draws walks per prompt. Writes eagle3/acceptance.json (chains 1..--max-chain: a chain of k accepts
min(a, k) of the longest chain's a) and dflash/acceptance.json (--dflash-blocks: each block size needs its
own pass, as a block's positions attend to each other). WhiFlashAssistant picks each mode's draft lengths
from these profiles and the round costs it measures on the user's machine (calibration.py).

Both files also get the acceptance by confidence that dynamic lengths read the drafter's confidence through
(calibration.DraftCut): per bin of the drafter's probability of its draft, the share of dev-set drafts accepted
(greedy) or their mean chance of acceptance (sampling), at the longest chain and the largest block.

lookup/ (config.json with the lookup settings, default ones unless the folder has them, and acceptance.json)
gets, per match length in the text, the chance that draft j is accepted when the drafts before it were (greedy:
the share of dev-set rounds; sampling: the target's mean probability of the draft, teacher-forced), the same
chance for corpus drafts per bin of their share (with a corpus.safetensors in the folder), and tokens per
round by draft cap over the rounds where it matched. `--routes` limits what is profiled.
"""

import argparse
import statistics
from pathlib import Path

import torch

from evaluate import references

from hf_whiflash import DEFAULT_TARGET, DFlashDrafter, Eagle3Drafter, LookupDrafter, load_target
from hf_whiflash.bench import load_prompts
from hf_whiflash.checkpoint import write_acceptance
from hf_whiflash.hindsight import acceptance_chances, acceptance_tables, confidence_outcomes, lookup_outcomes, walk
from hf_whiflash.names import CONFIDENCE_BINS, DFLASH, EAGLE, GREEDY, LOOKUP, ROUTES, SAMPLED
from hf_whiflash.sampling import default_processors


def tokens_per_round(tables: list[torch.Tensor], budgets: list[int], length: int) -> float:
    """Mean accepted drafts + 1 over every round of every replayed generation, drafting `length` tokens a round."""
    rounds = [a + 1 for table, budget in zip(tables, budgets) for a in walk(table.clamp(max=length), budget)]
    return statistics.mean(rounds)


def sampled_tables(chances: list[torch.Tensor], draws: int, seed: int = 0) -> list[torch.Tensor]:
    """`draws` acceptance tables per prompt from its chances [R, k]: drafts accepted, each with its chance,
    until the first rejection. A chain of k accepts min(a, k) of a draw's a, as with real sampling."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(c.shape, generator=generator) < c).long().cumprod(-1).sum(-1)
            for c in chances for _ in range(draws)]


def acceptance_by_confidence(outcomes: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """(confidences, acceptances) of many drafts -> the mean acceptance in each of CONFIDENCE_BINS equal bins of
    confidence, each pulled towards the overall mean by one pseudo-draft (an empty bin gets the mean)."""
    confidence, accepted = (torch.cat(column).double() for column in zip(*outcomes))
    bins = (confidence * CONFIDENCE_BINS).long().clamp(0, CONFIDENCE_BINS - 1)
    counts = torch.bincount(bins, minlength=CONFIDENCE_BINS)
    sums = torch.bincount(bins, weights=accepted, minlength=CONFIDENCE_BINS)
    return ((sums + accepted.mean()) / (counts + 1)).tolist()


def mode_profiles(tables, chances, budgets: list[int], lengths, draws: int) -> dict[str, dict[int, float]]:
    """One drafting setup's greedy tables and sampling chances (one per prompt) -> mode -> draft length (each of
    `lengths`, at most the setup's) -> tokens per round."""
    draw_budgets = [budget for budget in budgets for _ in range(draws)]
    draw_tables = sampled_tables(chances, draws)
    return {GREEDY: {k: tokens_per_round(tables, budgets, k) for k in lengths},
            SAMPLED: {k: tokens_per_round(draw_tables, draw_budgets, k) for k in lengths}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafters", required=True, help="WhiFlash folder with eagle3/ and/or dflash/")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the replayed generations")
    parser.add_argument("--max-chain", type=int, default=8, help="longest EAGLE-3 chain profiled (default 8)")
    parser.add_argument("--dflash-blocks", type=int, nargs="+", default=[4, 8, 16],
                        help="DFlash block sizes profiled (default 4 8 16)")
    parser.add_argument("--draws", type=int, default=32,
                        help="sampled acceptance walks per prompt (default 32)")
    parser.add_argument("--argmax-drafts", action="store_true",
                        help="only compare, per neural drafter, sampling's tokens per round when its drafts are "
                             "sampled (as generation drafts) and when they are its argmax (one-hot drafts); "
                             "writes nothing")
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES),
                        help="what to profile (default: every drafter the folder has, and lookup)")
    parser.add_argument("--references", default="results/dev_references.jsonl",
                        help="cache of the target's greedy dev-set continuations (shared with evaluate.py)")
    args = parser.parse_args()
    folder = Path(args.drafters)
    target, tokenizer = load_target(args.target)
    prompts = load_prompts("dev", None)
    Path(args.references).parent.mkdir(parents=True, exist_ok=True)
    cached = references(target, tokenizer, prompts, args.max_new_tokens, Path(args.references), args.target)
    refs = [cached[p["id"]] for p in prompts]
    sequences = [(torch.tensor([r["ids"]]), r["prompt_length"]) for r in refs]
    budgets = [len(r["ids"]) - r["prompt_length"] - 1 for r in refs]  # the prefill produced the first new token
    processors = default_processors(target)

    def measured(drafters: dict, route: str, lengths, argmax=False, **length_setting) -> dict[str, dict[int, float]]:
        tables = [acceptance_tables(target, ids, start, **drafters, **length_setting).tables[route]
                  for ids, start in sequences]
        chances = [acceptance_chances(target, ids, start, processors, **drafters, **length_setting,
                                      argmax=argmax)[route] for ids, start in sequences]
        return mode_profiles(tables, chances, budgets, lengths, args.draws)

    if args.argmax_drafts:
        compare_argmax_drafts(folder, target, measured)
        return

    def by_confidence(drafters: dict, route: str, **length_setting) -> dict[str, list[float]]:
        generator = torch.Generator().manual_seed(0)
        outcomes = [confidence_outcomes(target, ids, start, processors, **drafters, **length_setting,
                                        generator=generator)[route] for ids, start in sequences]
        return {mode: acceptance_by_confidence([o[mode] for o in outcomes]) for mode in (GREEDY, SAMPLED)}

    if (folder / EAGLE).is_dir() and EAGLE in args.routes:
        eagle = {"eagle": Eagle3Drafter.from_pretrained(folder / EAGLE, read_profile=False).attach(target)}
        profile = measured(eagle, EAGLE, range(1, args.max_chain + 1), eagle_steps=args.max_chain)
        confidence = by_confidence(eagle, EAGLE, eagle_steps=args.max_chain)
        write_acceptance(folder / EAGLE, profile, confidence)
        show("EAGLE-3 tokens per round by chain length", profile)
        show("EAGLE-3 acceptance by confidence bin", confidence)
    if (folder / DFLASH).is_dir() and DFLASH in args.routes:
        dflash = {"dflash": DFlashDrafter.from_pretrained(folder / DFLASH, read_profile=False).attach(target)}
        profile = {GREEDY: {}, SAMPLED: {}}
        for block in args.dflash_blocks:
            for mode, by_length in measured(dflash, DFLASH, [block - 1], block_size=block).items():
                profile[mode] |= by_length
        confidence = by_confidence(dflash, DFLASH, block_size=max(args.dflash_blocks))
        write_acceptance(folder / DFLASH, profile, confidence)
        show("DFlash tokens per round by draft length (block size - 1)", profile)
        show("DFlash acceptance by confidence bin", confidence)
    if LOOKUP in args.routes:
        lookup = LookupDrafter.from_pretrained(folder / LOOKUP) if (folder / LOOKUP).is_dir() else LookupDrafter()
        outcomes = [o for ids, start in sequences for o in lookup_outcomes(target, ids, start, processors, lookup)]
        in_text = [o for o in outcomes if not o[0].from_corpus]
        in_corpus = [o for o in outcomes if o[0].from_corpus]
        columns = ((GREEDY, 1), (SAMPLED, 2))  # lookup_outcomes' greedy acceptances and sampling chances
        lookup.acceptance_by_match = {mode: by_match(in_text, column) for mode, column in columns}
        lookup.acceptance_by_share = {mode: by_share(in_corpus, column) for mode, column in columns} \
            if in_corpus else None
        lookup.tokens_per_round = {mode: lookup_tokens_per_round(outcomes, lookup, mode) for mode in (GREEDY, SAMPLED)}
        lookup.save_pretrained(folder / LOOKUP)
        print(f"lookup matched in {len(outcomes)} of {sum(budgets)} dev-set round starts "
              f"({len(in_corpus)} of them in its corpus)")
        show("lookup tokens per round where it matched, by draft cap", lookup.tokens_per_round)
        for mode, chances in lookup.acceptance_by_match.items():
            show(f"lookup acceptance by draft position, {mode}, match", chances)
        show("lookup corpus acceptance by share bin", lookup.acceptance_by_share or {})


def compare_argmax_drafts(folder: Path, target, measured) -> None:
    """Sampling's tokens per round with sampled and with argmax drafts, per neural drafter and draft length."""
    setups = {EAGLE: (Eagle3Drafter, "eagle", {"eagle_steps": 8}, range(1, 9)),
              DFLASH: (DFlashDrafter, "dflash", {"block_size": 16}, [15])}
    for route, (cls, name, length_setting, lengths) in setups.items():
        if (folder / route).is_dir():
            drafters = {name: cls.from_pretrained(folder / route, read_profile=False).attach(target)}
            for argmax in (False, True):
                profile = measured(drafters, route, lengths, argmax, **length_setting)[SAMPLED]
                show(f"{route} sampling tokens per round, {'argmax' if argmax else 'sampled'} drafts",
                     {"by draft length": profile})


def by_match(outcomes: list[tuple], column: int) -> dict[int, list[float]]:
    """lookup_outcomes' rounds -> match length -> per draft position j, the mean of `column` (1: greedy acceptance,
    2: sampling chance) over the rounds whose drafts before j held, pulled towards that position's mean over
    every match length by one pseudo-round (so a rarely reached position is not 0 or 1 by chance)."""
    longest = max(len(o[column]) for o in outcomes)
    pooled = [statistics.mean(o[column][j] for o in outcomes if len(o[column]) > j) for j in range(longest)]
    profile = {}
    for match in sorted({o[0].match for o in outcomes}):
        rounds = [o[column] for o in outcomes if o[0].match == match]
        profile[match] = [(sum(r[j] for r in rounds if len(r) > j) + pooled[j]) /
                          (sum(len(r) > j for r in rounds) + 1) for j in range(longest)]
    return profile


def by_share(outcomes: list[tuple], column: int) -> list[float]:
    """lookup_outcomes' corpus rounds -> per bin of a draft's share (of the corpus occurrences continuing with it),
    the mean of `column` (1: greedy acceptance, 2: sampling chance) over the drafts whose drafts before held."""
    return acceptance_by_confidence([(torch.tensor(o[0].shares[:len(o[column])]), torch.tensor(o[column]))
                                     for o in outcomes])


def lookup_tokens_per_round(outcomes: list[tuple], lookup: LookupDrafter, mode: str) -> dict:
    """Draft cap k -> expected tokens per round (1 + expected accepted drafts by the lookup's profiled chances) over
    the matched rounds, each drafting min(k, its proposal's length)."""
    return {k: statistics.mean(1 + lookup.expected(mode, o[0], drafts=k) for o in outcomes)
            for k in range(1, lookup.max_drafts + 1)}


def show(title: str, profile: dict) -> None:
    for mode, values in profile.items():
        rounded = [round(v, 3) for v in values] if isinstance(values, list) else {k: round(v, 3) for k, v in values.items()}
        print(f"{title}, {mode}:", rounded)


if __name__ == "__main__":
    main()
