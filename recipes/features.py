"""Target hidden states for training, computed once and shared by both drafter recipes.

A store folder holds:
  index.json      {"target", "layers", "hidden_size", "samples": [{"id", "category", "offset", "length",
                   "response_start"}]}
  tokens.i32      every sample's token ids back to back (int32)
  layer_{i}.f16   hidden_states[i] for every token, [N, H] float16 (i = HF hidden_states index)
Built into a temporary sibling and renamed into place, so an interrupted build never looks complete. When the
data grows, only the new samples are computed and appended; layers added later are written beside the others
and renamed in. index.json is replaced last, so a store is always exactly what its index lists (rows a killed
append wrote past it are overwritten by the next one).
With `accelerate launch`, each process computes its share of the samples.

`features: online` in a recipe config skips the store: OnlineFeatures computes the same hidden states batch by
batch inside the training loop, so the data a run can use is bounded by its token ids, not by disk (a store
takes 2 bytes x H per token and layer: 5.8 GB for SmolLM2's five layers over 1M tokens). A store pays when a
run makes several passes over the same data; one pass costs the same either way.

`feature_dtype` in a recipe config is the dtype the target computes them in: float32, bfloat16, or auto (bfloat16
where the CPU computes it natively and faster, hf_whiflash.targets.resolve_dtype; 2.3x the tokens/s of float32 on
an AMD EPYC with AVX512-BF16). A store records its dtype; one of another dtype is rebuilt.
"""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from jsonl import read_rows

from hf_whiflash.checkpoint import write_text_atomically


def read_samples(data_dir: Path, max_len: int) -> list[dict]:
    samples = []
    for path in sorted(Path(data_dir).glob("samples.*.jsonl")):
        samples += read_rows(path)
    if not samples:
        raise FileNotFoundError(f"no samples.*.jsonl in {data_dir}: run recipes/data.py first")
    samples.sort(key=lambda s: s["id"])
    for s in samples:
        s["input_ids"] = s["input_ids"][:max_len]
    return [s for s in samples if s["response_start"] < len(s["input_ids"]) - 1]


def training_features(config: dict, target, read: list[int]) -> Dataset:
    """The samples a recipe trains on, with the target's hidden_states `read`: OnlineFeatures when the config's
    `features` is "online", else a feature store at that path (built or grown first; it also keeps the config's
    `extra_feature_layers`)."""
    dtype = feature_dtype(config, target)
    print(f"target features in {dtype}")
    if config["features"] == "online":
        return OnlineFeatures.from_data(target, config["data"], read, config["max_len"], config["max_samples"],
                                        config.get("seed", 0), dtype)
    layers = store_layers(target, read, config.get("extra_feature_layers", []))
    store_dir = build_store(config["target"], config["data"], config["features"], layers, config["max_len"],
                            dtype=dtype)
    return FeatureStore(store_dir, read, config["max_samples"], config.get("seed", 0))


def feature_dtype(config: dict, target) -> torch.dtype:
    from hf_whiflash.targets import resolve_dtype

    return resolve_dtype(config.get("feature_dtype", "float32"), target.device)


def evaluation_batches(config: dict, target, tokenizer, store, read: list[int]) -> dict[str, list[dict]]:
    """The batches of the trainers' in-run evaluation (trainer.position_accuracy), computed once: with
    `eval_prompts` (a prompt set or jsonl as `whiflash bench --prompts` takes them; null: no evaluation), those
    prompts with the target's greedy continuation (`eval_new_tokens`, cached in `out`/eval_references.jsonl), and
    as many training sequences (a fixed random sample), with the target's hidden_states `read`. Training-set
    against dev-set accuracy per draft position tells under-fitting (both low) from over-fitting (dev falls)."""
    if not config.get("eval_prompts"):
        return {}
    from evaluate import references

    from hf_whiflash.bench import load_prompts

    prompts = load_prompts(config["eval_prompts"], None)
    out = Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    refs = references(target, tokenizer, prompts, config["eval_new_tokens"], out / "eval_references.jsonl",
                      config["target"])
    held = [{"input_ids": refs[p["id"]]["ids"], "response_start": refs[p["id"]]["prompt_length"]} for p in prompts]
    chosen = np.random.default_rng(config.get("seed", 0)).permutation(len(store))[:len(held)]
    online = OnlineFeatures(target, held, read, feature_dtype(config, target))
    chunks = lambda items: [items[i:i + config["batch_size"]] for i in range(0, len(items), config["batch_size"])]  # noqa: E731
    name = Path(config["eval_prompts"]).stem if config["eval_prompts"].endswith(".jsonl") else config["eval_prompts"]
    return {"train": [store.collate(chunk) for chunk in chunks([store[int(i)] for i in sorted(chosen)])],
            name: [online.collate(chunk) for chunk in chunks([online[i] for i in range(len(online))])]}


