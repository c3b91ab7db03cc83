"""Round costs measured on the user's machine, once, and the draft lengths they make best.

The best draft length depends on the machine as much as on the drafter. With SmolLM2-135M on CPU, one
2-core AMD EPYC verified 3 tokens at twice the cost of 1 (and 4 tokens for less than 3: the LM head's
small matmuls), while an Intel Xeon with AMX verified 16 tokens for 1.3x the cost of 1. So the costs
that the draft-length choice and the neural router use are measured where the code runs: the target's
verify forward and each drafter's `draft` at lengths up to 15 (5-10 s on a 2-core CPU, where timings are
noisy: latency._interleaved_times and latency._by_length), cached on disk under a key of everything they
depend on (device model, threads, dtype, torch and transformers versions, the weights of the target and the
drafters).
"""

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
import transformers

from .checkpoint import write_text_atomically
from .latency import DRAFT_LENGTHS, LENGTHS, LatencyModel
from .names import DFLASH, EAGLE, GREEDY, LOOKUP, SAMPLED, read_bins
from .targets import cache_root, cpu_info


def device_name(device: torch.device) -> str:
    """The processor that runs the model: GPU name, or CPU model and the instruction set torch uses there."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info('model name') or 'unknown CPU'} ({torch.backends.cpu.get_cpu_capability()})"


def fingerprint(module: torch.nn.Module) -> str:
    """A cheap digest of a module's weights: names, shapes, dtypes and ~256 strided values per tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
        digest.update(f"{name}{list(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def calibration_key(assistant) -> dict:
    target = assistant.target
    return {"device": device_name(target.device), "threads": torch.get_num_threads(),
            "dtype": str(next(target.parameters()).dtype), "torch": torch.__version__,
            "transformers": transformers.__version__, "target": fingerprint(target),
            "drafters": {route: fingerprint(d) if isinstance(d, torch.nn.Module) else d.settings()
                         for route, d in assistant.drafters.items()},
            "packed_weights": assistant.kernels.enabled and ("probed" if assistant.kernels.probed else "all"),
            "lengths": [list(LENGTHS), list(DRAFT_LENGTHS)],
            "method": 11}  # method: bumped when the measurement changes


def cache_dir() -> Path:
    """Where measured round costs are kept (the test suite points this elsewhere: costs it measures on a busy
    machine must not be what later generations and benchmarks reuse)."""
    return cache_root() / "calibration"


def calibrated_latency(assistant, refresh: bool = False) -> LatencyModel:
    """The assistant's round costs on this machine: from cache_dir() when measured before under the same key,
    else measured now and written there (atomically: a killed write leaves no half file)."""
    key = calibration_key(assistant)
    path = cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"
    if not refresh and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved["key"] == key:
                return cached_latency(saved["latency"], assistant.drafters)
        except (ValueError, KeyError, TypeError, AttributeError) as damage:  # a damaged entry is measured again
            warnings.warn(f"{path} is a damaged calibration cache entry ({damage!r}): measuring the round costs again "
                          "and replacing it", stacklevel=2)
    latency = LatencyModel.measure(assistant)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"key": key, "latency": latency.to_dict()}, indent=1))
    return latency


def cached_latency(table: dict, drafters: dict) -> LatencyModel:
    """A cached round-cost table, refused (ValueError) unless it has costs for every drafter."""
    latency = LatencyModel.from_dict(table)
    missing = sorted(set(drafters) - set(latency.draft_s))
    if missing:
        raise ValueError(f"no draft costs for {missing}")
    return latency


# How much faster than plain decoding a draft length must promise to be used. Measured round costs carry
# noise (two calibrations on one AMD EPYC differed by ~7% in the 1-token forward) and a real round has
# bookkeeping the model leaves out (there: ~6% of an fp32 round); a promise of +16% once realised 0.96x.
MARGIN = 1.1


def best_length(latency: LatencyModel, route: str, tokens_per_round: dict[int, float], sampling: bool = False) -> int:
    """The draft length with the most expected tokens per second of round cost (greedy or sampling costs), or 0
    (do not draft) when none promises MARGIN times plain decoding's one token per 1-token step."""
    rate = {k: tokens / latency.round_seconds(route, k, sampling) for k, tokens in tokens_per_round.items() if k > 0}
    best = max(rate, key=rate.get)
    return best if rate[best] > MARGIN / latency.verify_seconds(0, sampling) else 0


