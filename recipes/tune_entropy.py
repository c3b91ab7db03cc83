"""Choose the entropy policy's defaults from measurement: simulate every setting on the dev set.

    python recipes/tune_entropy.py --drafters hf_whiflash/checkpoints/SmolLM2-135M-Instruct

Greedy generation is deterministic, so a routing policy's rounds can be replayed exactly from
hindsight acceptance tables (one teacher-forced pass per drafter per dev prompt), with round times
from a LatencyModel measured on this machine. For each setting of (threshold, latency_weight,
explore_every) this reports tokens per modelled second per category, next to always-EAGLE-3 (also
with other chain lengths: the shipped chain length comes from here), always-DFlash (also with smaller
blocks), the neural router and the hindsight oracle, and writes everything to results/entropy_tuning.json.
"""

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from evaluate import references

from hf_whiflash import DEFAULT_TARGET, WhiFlashAssistant, load_target
from hf_whiflash.bench import CATEGORIES, load_prompts
from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.hindsight import acceptance_tables, simulate_routing
from hf_whiflash.latency import LatencyModel
from hf_whiflash.names import DFLASH, EAGLE, GREEDY, LOOKUP, POLICY_FOLDER, ROUTES
from hf_whiflash.routing import EntropyPolicy, NeuralPolicy, OracleRouter, Policy

GRID = {"threshold": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0], "latency_weight": [0.0, 0.5, 1.0], "explore_every": [4, 8, 16, 32]}


class Always(Policy):
    def __init__(self, route):
        self.route = route

    def choose(self, features, lengths):
        return self.route


def tokens_per_second(records) -> float:
    return sum(a.get(r, 0) + 1 for _, r, a, _ in records) / sum(s for _, _, _, s in records)


def measured_priors(hindsights: dict, threshold: float, lengths: dict) -> dict:
    """Mean accepted drafts per route in each regime: entropy (confident, uncertain) for the neural drafters,
    match length in the text (1, 2, 3, 4+), then a match in its corpus, for lookup (where it matched). The policy's
    starting estimates, measured instead of guessed."""
    corpus = torch.cat([h.lookup_corpus for h in hindsights.values()])
    matches = torch.cat([h.lookup_match for h in hindsights.values()]).clamp(max=EntropyPolicy.MATCH_REGIMES)
    regimes = torch.where(corpus, EntropyPolicy.MATCH_REGIMES + 1, matches)  # 1, 2, ...: as the priors, 0: no match
    table = torch.cat([h.tables[LOOKUP].clamp(max=lengths[LOOKUP]) for h in hindsights.values()]).float()
    priors = {LOOKUP: tuple(round(float(table[regimes == n].mean()), 2) if (regimes == n).any() else prior
                            for n, prior in enumerate(EntropyPolicy.PRIORS[LOOKUP], 1))}
    for route in (EAGLE, DFLASH):
        table = torch.cat([h.tables[route].clamp(max=lengths[route]) for h in hindsights.values()]).float()
        uncertain = torch.cat([h.entropy >= threshold for h in hindsights.values()])
        priors[route] = tuple(round(float(t.mean()), 2) if t.numel() else 0.0
                              for t in (table[~uncertain], table[uncertain]))
    return priors


