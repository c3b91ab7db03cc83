"""Round latency measured on the current machine: what a round with k drafts costs with each paradigm.

round_seconds(route, k) = draft_s[route](k) + verify_s(k): drafting k tokens (an EAGLE-3 chain of
k steps, or one DFlash block of k+1) plus the target's verify forward over k+1 tokens. Costs are
measured after a context of typical length, with the drafters' own `draft`, smoothed along the length
where the timings' noise allows (_by_length), and interpolated linearly between measured lengths.

Sampling costs more per round than greedy: drafting picks each token through the target's processors
(sampled_draft_s, timed with the processors generate() builds for the default SAMPLING settings), and
transformers runs the processors on every one of the k+1 verified rows where plain sampling processes one
row per token (sample_row_s); either then draws once (sample_draw_s: softmax and a multinomial draw, which
speculative sampling takes once a round over all its rows).
"""

import functools
import random
import statistics
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .hook import cache_keyword
from .sampling import default_processors, draft_picker
from .stats import Clock

# The measurement plan, the one every table follows (calibration, the router and entropy recipes): drafting time
# grows smoothly with the length (an EAGLE-3 step each, one DFlash block picking more tokens), and so does the
# verify where it is not a step (_by_length reads each length along its neighbours' trend anyway), so lengths
# are measured sparsely and interpolated in between. Verifies of every length 0-15 in 12 rounds took twice the
# time of these in 8 rounds, and chose no steadier (BENCHMARKS.md, 2026-12-03 evening).
DRAFT_LENGTHS = (1, 2, 3, 4, 5, 6, 8, 11, 15)
LENGTHS = (0, *DRAFT_LENGTHS)  # verified drafts per round (0: the 1-token forward of plain decoding)
REPEATS = 8  # shuffled rounds timing every length once (_interleaved_times)


