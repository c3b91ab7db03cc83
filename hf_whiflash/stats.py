"""Per-generation statistics (readable after generate() as `assistant.stats`) and the clock that fills them."""

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from statistics import mean

import torch


class Clock:
    """Seconds on `device`'s clock. On CUDA it waits for queued kernels first, so a phase's time is its own."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None

    def __call__(self) -> float:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        return time.perf_counter()

    @contextmanager
    def adds_to(self, record, name: str):
        """Add the seconds spent inside the block to `record.<name>`."""
        start = self()
        try:
            yield
        finally:
            setattr(record, name, getattr(record, name) + self() - start)


@dataclass
class Round:
    route: str  # "eagle3", "dflash", or "target" when no tokens could be drafted (length budget)
    drafted: int = 0  # candidate tokens proposed
    accepted: int = 0  # candidate tokens the target accepted
    draft_s: float = 0.0  # the whole drafting side of the round: routing, catch-up and drafting
    catch_up_s: float = 0.0  # K/V-only prefill of queued positions (part of draft_s)
    verify_s: float = 0.0  # target forward over the candidates plus acceptance
    draft_ids: list[int] = field(default_factory=list)  # the candidates, for traces and tests
    caught_up: int = 0  # queued positions absorbed by K/V-only prefill this round (all drafters)
    route_s: float = 0.0  # routing: features + the policy's decision (part of draft_s)

    @property
    def seconds(self) -> float:
        return self.draft_s + self.verify_s


@dataclass
class GenerationStats:
    rounds: list[Round] = field(default_factory=list)
    prefill_s: float = 0.0  # the target's first forward over the prompt
    in_flight: Round | None = None  # the round being verified (streamers read it: see streaming.py)

    @property
    def routes(self) -> list[str]:
        return [r.route for r in self.rounds]

    def acceptance_length(self, route: str | None = None) -> float:
        """Mean tokens produced per round (accepted drafts + the target's bonus token), as in the papers."""
        rounds = [r for r in self.rounds if route is None or r.route == route]
        return mean(r.accepted + 1 for r in rounds) if rounds else float("nan")

    def time(self, what: str) -> float:
        return sum(getattr(r, what) for r in self.rounds)

    def summary(self) -> dict:
        routes = sorted(set(self.routes))
        total = self.time("seconds")
        return {
            "rounds": len(self.rounds),
            "rounds_per_route": {r: self.routes.count(r) for r in routes},
            "acceptance_length": self.acceptance_length(),
            "acceptance_length_per_route": {r: self.acceptance_length(r) for r in routes},
            "drafted": sum(r.drafted for r in self.rounds),
            "accepted": sum(r.accepted for r in self.rounds),
            "draft_s": self.time("draft_s"),
            "catch_up_s": self.time("catch_up_s"),
            "verify_s": self.time("verify_s"),
            "prefill_s": self.prefill_s,
            "catch_up_share": self.time("catch_up_s") / total if total else 0.0,
            "routing_share": self.time("route_s") / total if total else 0.0,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "rounds": [asdict(r) for r in self.rounds]}