def frequent_tokens(store, size: int, always: int) -> torch.Tensor:
    """The `size` most frequent response tokens of the store's samples (`always`, e.g. EOS, among them),
    ascending: an EAGLE-3 draft vocabulary, or the vocabulary a DFlash loss normalises over."""
    counts = np.bincount(store.response_tokens(), minlength=size)
    counts[always] = counts.max() + 1
    return torch.from_numpy(np.sort(np.argsort(-counts, kind="stable")[:size]))


def subset(count: int, max_samples: int | None, seed: int, source) -> list[int] | None:
    """Indices of a random subset of `count` samples (for curves of acceptance against data size; nested across
    sizes), or None for all of them."""
    if max_samples is None:
        return None
    if not 0 < max_samples <= count:
        raise ValueError(f"max_samples={max_samples}: {source} holds {count} samples")
    return sorted(np.random.default_rng(seed).permutation(count)[:max_samples])


def store_layers(target, needed, extra) -> list[int]:
    """The hidden_states indices a feature store keeps: what this recipe reads plus `extra_feature_layers` (what the
    other recipe reads, computed in the same pass; without it the other recipe adds its layers later, in a second
    pass over the data), each checked against this target's depth."""
    depth = target.config.get_text_config().num_hidden_layers
    outside = sorted(i for i in extra if not 0 <= i <= depth)
    if outside:
        raise ValueError(f"extra_feature_layers {outside} are outside this target's hidden_states 0..{depth} "
                         f"({depth} layers): list the layers the other recipe reads for this target, or drop the key")
    return sorted(set(needed) | set(extra))


def build_store(target_name: str, data_dir, folder, layers: list[int], max_len: int, batch_tokens: int = 4096,
                dtype: torch.dtype = torch.float32):
    """Compute (or reuse) a feature store of the data's samples with at least `layers`; returns its folder.
    Samples the data gained are appended (computing only those), then missing layers are added for every
    sample; a store holding samples the data no longer has (or of another max_len) is rebuilt whole, keeping
    its layers. index.json is renamed in last: a build killed midway leaves the store as its index says."""
    from accelerate import PartialState

    folder = Path(folder)
    samples = read_samples(data_dir, max_len)
    index_path = folder / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    stored = {(s["id"], s["length"]) for s in index["samples"]} if index else set()
    computed_with = (target_name, dtype_name(dtype))  # a store of another target or dtype is rebuilt
    same_model = index is not None and (index["target"], index.get("dtype", "float32")) == computed_with
    grows = same_model and stored <= {(s["id"], len(s["input_ids"])) for s in samples}
    if not grows:
        kept = index["layers"] if index else []
        return rebuild_store(target_name, samples, folder, sorted(set(layers) | set(kept)), batch_tokens, dtype)
    state = PartialState()
    new = [s for s in samples if (s["id"], len(s["input_ids"])) not in stored]
    if new:  # the data grew: compute the new samples only, into the ends of the store's files
        start = sum(s["length"] for s in index["samples"])
        offsets = start + np.cumsum([0] + [len(s["input_ids"]) for s in new])
        if state.is_main_process:
            tokens = np.memmap(resized(folder / "tokens.i32", int(offsets[-1]) * 4), np.int32, "r+")
            tokens[start:] = np.concatenate([s["input_ids"] for s in new])
            tokens.flush()
        write_layers(target_name, new, offsets, folder, index["layers"], "", batch_tokens, state, dtype)
        index["samples"] += sample_entries(new, offsets)
        write_index(index, folder, state)
    missing = sorted(set(layers) - set(index["layers"]))
    if missing:  # a recipe reading other layers: add them beside the others, rename them in, then the index
        offsets = np.array([s["offset"] for s in index["samples"]] + [sum(s["length"] for s in index["samples"])])
        tokens = np.memmap(folder / "tokens.i32", np.int32, "r", shape=(int(offsets[-1]),))
        every = [{**s, "input_ids": tokens[s["offset"]:s["offset"] + s["length"]]} for s in index["samples"]]
        write_layers(target_name, every, offsets, folder, missing, ".partial", batch_tokens, state, dtype)
        if state.is_main_process:
            for layer in missing:
                (folder / f"layer_{layer}.f16.partial").rename(folder / f"layer_{layer}.f16")
        index["layers"] = sorted(set(index["layers"]) | set(missing))
        write_index(index, folder, state)
    return folder


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rebuild_store(target_name: str, samples: list[dict], folder: Path, layers: list[int], batch_tokens: int,
                  dtype: torch.dtype) -> Path:
    """A new store of `samples` with `layers`, built in a temporary sibling that replaces `folder` when whole."""
    from accelerate import PartialState

    state = PartialState()
    offsets = np.cumsum([0] + [len(s["input_ids"]) for s in samples])
    tmp = folder.with_name(folder.name + ".partial")
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.memmap(tmp / "tokens.i32", np.int32, "w+", shape=(int(offsets[-1]),))[:] = np.concatenate(
            [s["input_ids"] for s in samples])
    hidden = write_layers(target_name, samples, offsets, tmp, layers, "", batch_tokens, state, dtype)
    if state.is_main_process:
        index = {"target": target_name, "dtype": dtype_name(dtype), "layers": layers, "hidden_size": hidden,
                 "samples": sample_entries(samples, offsets)}
        (tmp / "index.json").write_text(json.dumps(index))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    state.wait_for_everyone()
    return folder


