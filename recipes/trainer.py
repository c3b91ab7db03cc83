"""The training loop both drafter recipes share: accelerate, AdamW with warmup + cosine decay, periodic
checkpoints it resumes from, a jsonl log, and a Hub-format export of the drafter at the end.

A recipe supplies an nn.Module whose forward(batch) returns (loss, metrics): everything that touches
gradients runs inside that one forward, so the same code runs under DDP with `accelerate launch`.
"""

import argparse
import json
import math
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hf_whiflash.checkpoint import write_text_atomically


def recipe_config(doc: str, example: str) -> tuple[argparse.Namespace, dict]:
    """The command line of both drafter recipes: a YAML config, `--set KEY=VALUE` overrides, `--push-to-hub`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"YAML config (see {example})")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override entries of the config (values parse as YAML), e.g. for a data-size "
                             "curve: --set max_samples=688 out=runs/eagle3-smollm2-n688")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the trained drafter to this Hub repo")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in config:  # a typo must not train with the file's value unnoticed
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY one of: {', '.join(config)}")
        config[key] = yaml.safe_load(value)
    return args, config


def autocast_pays() -> bool:
    """Whether bf16 autocast beats float32 on this machine for a training-shaped matmul, forward and backward
    ([4096, 576] @ [576, 1536], ~1 s). On CUDA it does. On CPUs it varies: ~7x faster on an Intel Xeon with AMX;
    on an AMD EPYC whole training steps ran 14-28x slower (recipes/throughput.py, BENCHMARKS.md)."""
    if torch.cuda.is_available():
        return True
    x = torch.randn(4096, 576, requires_grad=True)
    w = torch.randn(1536, 576, requires_grad=True)

    def seconds(bf16: bool) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = torch.nn.functional.linear(x, w)
            y.float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(True) < 0.8 * seconds(False)


def starting_drafter(config: dict, cls, target, fresh, must_match: dict):
    """The drafter a run starts from: `init_from` (a trained drafter folder, e.g. the shipped one, to train it
    further on more data) or `fresh()`. Checkpoints of the run itself take over when it resumes (train()).
    `must_match`: config keys the starting drafter's own config must agree with (name -> its value there)."""
    if not config.get("init_from"):
        return fresh()
    # Without its acceptance profile: that describes the starting weights, not the ones this run trains.
    drafter = cls.from_pretrained(config["init_from"], dtype=torch.float32, read_profile=False).attach(target)
    clashes = [f"{key}: {config[key]} in the config, {value} in {config['init_from']}"
               for key, value in must_match(drafter).items() if config.get(key) != value]
    if clashes:
        raise ValueError(f"init_from {config['init_from']} does not fit this config ({'; '.join(clashes)}): "
                         "set those keys to the drafter's values, or drop init_from to start from scratch")
    print(f"starting from {config['init_from']}")
    return drafter


def mixed_precision(config: dict) -> str:
    """accelerate's mixed_precision for the config's `precision`: float32, bfloat16 (autocast; fp32 weights and
    optimizer) or auto (bfloat16 where autocast_pays)."""
    precision = config.get("precision", "auto")
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision: {precision!r}; use auto, float32 or bfloat16")
    bf16 = precision == "bfloat16" or (precision == "auto" and autocast_pays())
    return "bf16" if bf16 else "no"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine down to 10%


# What accelerator.save_state writes for this loop (one model, optimizer and scheduler, DDP or one process).
REQUIRED_STATE = ("model.safetensors", "optimizer.bin", "scheduler.bin")


def checkpoints(out: Path) -> list[Path]:
    """The step-N folders, oldest first (unfinished saves are named .step-N.partial and never match)."""
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: every state file is whole). Saves are renamed
    into place only when complete, but a run killed while saving with an older trainer left torn step-N
    folders behind, and resuming from one crashes deep inside torch.load."""
    from safetensors import SafetensorError, safe_open

    missing = [name for name in REQUIRED_STATE if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):  # checks that the header describes exactly the bytes on disk
                    pass
            elif path.suffix in (".bin", ".pkl"):  # torch.save zips: a cut-off file has no central directory
                zipfile.ZipFile(path).close()
        except (SafetensorError, zipfile.BadZipFile, OSError) as exc:
            return f"{path.name} is truncated or corrupted ({exc})"
    return None


def latest_checkpoint(out: Path, report=print) -> Path | None:
    """The newest checkpoint that is whole; each damaged one skipped on the way is reported."""
    for folder in reversed(checkpoints(out)):
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        report(f"warning: skipping checkpoint {folder}: {damage}; resuming from an earlier one "
               f"(delete {folder} to silence this)")
    return None


def position_accuracy(objective: torch.nn.Module, batches: list[dict], device) -> dict:
    """Teacher-forced top-1 accuracy per draft position over `batches`: {"accuracy": [per position], "counted":
    [drafts per position]}, from the objective's position_hits(batch) -> (hits, counted), bool [N, positions]."""
    from accelerate.utils import send_to_device

    hits = counted = 0
    was_training = objective.training
    objective.eval()
    with torch.no_grad():
        for batch in batches:
            hit, count = objective.position_hits(send_to_device(batch, device))
            hits, counted = hits + (hit & count).sum(0), counted + count.sum(0)
    objective.train(was_training)
    return {"accuracy": [round(float(h) / max(1, int(c)), 4) for h, c in zip(hits, counted)],
            "counted": [int(c) for c in counted]}


