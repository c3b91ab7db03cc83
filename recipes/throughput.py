"""Training-pipeline throughput on this machine: fp32 against bf16 autocast (and packed fp32 weights).

    python recipes/throughput.py --out results/throughput.json

Stages, each in tokens per second: the target's batched greedy generation (data.py), its hidden
states (the features both trainers read), and one optimizer step of each drafter recipe at its
shipped config (train_eagle3.py, train_dflash.py). Each stage runs in float32 and under
`torch.autocast("cpu", torch.bfloat16)` (fp32 weights and optimizer), and the target's stages also
with its Linear weights packed for oneDNN (hf_whiflash/kernels.py) and in bf16 weights (what data.py's
`dtype: auto` loads where the CPU has native bf16), medians of `--repeats`, with the
CPU model and thread count next to the figures. The trainers' `precision: auto` makes the bf16 choice
per machine with a probe (trainer.autocast_pays); data.py and features.py pack where it pays.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from train_dflash import BlockObjective
from train_eagle3 import TTTObjective

from hf_whiflash import DFlashDrafter, Eagle3Drafter, load_target
from hf_whiflash.kernels import PackedLinears
from hf_whiflash.targets import cpu_info

CONFIGS = Path(__file__).resolve().parent / "configs"


def median_seconds(work, repeats: int) -> float:
    work()  # warm-up: kernel selection, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def precision(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def training_batch(target, layers: list[int], batch: int, length: int, prompt: int) -> dict:
    """A batch shaped like the trainers' (random tokens: throughput does not depend on the text)."""
    ids = torch.randint(0, target.config.vocab_size, (batch, length))  # [B, T]
    with torch.no_grad():
        hidden = target(ids, output_hidden_states=True).hidden_states
    valid = torch.ones(batch, length, dtype=torch.bool)
    response = valid & (torch.arange(length) >= prompt)[None, :]
    return {"input_ids": ids, "valid": valid, "response": response, "hidden": {i: hidden[i] for i in layers}}


def step_seconds(objective, batch: dict, bf16: bool, repeats: int) -> float:
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with precision(bf16):
            loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="SmolLM2-135M-Instruct")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="results file (json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target, tokenizer = load_target(args.target)
    target.requires_grad_(False)
    eagle_cfg = yaml.safe_load((CONFIGS / "eagle3_smollm2.yaml").read_text())
    dflash_cfg = yaml.safe_load((CONFIGS / "dflash_smollm2.yaml").read_text())
    data_cfg = yaml.safe_load((CONFIGS / "data_smollm2.yaml").read_text())
    length, prompt = 384, 128  # a typical sample: chat-templated prompt + response, tokens

    eagle = Eagle3Drafter.for_target(target, draft_vocab_size=eagle_cfg["draft_vocab_size"],
                                     intermediate_size=eagle_cfg["intermediate_size"], seed=0)
    final = target.config.num_hidden_layers
    eagle_obj = TTTObjective(eagle, target.get_output_embeddings().weight, final, eagle_cfg["ttt_steps"],
                             eagle_cfg["ttt_decay"], eagle_cfg["anchors_per_sequence"])
    dflash = DFlashDrafter.for_target(target, num_layers=dflash_cfg["num_layers"], block_size=dflash_cfg["block_size"],
                                      mask_token_id=None,  # the config's "auto" needs the data; timing does not
                                      intermediate_size=dflash_cfg["intermediate_size"], seed=0)
    dflash_obj = BlockObjective(dflash, dflash_cfg["anchors_per_sequence"], dflash_cfg["gamma"])
    layers = sorted(set(eagle.feature_layers) | {final} | set(dflash.feature_layers))
    eagle_batch = training_batch(target, layers, eagle_cfg["batch_size"], length, prompt)
    dflash_batch = training_batch(target, layers, dflash_cfg["batch_size"], length, prompt)

    gen_batch, gen_new = data_cfg["batch_size"], 64
    tokenizer.padding_side = "left"
    gen_inputs = tokenizer([f"Question {i}: how do I sort a list in Python?" for i in range(gen_batch)],
                           return_tensors="pt", padding=True)
    feature_ids = torch.randint(0, target.config.vocab_size, (4096 // length, length))  # build_store's batch_tokens

    def generate(bf16: bool, model=target):
        with torch.no_grad(), precision(bf16):
            model.generate(**gen_inputs, max_new_tokens=gen_new, min_new_tokens=gen_new, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    def features(bf16: bool, model=target):
        with torch.no_grad(), precision(bf16):
            model(feature_ids, output_hidden_states=True, logits_to_keep=1)  # as features.py

    stages = {
        "generation": (lambda bf16: median_seconds(lambda: generate(bf16), args.repeats), gen_batch * gen_new),
        "features": (lambda bf16: median_seconds(lambda: features(bf16), args.repeats), feature_ids.numel()),
        "train_eagle3": (lambda bf16: step_seconds(eagle_obj, eagle_batch, bf16, args.repeats),
                         eagle_batch["input_ids"].numel()),
        "train_dflash": (lambda bf16: step_seconds(dflash_obj, dflash_batch, bf16, args.repeats),
                         dflash_batch["input_ids"].numel()),
    }
    rows = {}
    packed = PackedLinears([target], enabled=True)
    target_bf16, _ = load_target(args.target, dtype=torch.bfloat16)  # bf16 weights: data.py's dtype "auto" on such CPUs
    in_bf16 = {"generation": lambda: median_seconds(lambda: generate(False, target_bf16), args.repeats),
               "features": lambda: median_seconds(lambda: features(False, target_bf16), args.repeats)}
    print(f"{cpu_info('model name') or 'unknown CPU'}, {args.threads} threads; tokens/s (median of {args.repeats})")
    for name, (seconds, tokens) in stages.items():
        fp32, bf16 = tokens / seconds(False), tokens / seconds(True)
        rows[name] = {"fp32_tokens_per_s": round(fp32, 1), "bf16_autocast_tokens_per_s": round(bf16, 1),
                      "bf16_factor": round(bf16 / fp32, 2)}
        line = f"  {name:13s} fp32 {fp32:8.1f}   bf16 autocast {bf16:8.1f} (x{bf16 / fp32:.2f})"
        if name in ("generation", "features"):  # the target's own forwards: packed weights apply
            with packed.active():
                fp32_packed = tokens / seconds(False)
            rows[name] |= {"fp32_packed_tokens_per_s": round(fp32_packed, 1), "packed_factor": round(fp32_packed / fp32, 2)}
            bf16_weights = tokens / in_bf16[name]()
            rows[name] |= {"bf16_weights_tokens_per_s": round(bf16_weights, 1)}
            line += f"   fp32 packed {fp32_packed:8.1f} (x{fp32_packed / fp32:.2f})   bf16 weights {bf16_weights:8.1f}"
        print(line)
    result = {"cpu": cpu_info("model name"), "threads": args.threads, "torch": torch.__version__,
              "sample_length": length, "stages": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
