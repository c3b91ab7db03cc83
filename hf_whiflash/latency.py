"""Round latency measured on the current machine: what a round with k drafts costs with each paradigm.

round_seconds(route, k) = draft_s[route](k) + verify_s(k): drafting k tokens (an EAGLE-3 chain of
k steps, or one DFlash block of k+1) plus the target's verify forward over k+1 tokens. Costs are
measured after a context of typical length and interpolated linearly between measured lengths.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .routing import DFLASH, EAGLE

LENGTHS = (1, 2, 4, 6, 8, 12, 15)


@dataclass
class LatencyModel:
    verify_s: dict[int, float]  # drafts k -> target forward over k+1 tokens
    draft_s: dict[str, dict[int, float]]  # route -> drafts k -> drafting time

    def round_seconds(self, route: str, length: int) -> float:
        return _interpolate(self.draft_s[route], length) + _interpolate(self.verify_s, length)

    def to_dict(self) -> dict:
        return {"verify_s": self.verify_s, "draft_s": self.draft_s}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyModel":
        ints = lambda d: {int(k): float(v) for k, v in d.items()}  # noqa: E731 (JSON keys are strings)
        return cls(ints(data["verify_s"]), {r: ints(d) for r, d in data["draft_s"].items()})

    @classmethod
    @torch.no_grad()
    def measure(cls, assistant, context: int = 256, lengths=LENGTHS, repeats: int = 7) -> "LatencyModel":
        """Time the target and the assistant's drafters after `context` random tokens (medians of `repeats`)."""
        target, drafters = assistant.target, assistant.drafters
        device = target.device
        vocab = target.config.get_text_config().vocab_size
        prompt = torch.randint(0, vocab, (1, context), device=device, generator=torch.Generator(device).manual_seed(0))
        cache = DynamicCache()
        out = target(prompt, past_key_values=cache, output_hidden_states=sorted(
            {i for d in drafters.values() for i in d.feature_layers}))
        clock = _clock(device)

        def median_time(fn) -> float:
            times = []
            for _ in range(repeats):
                start = clock()
                fn()
                times.append(clock() - start)
            return statistics.median(times)

        def verify(k):
            target(prompt[:, :k + 1], past_key_values=cache)
            cache.crop(-(k + 1))

        verify_s = {k: median_time(lambda: verify(k)) for k in lengths}
        draft_s = {}
        if EAGLE in drafters:
            eagle, eagle_cache = drafters[EAGLE], DynamicCache()
            hidden = eagle.project(eagle.features(out.hidden_states))
            eagle.absorb(prompt[:, 1:], hidden[:, :-1], eagle_cache)

            def chain(k):
                ids, h = prompt[:, -1:], hidden[:, -1:]
                for _ in range(k):
                    logits, h = eagle(ids, h, eagle_cache)
                    ids = eagle.to_target_ids(logits[:, -1].argmax(-1, keepdim=True))
                eagle_cache.crop(-k)

            draft_s[EAGLE] = {k: median_time(lambda: chain(k)) for k in lengths}
        if DFLASH in drafters:
            dflash, dflash_cache = drafters[DFLASH], DynamicCache()
            dflash.absorb(dflash.features(out.hidden_states), dflash_cache)
            block = lambda k: dflash.logits(dflash(dflash.block_ids(prompt[:, -1:], k + 1), cache=dflash_cache)[:, 1:])  # noqa: E731
            draft_s[DFLASH] = {k: median_time(lambda: block(k).argmax(-1)) for k in lengths}
        return cls(verify_s, draft_s)


def _interpolate(table: dict[int, float], k: int) -> float:
    points = sorted(table)
    if k <= points[0] or len(points) == 1:
        return table[points[0]]
    for lo, hi in zip(points, points[1:]):
        if k <= hi:
            return table[lo] + (table[hi] - table[lo]) * (k - lo) / (hi - lo)
    lo, hi = points[-2], points[-1]
    return table[hi] + (table[hi] - table[lo]) * (k - hi) / (hi - lo)


def _clock(device):
    if device.type == "cuda":
        def synchronized():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return synchronized
    return time.perf_counter
