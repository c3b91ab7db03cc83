"""Train the NeuralPolicy router on hindsight labels, for the current machine's round latencies.

    python recipes/train_router.py recipes/configs/router_smollm2.yaml

1. Latency: measure each paradigm's round cost on this machine (hf_whiflash.latency.LatencyModel).
2. Labels: per training sample (never the dev set), one target pass and teacher-forced passes of both
   neural drafters, and a replay of the lookup index, give at every round start how many drafts each
   would get accepted (hindsight; lookup: 0 where it has no match, and it is offered only where it has).
3. Trajectories: walk each sample as generation would, with a behaviour policy mixing random routes
   and the entropy policy; every round records the RoundFeatures the engine computes (RoutingState,
   with the latency model standing in for measured seconds) and both paradigms' acceptance there.
4. Fit the MLP to predict every route's acceptance (full information: all labels at every state) and save
   the policy folder; `--install FOLDER` also writes it into a WhiFlash folder as its router.
"""

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from features import read_samples

from hf_whiflash import WhiFlashAssistant, load_target
from hf_whiflash.assistant import write_settings
from hf_whiflash.checkpoint import write_text_atomically
from hf_whiflash.hindsight import acceptance_tables, simulate_routing
from hf_whiflash.latency import LatencyModel
from hf_whiflash.names import DFLASH, EAGLE, GREEDY, LOOKUP, ROUTES, SETTINGS_FILE
from hf_whiflash.routing import FEATURE_NAMES, EntropyPolicy, NeuralPolicy, feature_vector


def trajectory(hindsight, latency: LatencyModel, lengths: dict, epsilon: float, rng: random.Random):
    """(feature vectors, accepted per route) at every round of one simulated generation, routed by the
    entropy policy with an epsilon share of random routes (so states off the policy's path appear too)."""
    records = simulate_routing(hindsight, EntropyPolicy(), latency, lengths, epsilon, rng)
    return ([feature_vector(f) for f, _, _, _ in records], [[a[r] for r in ROUTES] for _, _, a, _ in records])


def hindsight_best(accepted: torch.Tensor, latency: LatencyModel, lengths: dict, features: torch.Tensor) -> torch.Tensor:
    """[N] index of the route with the most tokens per second, knowing the acceptances (lookup where it was
    offered: its proposal's length, a feature, is not 0)."""
    cost = torch.tensor([latency.round_seconds(r, lengths[r]) for r in ROUTES])
    rate = (1 + accepted) / cost
    rate[:, ROUTES.index(LOOKUP)] *= features[:, FEATURE_NAMES.index("lookup_drafts")] > 0
    return rate.argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (see recipes/configs/router_smollm2.yaml)")
    parser.add_argument("--install", metavar="FOLDER", help="also make this WhiFlash folder use the trained router")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    rng, out = random.Random(config.get("seed", 0)), Path(config["out"])
    torch.manual_seed(config.get("seed", 0))
    target, _ = load_target(config["target"])
    # The folder's own router is what gets replaced: it may not even load (trained on older features).
    assistant = WhiFlashAssistant.from_pretrained(target, config["drafters"], policy=EntropyPolicy(),
                                                  eagle_steps=config["eagle_steps"],
                                                  dflash_block_size=config["dflash_block_size"])
    lengths = assistant.draft_lengths[GREEDY]  # the hindsight tables replay greedy generation
    latency = LatencyModel.measure(assistant)
    print("latency (s):", json.dumps(latency.to_dict()))

    samples = read_samples(config["data"], config["max_len"])
    rng.shuffle(samples)
    xs, ys = [], []
    for sample in tqdm(samples[: config["samples"]], desc="hindsight labels"):
        sequence = torch.tensor([sample["input_ids"]])
        hindsight = acceptance_tables(target, sequence, sample["response_start"], assistant.eagle3, assistant.dflash,
                                      lengths[EAGLE], lengths[DFLASH] + 1, assistant.lookup)
        for _ in range(config["trajectories_per_sample"]):
            x, y = trajectory(hindsight, latency, lengths, config["epsilon"], rng)
            xs += x
            ys += y
    features, accepted = torch.tensor(xs), torch.tensor(ys, dtype=torch.float)
    split = int(0.9 * len(features))
    policy = NeuralPolicy(latency.to_dict(), hidden=config["hidden"],
                          latency_weight=config.get("latency_weight", 1.0))
    train_loss = policy.fit(features[:split], accepted[:split], epochs=config["epochs"], lr=config["lr"])
    with torch.no_grad():
        held_out = features[split:], accepted[split:]
        predicted = policy(held_out[0])
    agreement = (hindsight_best(predicted, latency, lengths, held_out[0])
                 == hindsight_best(held_out[1], latency, lengths, held_out[0]))
    report = {"states": len(features), "train_mse": train_loss,
              "held_out_mse": float(torch.nn.functional.mse_loss(predicted, held_out[1])),
              "held_out_agrees_with_hindsight_best": float(agreement.float().mean()),
              "mean_accepted": {r: statistics.mean(accepted[:, i].tolist()) for i, r in enumerate(ROUTES)}}
    print(json.dumps(report, indent=1))
    policy.save_pretrained(out)
    write_text_atomically(out / "training_report.json", json.dumps(report, indent=1))
    if args.install:
        install(policy, Path(args.install))
        print(f"installed the router in {args.install}")


def install(policy: NeuralPolicy, folder: Path) -> None:
    """Make a WhiFlash folder route with `policy`: its policy/ and whiflash_config.json; the drafters stay
    untouched (re-saving them from the attached assistant would store them in the target's dtype)."""
    settings = json.loads((folder / SETTINGS_FILE).read_text())
    policy.save_pretrained(folder / policy.to_dict()["folder"])
    write_settings(folder, settings["eagle_steps"], settings["dflash_block_size"], policy)


if __name__ == "__main__":
    main()