def train(config: dict, objective: torch.nn.Module, drafter, store: Dataset,
          evaluation: dict[str, list[dict]] | None = None) -> Path:
    """Run the loop over `store` (features.FeatureStore or OnlineFeatures: its `collate` makes the batches);
    returns the folder of the exported drafter (`out`/final). `evaluation`: named lists of batches (e.g. a fixed
    sample of the training data and the dev set's references, features.evaluation_batches) whose accuracy
    per draft position is logged every `eval_every` steps and at the end, as rows {"split": name, ...}."""
    from accelerate import Accelerator

    if config.get("threads"):  # CPU: e.g. two recipes side by side on a 2-core machine
        torch.set_num_threads(config["threads"])
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    precision = mixed_precision(config)
    accelerator = Accelerator(gradient_accumulation_steps=config.get("grad_accum", 1), mixed_precision=precision)
    accelerator.print(f"precision: {'bf16 autocast' if precision == 'bf16' else 'float32'}")
    seed_everything(config.get("seed", 0))
    loader = DataLoader(store, batch_size=config["batch_size"], shuffle=True, collate_fn=store.collate,
                        generator=torch.Generator().manual_seed(config.get("seed", 0)))
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config.get("weight_decay", 0.0),
                                  betas=(0.9, 0.95))
    total, warmup = config["max_steps"], config.get("warmup_steps", 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    objective, optimizer, loader, scheduler = accelerator.prepare(objective, optimizer, loader, scheduler)

    step = 0
    resume = latest_checkpoint(out, accelerator.print)
    if resume is not None:
        accelerator.load_state(resume)
        step = int(resume.name.split("-")[1])
        accelerator.print(f"resumed from {resume} at step {step}")
    log = (out / "log.jsonl").open("a") if accelerator.is_main_process else None
    if accelerator.is_main_process:  # what this run trained on, for curves over data size (recipes/evaluate.py)
        write_text_atomically(out / "run.json", json.dumps({"config": config, "train_samples": len(store)}, indent=1))
    progress = tqdm(total=total, initial=step, desc=out.name, disable=not accelerator.is_local_main_process)
    epoch = step // max(1, len(loader))

    def log_evaluation() -> None:  # on the main process, with the unwrapped objective (no DDP sync)
        for split, batches in (evaluation or {}).items():
            row = {"step": step, "epoch": round(step / max(1, len(loader)), 3), "split": split,
                   **position_accuracy(accelerator.unwrap_model(objective), batches, accelerator.device)}
            log.write(json.dumps(row) + "\n")
            log.flush()

    eval_every = config.get("eval_every")
    if step == 0 and eval_every and log is not None:
        log_evaluation()  # the starting point of the curves
    while step < total:
        batches = loader
        if step % len(loader):  # resuming mid-epoch: skip what this epoch already saw
            batches = accelerator.skip_first_batches(loader, step % len(loader))
        for batch in batches:
            with accelerator.accumulate(objective):
                loss, metrics = objective(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.get("grad_clip", 1.0))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % config.get("log_every", 10) == 0 and log is not None:
                row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "loss": loss.item(),
                       **{k: float(v) for k, v in metrics.items()}}
                log.write(json.dumps(row) + "\n")
                log.flush()
                progress.set_postfix(loss=f"{row['loss']:.3f}")
            if eval_every and (step % eval_every == 0 or step == total) and log is not None:
                log_evaluation()
            if step % config.get("save_every", 500) == 0 or step == total:
                save_checkpoint(accelerator, out, step, config.get("keep_checkpoints", 2))
            if config.get("snapshot_every") and step % config["snapshot_every"] == 0 and accelerator.is_main_process:
                drafter.save_pretrained(out / "snapshots" / f"step-{step}")  # for acceptance-vs-steps curves
            if step >= total:
                break
        epoch += 1
    progress.close()
    final = out / "final"
    if accelerator.is_main_process:
        drafter.save_pretrained(final)  # the objective wraps this drafter: it holds the trained weights
    accelerator.wait_for_everyone()
    return final


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    """Save into .step-N.partial and rename it to step-N once every process has written its part, so a run
    killed while saving never leaves a step-N folder that resuming would pick."""
    final = out / "checkpoints" / f"step-{step}"
    partial = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        for leftover in (out / "checkpoints").glob(".step-*.partial"):  # from saves killed midway
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()  # no process writes into a folder that is still being removed
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a torn folder of an earlier, killed run (skipped when resuming) holds the name
            shutil.rmtree(final)
        partial.rename(final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
