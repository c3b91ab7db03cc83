"""Routing: which drafter drafts the next round, decided from information available before drafting.

`RoundFeatures` is what the candidate generator knows when a round starts (cheap to compute: one
softmax over the target's logits at the last verified position plus running averages). A policy is
any object with `choose(features, routes) -> route`, optionally `observe(features, route, accepted,
seconds)` to learn from the outcome of the round it chose.
"""

from dataclasses import dataclass, field

EAGLE, DFLASH = "eagle3", "dflash"
ROUTES = (EAGLE, DFLASH)


@dataclass
class RoundFeatures:
    entropy: float  # target entropy (nats) of the distribution that produced the last verified token
    top1_prob: float  # its top-1 probability
    position: int  # tokens generated so far
    last_route: str | None
    last_accepted: int  # drafted tokens the target accepted last round
    accepted_ema: dict[str, float] = field(default_factory=dict)  # per route: recent accepted drafted tokens
    seconds_ema: dict[str, float] = field(default_factory=dict)  # per route: recent round time (draft + verify)
    rounds_since: dict[str, int] = field(default_factory=dict)  # per route: rounds since it last drafted
    pending: dict[str, int] = field(default_factory=dict)  # per route: positions waiting in its catch-up queue


class EntropyPolicy:
    """Pick the route with the best expected tokens per unit of round cost, per entropy regime.

    The target's entropy at the last verified position splits rounds into a confident regime
    (entropy < `threshold`: structured text such as code, JSON or tool calls, where a parallel
    DFlash block tends to be accepted far) and an uncertain one (open-ended text, where the
    autoregressive EAGLE-3 chain holds up better). Within each regime the policy keeps a running
    estimate of the accepted drafted tokens per route (starting from those priors) and scores

        score(route) = (1 + accepted(route, regime)) / round_seconds(route) ** latency_weight

    `latency_weight` = 0 maximises tokens per round, 1 maximises tokens per second. A route not
    tried for `explore_every` rounds of a regime is tried once, because acceptance swings within
    a sequence and estimates of an idle route go stale.
    """

    def __init__(self, threshold: float = 1.0, latency_weight: float = 1.0, explore_every: int = 8,
                 decay: float = 0.5, priors: dict | None = None):
        self.threshold, self.latency_weight = threshold, latency_weight
        self.explore_every, self.decay = explore_every, decay
        self.priors = priors or {EAGLE: (2.0, 1.0), DFLASH: (3.0, 0.5)}  # (confident, uncertain)
        self.reset()

    def reset(self) -> None:
        """Forget what was learnt: called at the start of every generate()."""
        self.accepted = {(r, regime): self.priors[r][regime] for r in ROUTES for regime in (0, 1)}
        self.idle = {(r, regime): 0 for r in ROUTES for regime in (0, 1)}

    def regime(self, features: RoundFeatures) -> int:
        return int(features.entropy >= self.threshold)

    def choose(self, features: RoundFeatures, routes: tuple[str, ...]) -> str:
        if len(routes) == 1:
            return routes[0]
        regime = self.regime(features)
        stale = [r for r in routes if self.idle[r, regime] >= self.explore_every]
        if stale:
            return stale[0]
        return max(routes, key=lambda r: self._score(r, regime, features))

    def _score(self, route: str, regime: int, features: RoundFeatures) -> float:
        seconds = features.seconds_ema.get(route)
        cost = seconds ** self.latency_weight if seconds else 1.0
        return (1.0 + self.accepted[route, regime]) / cost

    def observe(self, features: RoundFeatures, route: str, accepted: int, seconds: float) -> None:
        regime = self.regime(features)
        key = (route, regime)
        self.accepted[key] += (1 - self.decay) * (accepted - self.accepted[key])
        for other in ROUTES:
            self.idle[other, regime] = 0 if other == route else self.idle[other, regime] + 1

    def to_dict(self) -> dict:
        return {"type": "entropy", "threshold": self.threshold, "latency_weight": self.latency_weight,
                "explore_every": self.explore_every, "decay": self.decay,
                "priors": {r: list(p) for r, p in self.priors.items()}}


def entropy_and_top1(logits) -> tuple[float, float]:
    """Entropy (nats) and top-1 probability of logits [V] (-inf entries allowed)."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum()
    return float(entropy), float(p.max())


def ema(previous: float | None, value: float, decay: float = 0.5) -> float:
    return value if previous is None else decay * previous + (1 - decay) * value