def sample_entries(samples: list[dict], offsets) -> list[dict]:
    return [{"id": s["id"], "category": s["category"], "offset": int(o), "length": len(s["input_ids"]),
             "response_start": s["response_start"]} for s, o in zip(samples, offsets)]


def write_index(index: dict, folder: Path, state) -> None:
    if state.is_main_process:
        write_text_atomically(folder / "index.json", json.dumps(index))
    state.wait_for_everyone()


def resized(path: Path, size: int) -> Path:
    """`path` made exactly `size` bytes: created, grown with zeros, or cut back to drop what a killed append
    wrote past the index (the rows the index lists are kept)."""
    with path.open("ab") as f:
        f.truncate(size)
    return path


def write_layers(target_name: str, samples: list[dict], offsets, folder: Path, layers: list[int], suffix: str,
                 batch_tokens: int, state, dtype: torch.dtype) -> int:
    """The target's hidden_states[layer] for every token of `samples`, at rows offsets[i]:offsets[i+1] of
    folder/layer_{layer}.f16{suffix} ([offsets[-1], H] float16, created or resized; rows before offsets[0] are
    kept); returns H. With `accelerate launch` each process computes its share of the samples."""
    from hf_whiflash import load_target
    from hf_whiflash.kernels import PackedLinears

    model, _ = load_target(target_name, dtype=dtype, device=state.device)
    hidden = model.config.get_text_config().hidden_size
    rows = int(offsets[-1])
    paths = {layer: folder / f"layer_{layer}.f16{suffix}" for layer in layers}
    if state.is_main_process:
        for path in paths.values():
            resized(path, rows * hidden * 2)
    state.wait_for_everyone()
    stores = {layer: np.memmap(path, np.float16, "r+", shape=(rows, hidden)) for layer, path in paths.items()}
    mine = list(range(state.process_index, len(samples), state.num_processes))
    mine.sort(key=lambda i: len(samples[i]["input_ids"]))  # batches of similar length, little padding
    batches, current = [], []
    for i in mine:
        if current and (len(current) + 1) * len(samples[i]["input_ids"]) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches += [current] if current else []
    with torch.no_grad(), PackedLinears([model]).active():  # packed weights where they pay (x1.11 on one EPYC)
        for batch in tqdm(batches, desc=f"target features {layers} (rank {state.process_index})"):
            length = max(len(samples[i]["input_ids"]) for i in batch)
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: causal attention keeps real tokens exact
                ids[row, : len(samples[i]["input_ids"])] = torch.tensor(samples[i]["input_ids"])
            # logits_to_keep=1: the LM head (a fifth of SmolLM2's compute) is not needed for hidden states
            out = model(ids.to(state.device), output_hidden_states=layers, logits_to_keep=1)
            for layer in layers:
                h = out.hidden_states[layer].to(torch.float16).cpu().numpy()
                for row, i in enumerate(batch):
                    n = len(samples[i]["input_ids"])
                    stores[layer][offsets[i]:offsets[i] + n] = h[row, :n]
    for store in stores.values():
        store.flush()
    state.wait_for_everyone()
    return hidden


