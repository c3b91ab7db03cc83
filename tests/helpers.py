"""Test helpers: prompts, plain-generate references, and drafters whose drafts are partly right on purpose."""

import json
from functools import cache
from pathlib import Path

import torch

from hf_whiflash import DEFAULT_TARGET, DFlashDrafter, Eagle3Drafter, EntropyPolicy, Policy, WhiFlashAssistant
from hf_whiflash.targets import shipped_drafters

PROMPTS = [json.loads(line) for line in (Path(__file__).parent / "data" / "lossless_prompts.jsonl").open()]


WORDS = ["<unk>", "<pad>", "<eos>"] + "write a function that adds two numbers call the tool with json what is " \
        "one plus hello tell me story sum of".split()


def word_tokenizer(words: list[str] = WORDS):
    """A word-level chat tokenizer over `words` (<unk> for the rest) for tiny test targets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


class Script:
    """The continuation drafts should follow, and where they go wrong.

    Round r's draft is wrong at offset r % (k + 1) (offset k: no error), so over k+1 consecutive
    rounds every acceptance length 0..k occurs, whatever the paradigm. The round counter is shared by
    all scripts, so the cycle carries on across short generations.
    """

    round = 0  # class-wide: advanced by CountingPolicy once per routing decision

    def __init__(self, reference: torch.Tensor, draft_length: int, perfect: bool = False):
        self.reference = reference[0].tolist()  # prompt + the target's own greedy continuation
        self.draft_length = draft_length
        self.perfect = perfect  # no errors: every draft follows the reference as far as it goes

    def bias(self, first_position: int, round_start: int, count: int, vocab: int) -> torch.Tensor:
        """[1, count, vocab] logit bonus for positions first_position.. of a round starting at round_start."""
        bias = torch.zeros(1, count, vocab)
        wrong_offset = self.round % (self.draft_length + 1)
        for i in range(count):
            position = first_position + i
            if position >= len(self.reference):
                continue
            token = self.reference[position]
            if position - round_start == wrong_offset and not self.perfect:
                token = (token + 1 + position) % vocab
            bias[0, i, token] = 1000.0
        return bias


class ScriptedEagle(Eagle3Drafter):
    """A real EAGLE-3 head (all its caching runs) whose logits are pushed towards the script."""

    script: Script
    seen_round, round_start = -1, 0

    def forward(self, next_ids, hidden, cache=None):
        first = (cache.get_seq_length() if cache is not None else 0) + 2  # pair at t predicts token t+2
        if self.script.round != self.seen_round:
            self.seen_round, self.round_start = self.script.round, first
        logits, h = super().forward(next_ids, hidden, cache)
        bias = self.script.bias(first, self.round_start, next_ids.shape[1], logits.shape[-1])
        return logits + bias.to(logits), h


class ScriptedDFlash(DFlashDrafter):
    """A real DFlash drafter (all its caching runs) whose block logits are pushed towards the script."""

    script: Script
    block_start = 0

    def forward(self, block_ids, features=None, cache=None):
        self.block_start = (cache.get_seq_length() if cache is not None else 0) + (
            features.shape[1] if features is not None else 0)
        return super().forward(block_ids, features, cache)

    def logits(self, hidden):
        logits = super().logits(hidden)  # the engine passes block positions 1.. (predicting start+1..)
        first = self.block_start + 1
        return logits + self.script.bias(first, first, hidden.shape[1], logits.shape[-1]).to(logits)


class CountingPolicy(Policy):
    """Wraps a policy and advances the script's round counter once per routing decision."""

    def __init__(self, inner, script: Script):
        self.inner, self.script = inner, script

    def for_generation(self):
        return CountingPolicy(self.inner.for_generation(), self.script)

    def choose(self, features, lengths):
        Script.round += 1
        return self.inner.choose(features, lengths)

    def observe(self, *args):
        self.inner.observe(*args)

    def to_dict(self):
        return self.inner.to_dict()


class RoutePattern(Policy):
    """Deterministic routing for tests: cycles through a fixed list of routes, from the start in every generation."""

    def __init__(self, pattern):
        self.pattern, self.i = list(pattern), 0

    def for_generation(self):
        return RoutePattern(self.pattern)

    def choose(self, features, lengths):
        route = self.pattern[self.i % len(self.pattern)]
        self.i += 1
        return route if route in lengths or route != "lookup" else next(iter(lengths))  # lookup: where it matched

    def to_dict(self):
        return {"type": "pattern", "pattern": self.pattern}


@cache
def random_drafters(target):
    return Eagle3Drafter.for_target(target, seed=0), DFlashDrafter.for_target(target, seed=1)


def make_assistant(target, mode: str, kind: str, reference=None, policy=None, perfect=False,
                   **kwargs) -> WhiFlashAssistant:
    """mode: eagle3 | dflash | whiflash (both, and lookup); kind: random | trained (the shipped drafters) | scripted
    (drafts follow `reference`, partly right unless `perfect`)."""
    if kind == "trained":
        routes = {"eagle3": ("eagle3",), "dflash": ("dflash",), "whiflash": ("eagle3", "dflash", "lookup")}[mode]
        # Fixed lengths: calibration may find that a drafter does not pay on this machine, and these tests need drafts.
        kwargs = {"eagle_steps": 2, "dflash_block_size": 16} | kwargs
        return WhiFlashAssistant.from_pretrained(target, shipped_drafters(DEFAULT_TARGET), routes=routes,
                                                 policy=policy, **kwargs)
    if kind == "random":
        eagle, dflash = random_drafters(target)
    else:
        eagle, dflash = ScriptedEagle.for_target(target, seed=0), ScriptedDFlash.for_target(target, seed=1)
    eagle = eagle if mode in ("eagle3", "whiflash") else None
    dflash = dflash if mode in ("dflash", "whiflash") else None
    policy = policy or EntropyPolicy()
    if kind == "scripted":
        draft_length = max(kwargs.get("eagle_steps", 6) if eagle else 0, 15 if dflash else 0)
        script = Script(reference, draft_length, perfect)
        for drafter in (eagle, dflash):
            if drafter is not None:
                drafter.script = script
        policy = CountingPolicy(policy, script)
    return WhiFlashAssistant(target, eagle, dflash, policy, lookup=mode == "whiflash", **kwargs)


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel of `files` (path in the wheel -> bytes) that pip downloads from a --find-links folder."""
    import zipfile

    stem = f"{name.replace('-', '_')}-{version}"
    meta = {f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{stem}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, data in {**files, **meta}.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def extra_requirements(extras: dict[str, list[str]], extra: str) -> list[str]:
    """The requirements of one of pyproject.toml's extras, its references to other extras ("hf-whiflash[gguf]")
    replaced by their requirements."""
    import re

    requirements = []
    for requirement in extras[extra]:
        included = re.fullmatch(r"hf-whiflash\[(.+)\]", requirement)
        requirements += ([r for name in included.group(1).split(",") for r in extra_requirements(extras, name)]
                         if included else [requirement])
    return requirements