@dataclass
class LatencyModel:
    verify_s: dict[int, float]  # drafts k -> target forward over k+1 tokens (k = 0: a plain decoding step)
    draft_s: dict[str, dict[int, float]]  # route -> drafts k -> drafting time, greedy
    # Sampling costs; None in tables from before they were measured (a trained router's config may hold one).
    sampled_draft_s: dict[str, dict[int, float]] | None = None  # route -> drafts k -> drafting time, sampling
    sample_row_s: float | None = None  # the target's processors on one row under the default settings
    # Softmax and draw from one processed row: once per plain token, once per round. 0 in tables from before it
    # was measured apart, whose sample_row_s holds it (then charged on every verified row, as it was).
    sample_draw_s: float = 0.0

    def round_seconds(self, route: str, length: int, sampling: bool = False) -> float:
        return self.draft_seconds(route, length, sampling) + self.verify_seconds(length, sampling)

    def verify_seconds(self, length: int, sampling: bool = False) -> float:
        seconds = _interpolate(self.verify_s, length)
        return seconds + (length + 1) * _measured(self.sample_row_s) + self.sample_draw_s if sampling else seconds

    def draft_seconds(self, route: str, length: int, sampling: bool = False) -> float:
        return _interpolate((_measured(self.sampled_draft_s) if sampling else self.draft_s)[route], length)

    def to_dict(self) -> dict:
        return {"verify_s": self.verify_s, "draft_s": self.draft_s, "sampled_draft_s": self.sampled_draft_s,
                "sample_row_s": self.sample_row_s, "sample_draw_s": self.sample_draw_s}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyModel":
        ints = lambda d: {int(k): float(v) for k, v in d.items()}  # noqa: E731 (JSON keys are strings)
        routes = lambda d: {r: ints(times) for r, times in d.items()} if d is not None else None  # noqa: E731
        return cls(ints(data["verify_s"]), routes(data["draft_s"]), routes(data.get("sampled_draft_s")),
                   data.get("sample_row_s"), data.get("sample_draw_s", 0.0))

    @classmethod
    def measure(cls, assistant, context: int = 256, lengths=LENGTHS, repeats: int = REPEATS,
                draft_lengths=DRAFT_LENGTHS) -> "LatencyModel":
        """Time the target's verify at `lengths` and the assistant's drafters at `draft_lengths` after `context`
        random tokens (`repeats` shuffled rounds), with the kernels its generations run (packed weights where
        they pay, kernels.py)."""
        with assistant.kernels.active():
            return cls._measure(assistant, context, lengths, list(draft_lengths), repeats)

    @classmethod
    @torch.no_grad()
    def _measure(cls, assistant, context: int, lengths, draft_lengths: list[int], repeats: int) -> "LatencyModel":
        target, drafters = assistant.target, assistant.drafters
        vocab = target.config.get_text_config().vocab_size
        # Random tokens, twice over: the second half's suffix matches the first half, so lookup drafts its longest
        # proposals (the costs of the neural drafters and the target do not depend on the tokens).
        half = torch.randint(0, vocab, (1, context // 2), device=target.device,
                             generator=torch.Generator(target.device).manual_seed(0))
        prompt = half.repeat(1, 2)  # [1, context]
        cache = DynamicCache()
        cache_kwarg = cache_keyword(type(target))
        out = target(prompt, **{cache_kwarg: cache}, output_hidden_states=assistant.feature_layers)

        def verify(k):
            target(prompt[:, :k + 1], **{cache_kwarg: cache})
            cache.crop(-(k + 1))

        vocab_size = target.get_output_embeddings().weight.shape[0]
        processors = default_processors(target)
        row = out.logits[:, -1].float()  # [1, V]: a real distribution, as top-p's cost depends on its shape
        processed = processors(prompt, row.clone())

        def sample_row():  # what transformers does per verified row, and plain sampling per token
            processors(prompt, row.clone())

        def sample_draw():  # once per plain token, once per round (speculative sampling draws one token)
            torch.multinomial(processed.softmax(-1), 1)

        clock = Clock(target.device)
        verify_s = _by_length(_interleaved_times({k: functools.partial(verify, k) for k in lengths}, repeats, clock))
        sampling_s = _interleaved_times({"row": sample_row, "draw": sample_draw}, repeats, clock)
        sample = draft_picker(prompt, processors, True, vocab_size)
        draft_s, sampled_draft_s = {}, {}
        for route, drafter in drafters.items():
            draft, reset = _drafting(drafter, prompt, out.hidden_states)
            for table, pick in ((draft_s, None), (sampled_draft_s, sample)):
                runs = {k: functools.partial(draft, k, pick) for k in draft_lengths}
                table[route] = _by_length(_interleaved_times(runs, repeats, clock, reset))
        return cls(verify_s, draft_s, sampled_draft_s, statistics.median(sampling_s["row"]),
                   statistics.median(sampling_s["draw"]))


def _interleaved_times(runs: dict, repeats: int, clock, reset=lambda: None) -> dict[object, list[float]]:
    """Each run's seconds (key -> run; `reset()` before every run, untimed) in `repeats` rounds that each time
    every run once, in a new random order, after one untimed round.

    Why: on a shared 2-core VM single timings carry bursts of +50% that last a few hundred ms, and the first
    call of each shape pays one-off costs (oneDNN picks kernels per row count). Timed one length after
    another, a burst or a first call shifts a whole entry of the table, and the lengths chosen from it
    (calibration.best_length) moved from one calibration to the next. Shuffled rounds spread the bursts over
    all entries, where medians discard them, and compare lengths within the same stretch of time."""
    order, samples = list(runs), {key: [] for key in runs}
    shuffler = random.Random(0)
    for timed in [False] + [True] * repeats:
        shuffler.shuffle(order)
        for key in order:
            reset()
            start = clock()
            runs[key]()
            if timed:
                samples[key].append(clock() - start)
    return samples


def _by_length(times: dict[int, list[float]], width: int = 5) -> dict[int, float]:
    """Costs by length k from their timings: each length's median, or, where that median lies within its own
    noise of the linear trend through the medians of the `width` nearest measured lengths, that trend.

    Why: medians of 8-12 timings on a 2-core VM still err by 1-2 ms at ~30 ms, while real rounds one draft
    longer cost only 0.5-2 ms more. Of eight back-to-back calibrations on an AMD EPYC Zen 5, raw medians chose
    sampling chain 2 four times (chain 3 otherwise) and these costs of the same timings seven times; real rounds
    favour chain 2 by 5-7% there (BENCHMARKS.md, 2026-12-03). A cost that grows smoothly with the length is
    read from its neighbours too; a step beyond the median's noise (a matmul kernel that changes with the row
    count, as seen on CPUs) is kept. k = 0, the 1-token forward of plain decoding, runs kernels of its own and
    keeps its median."""
    medians = {k: statistics.median(t) for k, t in times.items()}
    lengths, costs = sorted(k for k in medians if k > 0), dict(medians)
    for k in lengths:
        near = sorted(lengths, key=lambda j: (abs(j - k), j))[:width]
        if len(near) < 3:
            continue
        slope, intercept = statistics.linear_regression(near, [medians[j] for j in near])
        trend = intercept + slope * k
        if abs(medians[k] - trend) <= 3 * _median_error(times[k]):
            costs[k] = trend
    return costs


def _median_error(times: list[float]) -> float:
    """Standard error of the median of `times`: 1.2533 robust sigmas (1.4826 median absolute deviations) / sqrt(n)."""
    median = statistics.median(times)
    sigma = 1.4826 * statistics.median(abs(t - median) for t in times)
    return 1.2533 * sigma / len(times) ** 0.5


def _drafting(drafter, prompt, hidden_states):
    """`draft(k, pick)` from the state right after catching up on the prompt's context, and `reset()`, which
    puts back what a draft consumed."""
    cache = drafter.new_cache()
    features = drafter.features(hidden_states)  # None for lookup, which reads only the tokens
    cache.enqueue(prompt[:, 1:], None if features is None else features[:, :-1])  # pairs (feature t, token t+1)
    drafter.catch_up(cache)
    state = cache.snapshot()
    return (lambda k, pick: drafter.draft(cache, k, pick)), (lambda: cache.restore(state))


def _measured(sampling_cost):
    if sampling_cost is None:
        raise ValueError("this latency table has no sampling costs (measured by an older hf_whiflash); measure it "
                         "again: `whiflash calibrate`, or LatencyModel.measure(assistant)")
    return sampling_cost


def _interpolate(table: dict[int, float], k: int) -> float:
    points = sorted(table)
    if k <= points[0] or len(points) == 1:
        return table[points[0]]
    for lo, hi in zip(points, points[1:]):
        if k <= hi:
            return table[lo] + (table[hi] - table[lo]) * (k - lo) / (hi - lo)
    lo, hi = points[-2], points[-1]
    return table[hi] + (table[hi] - table[lo]) * (k - hi) / (hi - lo)