class DraftCut:
    """Per-round draft length from the drafter's own confidence (lookup: the profiled chances of its match, which
    it passes as confidences), lossless by construction (it only decides how
    many drafts go to verification). With a_j the chance that the j-th draft is accepted given that the ones
    before it were, k drafts promise E_k = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens for this machine's
    calibrated cost of the round. a_j is the drafter's confidence c_j in its j-th draft (its probability of the
    token it picked), read through `by_confidence` where the drafter ships one (acceptance.json: the accepted
    share of dev-set drafts in c_j's bin; sampled drafts are accepted far less often than their confidence
    says), else c_j itself. An EAGLE-3 chain stops once one more step (assumed as likely accepted as the last)
    would lower E / cost; a DFlash block, drafted whole, keeps the k with the best E_k / cost (greedy or
    sampling costs), and so does lookup's proposal. `max_length` caps them all."""

    def __init__(self, latency: LatencyModel, route: str, max_length: int, sampling: bool = False,
                 by_confidence: list[float] | None = None):
        self.max_length, self.mode = max_length, SAMPLED if sampling else GREEDY
        self.per_step = route == EAGLE  # an EAGLE-3 chain pays per step; a DFlash block is paid whole
        self.verify = [latency.verify_seconds(k, sampling) for k in range(max_length + 1)]  # by drafts k
        self.draft = [latency.draft_seconds(route, k, sampling) if k else 0.0 for k in range(max_length + 1)]
        self.by_confidence = by_confidence

    def _chances(self, confidences: list[float]) -> list[float]:
        return confidences if self.by_confidence is None else read_bins(self.by_confidence, confidences)

    def _cost(self, k: int, drafted: int) -> float:
        return self.verify[k] + self.draft[k if self.per_step else drafted]

    def more(self, confidences: list[float]) -> bool:
        """After a chain's drafts with these confidences: whether to draft one more."""
        k = len(confidences)
        if k >= self.max_length:
            return False
        chances = self._chances(confidences)
        reach = math.prod(chances)
        expected = 1 + sum(math.prod(chances[:j]) for j in range(1, k + 1))
        return (expected + reach * chances[-1]) / self._cost(k + 1, k + 1) > expected / self._cost(k, k)

    def keep(self, confidences: list[float]) -> int:
        """Of a block's drafts with these confidences: how many to verify (at least one)."""
        chances = self._chances(confidences)
        n, expected, best, best_rate = len(chances), 1.0, 1, 0.0
        for k in range(1, n + 1):
            expected += math.prod(chances[:k])
            rate = expected / self._cost(k, n)
            if rate > best_rate:
                best, best_rate = k, rate
        return best


def describe(assistant) -> str:
    """The assistant's draft lengths per decoding mode in one line, with the expected rates behind calibrated ones."""
    modes = [f"{mode}: {_describe_mode(assistant, mode)}" for mode in (GREEDY, SAMPLED)]
    return modes[0] if modes[0] == modes[1] else " | ".join(modes)  # one mode's text when it says it all


def _describe_mode(assistant, mode: str) -> str:
    names = {EAGLE: "EAGLE-3 chain {k}", DFLASH: "DFlash block {b}", LOOKUP: "lookup {k} drafts"}
    sampling, parts = mode == SAMPLED, []
    for route, k in assistant.draft_lengths[mode].items():
        if not k:
            parts.append(f"{route}: no drafting (plain decoding is faster here)")
            continue
        text = names[route].format(k=k, b=k + 1)
        if route in assistant.dynamic_routes:
            text += " at most, cut per round by " + ("its match's profile" if route == LOOKUP else "confidence")
        if route in assistant.calibrated[mode]:  # the expected rate of the best fixed length behind the choice
            profile = assistant.drafters[route].tokens_per_round[mode]
            best = assistant.fixed_lengths[mode][route]
            expected = (f"{profile[best]:.2f} tokens/round, "
                        f"{profile[best] / assistant.latency.round_seconds(route, best, sampling):.1f} tok/s expected")
            text += (f" (best fixed: {names[route].format(k=best, b=best + 1)}, {expected})" if best != k
                     else f" (calibrated: {expected})")
        parts.append(text)
    if assistant.latency is not None:
        parts.append(f"plain decoding {1 / assistant.latency.verify_seconds(0, sampling):.1f} tok/s expected")
    return "; ".join(parts)


def latency_table(latency: LatencyModel) -> str:
    """The calibrated costs as a Markdown table (ms) by draft length k: the verify forward over k+1 tokens (with
    sampling: plus its k+1 processed rows) and each drafter's k drafts, greedy and sampled."""
    routes = list(latency.draft_s)
    columns = ["verify k+1 tokens", "sampling verify"] + [f"{r} draft{s}" for r in routes for s in ("", " sampled")]
    lines = ["| drafts k | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
    for k in sorted(latency.verify_s):
        cells = [latency.verify_s[k], latency.verify_seconds(k, sampling=True)]
        for route in routes:
            cells += [latency.draft_s[route].get(k), latency.sampled_draft_s[route].get(k)]
        lines.append(f"| {k} | " + " | ".join("–" if c is None else f"{1e3 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines)