class FeatureStore(Dataset):
    """Samples as {"input_ids" [T], "response_start", "hidden": {layer: [T, H] float16}} (memory-mapped)."""

    def __init__(self, folder, layers: list[int], max_samples: int | None = None, seed: int = 0):
        folder = Path(folder)
        index = json.loads((folder / "index.json").read_text())
        missing = set(layers) - set(index["layers"])
        if missing:
            raise ValueError(f"{folder} lacks hidden_states layers {sorted(missing)}; rebuild the store")
        self.samples, total = index["samples"], sum(s["length"] for s in index["samples"])
        keep = subset(len(self.samples), max_samples, seed, f"the store at {folder}")
        if keep is not None:
            self.samples = [self.samples[i] for i in keep]
        self.tokens = np.memmap(folder / "tokens.i32", np.int32, "r", shape=(total,))
        self.layers = {layer: np.memmap(folder / f"layer_{layer}.f16", np.float16, "r",
                                        shape=(total, index["hidden_size"])) for layer in layers}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        span = slice(s["offset"], s["offset"] + s["length"])
        return {"input_ids": torch.from_numpy(self.tokens[span].astype(np.int64)),
                "response_start": s["response_start"],
                "hidden": {layer: torch.from_numpy(np.array(store[span])) for layer, store in self.layers.items()}}

    def response_tokens(self) -> np.ndarray:
        """Every response token id (the loss region), e.g. to pick an EAGLE-3 draft vocabulary."""
        return np.concatenate([self.tokens[s["offset"] + s["response_start"]: s["offset"] + s["length"]]
                               for s in self.samples])

    def collate(self, batch: list[dict]) -> dict:
        return collate(batch)


class OnlineFeatures(Dataset):
    """A store's samples without the store: {"input_ids" [T], "response_start"}, and `collate` adds the target's
    hidden_states `layers` of the whole batch from one forward (no grad; in `dtype`, a copy of the target when
    that is not its own; packed weights where they pay), on the device accelerate gives this process."""

    def __init__(self, target, samples: list[dict], layers: list[int], dtype: torch.dtype = torch.float32):
        from accelerate import PartialState

        from hf_whiflash.kernels import PackedLinears

        self.samples = samples  # {"input_ids", "response_start", ...}
        self.device = PartialState().device
        if dtype != next(target.parameters()).dtype:  # the recipe keeps its own target (LM head rows) as it is
            target = copy.deepcopy(target).to(dtype)
        self.target, self.layers = target.to(self.device), layers
        self.kernels = PackedLinears([self.target])  # decided (and packed) once, not per batch

    @classmethod
    def from_data(cls, target, data_dir, layers: list[int], max_len: int, max_samples: int | None = None,
                  seed: int = 0, dtype: torch.dtype = torch.float32) -> "OnlineFeatures":
        """The samples of a data folder (recipes/data.py), or the random subset of `max_samples` of them a store
        with the same max_samples and seed holds."""
        samples = read_samples(data_dir, max_len)
        keep = subset(len(samples), max_samples, seed, data_dir)
        return cls(target, samples if keep is None else [samples[i] for i in keep], layers, dtype)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"input_ids": torch.tensor(s["input_ids"]), "response_start": s["response_start"]}

    def response_tokens(self) -> np.ndarray:
        return np.concatenate([s["input_ids"][s["response_start"]:] for s in self.samples])

    def collate(self, batch: list[dict]) -> dict:
        padded = collate(batch)
        with torch.no_grad(), self.kernels.active():
            # Right padding, no attention mask: causal attention keeps the real tokens exact (as the store does).
            out = self.target(padded["input_ids"].to(self.device), output_hidden_states=self.layers, logits_to_keep=1)
        padded["hidden"] = {layer: out.hidden_states[layer].float() for layer in self.layers}
        return padded


def collate(batch: list[dict]) -> dict:
    """Right-pad to the longest sample -> input_ids [B, T], valid/response masks [B, T], and for stored samples
    hidden {layer: [B, T, H]}."""
    length = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    valid = torch.zeros(len(batch), length, dtype=torch.bool)
    stored = batch[0].get("hidden", {})
    hidden = {layer: torch.zeros(len(batch), length, h.shape[1]) for layer, h in stored.items()}
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, :n], valid[row, :n] = b["input_ids"], True
        for layer, h in b.get("hidden", {}).items():
            hidden[layer][row, :n] = h.float()
    response = valid & (torch.arange(length)[None, :] >= torch.tensor([b["response_start"] for b in batch])[:, None])
    batch = {"input_ids": ids, "valid": valid, "response": response}
    return batch | {"hidden": hidden} if stored else batch