def score(policy_for, hindsights: dict, latency, lengths, routes: tuple[str, ...] | None = None) -> dict:
    """Tokens per modelled second per category and overall (pooled over prompts), routing over `routes` (all)."""
    pooled = {c: [] for c in (*CATEGORIES, "overall")}
    for (category, _), hindsight in hindsights.items():
        records = simulate_routing(hindsight, policy_for(hindsight), latency, lengths, routes=routes)
        pooled[category] += records
        pooled["overall"] += records
    return {c: tokens_per_second(r) for c, r in pooled.items() if r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafters", required=True, help="WhiFlash folder with eagle3/ and dflash/")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--eagle-steps", type=int, default=2, help="EAGLE-3 chain length of the policies (default 2)")
    parser.add_argument("--block-size", type=int, default=16, help="DFlash block size of the policies (default 16)")
    parser.add_argument("--max-chain", type=int, default=6,
                        help="also replay EAGLE-3-only with every chain length up to this (default 6)")
    parser.add_argument("--dflash-blocks", type=int, nargs="*", default=[4, 8],
                        help="also replay DFlash-only with these block sizes (one teacher-forced pass each)")
    parser.add_argument("--out", default="results/entropy_tuning.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target, tokenizer = load_target(args.target)
    # Fixed lengths: calibration may switch a drafter off on this machine, and the replay needs both drafting.
    assistant = WhiFlashAssistant.from_pretrained(target, args.drafters, routes=ROUTES, eagle_steps=args.eagle_steps,
                                                  dflash_block_size=args.block_size)
    lengths = assistant.draft_lengths[GREEDY]  # the hindsight tables replay greedy generation
    longest_chain = max(args.max_chain, lengths[EAGLE])  # tables hold every chain length up to this
    latency = LatencyModel.measure(assistant)
    prompts = load_prompts("dev", None)
    refs = references(target, tokenizer, prompts, args.max_new_tokens, out.parent / "dev_references.jsonl",
                      args.target)
    hindsights = {}
    for p in prompts:
        ref = refs[p["id"]]
        hindsights[p["category"], p["id"]] = acceptance_tables(
            target, torch.tensor([ref["ids"]]), ref["prompt_length"], assistant.eagle3, assistant.dflash,
            longest_chain, lengths[DFLASH] + 1, assistant.lookup)
    rows = {"always-eagle3": score(lambda h: Always(EAGLE), hindsights, latency, lengths, (EAGLE,)),
            "always-dflash": score(lambda h: Always(DFLASH), hindsights, latency, lengths, (DFLASH,)),
            "always-lookup": score(lambda h: Always(LOOKUP), hindsights, latency, lengths, (LOOKUP,)),
            "oracle": score(lambda h: OracleRouter(h.tables, latency), hindsights, latency, lengths)}
    if (Path(args.drafters) / POLICY_FOLDER).is_dir():
        neural = NeuralPolicy.from_pretrained(Path(args.drafters) / POLICY_FOLDER)
        rows["neural"] = score(lambda h: neural, hindsights, latency, lengths)
    priors = {threshold: measured_priors(hindsights, threshold, lengths) for threshold in GRID["threshold"]}
    for values in itertools.product(*GRID.values()):
        settings = dict(zip(GRID, values))
        settings["priors"] = priors[settings["threshold"]]
        rows["entropy " + json.dumps(settings)] = score(lambda h: EntropyPolicy(**settings), hindsights, latency,
                                                         lengths)
    # The EAGLE-3 chain length, replayed exactly from the same tables (a chain of k accepts min(a, k)).
    chains = {f"always-eagle3 chain {k}": k for k in range(1, longest_chain + 1) if k != lengths[EAGLE]}
    for name, k in chains.items():
        rows[name] = score(lambda h: Always(EAGLE), hindsights, latency, {**lengths, EAGLE: k}, (EAGLE,))
    # DFlash blocks attend to each other, so another block size needs its own teacher-forced pass.
    blocks = {f"always-dflash block {b}": b for b in args.dflash_blocks}
    for name, block in blocks.items():
        tables = {key: acceptance_tables(target, torch.tensor([refs[key[1]]["ids"]]), refs[key[1]]["prompt_length"],
                                         dflash=assistant.dflash, block_size=block) for key in hindsights}
        rows[name] = score(lambda h: Always(DFLASH), tables, latency, {**lengths, DFLASH: block - 1}, (DFLASH,))
    best = max((k for k in rows if k.startswith("entropy")), key=lambda k: rows[k]["overall"])
    for name in ("always-eagle3", *chains, "always-dflash", *blocks, "always-lookup", "oracle", "neural", best):
        if name in rows:
            print(f"{name:60s} " + " ".join(f"{c} {v:6.1f}" for c, v in rows[name].items()))
    mean_best = statistics.mean(rows[best][c] for c in CATEGORIES)
    print(f"best entropy setting: {best} (mean over categories {mean_best:.1f} tokens per modelled second)")
    write_text_atomically(out, json.dumps({"latency": latency.to_dict(), "tokens_per_modelled_second": rows,
                                           "best": best}, indent=1))


if __name__ == "__main__":
    main()
