"""Routing: which drafter drafts the next round, decided from information available before drafting.

`RoundFeatures` is what the candidate generator knows when a round starts (cheap to compute: one
softmax over the target's logits at the last verified position, running averages, and what the lookup
drafter's index offers: its match length and proposal). A policy is a
`Policy`: `choose(features, lengths) -> route`, where `lengths` maps each route it may pick to the
number of tokens that route would draft this round (the assistant's draft lengths, cut to the length
budget), and optionally `observe(...)` to learn from the outcome of the round it chose.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, read_config, read_weights, write_folder
from .latency import LatencyModel
from .names import DFLASH, EAGLE, LOOKUP, POLICY_FOLDER, ROUTES
from .settings import Rule, check, integer, number


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
    lookup_match: int = 0  # length of the suffix the lookup drafter matched this round (0: no lookup this round)
    lookup_drafts: int = 0  # tokens it proposes after the match (its round's draft length)
    lookup_corpus: bool = False  # the match is in its corpus of earlier outputs, not in this text
    lookup_expected: float = 0.0  # its proposal's expected accepted drafts by lookup's profile (0: none)


class Policy:
    """Picks the drafter of each round. Subclasses implement `choose`; policies that learn within a
    generation also implement `observe` and `for_generation`."""

    def for_generation(self) -> "Policy":
        """The policy one generate() call routes with. Policies that learn within a generation return a fresh
        copy, so every generation starts from the same state and concurrent ones never share any."""
        return self

    def choose(self, features: RoundFeatures, lengths: dict[str, int]) -> str:
        """The route of the next round: one of `lengths` (route -> tokens it would draft this round; for a chain
        cut per round by confidence, its fixed calibrated length)."""
        raise NotImplementedError

    def observe(self, features: RoundFeatures, route: str, accepted: int, seconds: float) -> None:
        """The outcome of a round this policy chose."""

    def to_dict(self) -> dict:
        """The settings whiflash_config.json stores for this policy."""
        raise NotImplementedError

    # Policies that score routes with modelled round costs set this and take the assistant's costs, measured
    # on the machine it runs on, through use_costs.
    needs_costs = False

    def use_costs(self, latency: LatencyModel) -> None:
        """Score rounds with `latency` (this machine's calibrated round costs)."""


class EntropyPolicy(Policy):
    """Pick the route with the best expected tokens per unit of round cost, per regime.

    For the neural drafters the regime is the target's entropy at the last verified position: a
    confident regime (entropy < `threshold`: structured text such as code, JSON or tool calls, where a
    parallel DFlash block tends to be accepted far) and an uncertain one (open-ended text, where the
    autoregressive EAGLE-3 chain holds up better). For lookup it is the length of this round's match
    in the text (1, 2, 3, 4 or more tokens: the longer the repeated suffix, the further its continuation
    holds), or a fifth regime for a match in its corpus of earlier outputs.
    Per route and regime the policy keeps a running estimate of the accepted drafted tokens (starting
    from those priors) and scores

        score(route) = (1 + min(accepted(route, regime), drafts)) / round_seconds(route) ** latency_weight

    `latency_weight` = 0 maximises tokens per round, 1 maximises tokens per second. An idle route
    is tried once again, because acceptance swings within a sequence and estimates of an idle route
    go stale: after `explore_every` rounds of its regime, times how far its score trails the best
    (once both routes' round times are known). A route scoring a quarter of the best waits four
    times as long, so a clearly worse drafter costs little, and a close one is checked often.
    Lookup is offered only in rounds where it matched, so it needs no exploring.
    """

    # What each setting allows: the constructor and whiflash_config.json's "policy" are checked with these.
    rules = {"threshold": number(0), "latency_weight": number(0), "explore_every": integer(1), "decay": number(0, 1),
             "priors": Rule("an object {route: [accepted drafts per regime, >= 0]} over the routes "
                            f"{list(ROUTES)} (regimes: confident, uncertain; lookup: match length 1, 2, 3, 4+ in "
                            "the text, then a corpus match), or null (the defaults); a route left out, or a "
                            "lookup list without the corpus regime, keeps its defaults",
                            lambda v: v is None or _priors(v))}

    # Defaults measured by recipes/tune_entropy.py (results/entropy_tuning.json) for the shipped SmolLM2 drafters:
    # the best of the settings replayed on the dev set; priors are the mean accepted drafts per regime there.
    # Priors: (confident, uncertain) for the neural drafters; by match length (1, 2, 3, 4+) for lookup, its expected
    # accepted drafts on the dev set at 8 drafts (lookup/acceptance.json, greedy; a 1-token match, possible only with
    # min_match=1, gets the 2-token value), then its corpus matches' (the shipped corpus: 1523 of the dev set's 4874
    # round starts at 64 new tokens, 1.49 accepted drafts of up to 8, hindsight.lookup_proposals).
    PRIORS = {EAGLE: (0.72, 0.62), DFLASH: (0.31, 0.27), LOOKUP: (1.39, 1.39, 1.88, 3.56, 1.49)}
    MATCH_REGIMES = 4  # lookup's regimes by match length in the text; the one after them is the corpus's

    def __init__(self, threshold: float = 1.5, latency_weight: float = 1.0, explore_every: int = 32,
                 decay: float = 0.5, priors: dict | None = None):
        check({"threshold": threshold, "latency_weight": latency_weight, "explore_every": explore_every,
               "decay": decay, "priors": priors}, self.rules, "EntropyPolicy")
        self.threshold, self.latency_weight = threshold, latency_weight
        self.explore_every, self.decay = explore_every, decay
        # Settings saved before lookup (or its corpus) existed keep the defaults of what they lack.
        self.priors = self.PRIORS | {r: (*p, *self.PRIORS[r][len(p):]) for r, p in (priors or {}).items()}
        self.accepted = {(r, regime): value for r, values in self.priors.items() for regime, value in enumerate(values)}
        self.idle = {key: 0 for key in self.accepted}

    def for_generation(self) -> "EntropyPolicy":
        return EntropyPolicy(self.threshold, self.latency_weight, self.explore_every, self.decay, self.priors)

    def regime(self, route: str, features: RoundFeatures) -> int:
        if route == LOOKUP:
            return self.MATCH_REGIMES if features.lookup_corpus else min(max(features.lookup_match, 1),
                                                                         self.MATCH_REGIMES) - 1
        return int(features.entropy >= self.threshold)

    def choose(self, features: RoundFeatures, lengths: dict[str, int]) -> str:
        routes = tuple(lengths)
        if len(routes) == 1:
            return routes[0]
        scores = {r: self._score(r, lengths[r], features) for r in routes}
        best = max(scores, key=scores.get)
        # How far a route trails counts only once every route's round time is known; lookup is offered only where it
        # matched, so it is never explored.
        timed = all(r in features.seconds_ema for r in routes)
        for route in routes:
            if route == LOOKUP:
                continue
            gap = scores[best] / scores[route] if timed else 1.0  # scores > 0: accepted >= 0
            if self.idle[route, self.regime(route, features)] >= self.explore_every * gap:
                return route
        return best

    def _score(self, route: str, drafts: int, features: RoundFeatures) -> float:
        timed = features.seconds_ema
        # A route not timed yet is taken to cost what the timed ones do: lookup, never explored, must not look slow.
        seconds = timed.get(route) or (sum(timed.values()) / len(timed) if timed else None)
        cost = seconds ** self.latency_weight if seconds else 1.0
        return (1.0 + min(self.accepted[route, self.regime(route, features)], drafts)) / cost

    def observe(self, features: RoundFeatures, route: str, accepted: int, seconds: float) -> None:
        key = (route, self.regime(route, features))
        self.accepted[key] += (1 - self.decay) * (accepted - self.accepted[key])
        for other in self.priors:
            if other != LOOKUP:
                idle = (other, self.regime(other, features))
                self.idle[idle] = 0 if other == route else self.idle[idle] + 1

    def to_dict(self) -> dict:
        return {"type": "entropy", "threshold": self.threshold, "latency_weight": self.latency_weight,
                "explore_every": self.explore_every, "decay": self.decay,
                "priors": {r: list(p) for r, p in self.priors.items()}}


def _priors(value) -> bool:
    return isinstance(value, dict) and set(value) <= set(ROUTES) and all(
        isinstance(p, (list, tuple)) and len(p) >= 2 and all(number(0).accepts(x) for x in p) for p in value.values())


class RoutingState:
    """Running statistics of one generation that routing features are made of. The candidate generator
    and the router recipe's trajectory simulator both use it, so features are computed the same way."""

    def __init__(self, routes: tuple[str, ...]):
        self.routes = routes
        self.accepted_ema: dict[str, float] = {}
        self.seconds_ema: dict[str, float] = {}
        self.rounds_since = {route: 0 for route in routes}
        self.last_route: str | None = None
        self.last_accepted = 0

    def features(self, entropy: float, top1: float, position: int, lookup_match: int = 0,
                 lookup_drafts: int = 0, lookup_corpus: bool = False, lookup_expected: float = 0.0) -> RoundFeatures:
        return RoundFeatures(entropy=entropy, top1_prob=top1, position=position, last_route=self.last_route,
                             last_accepted=self.last_accepted, accepted_ema=dict(self.accepted_ema),
                             seconds_ema=dict(self.seconds_ema), rounds_since=dict(self.rounds_since),
                             lookup_match=lookup_match, lookup_drafts=lookup_drafts, lookup_corpus=lookup_corpus,
                             lookup_expected=lookup_expected)

    def record(self, route: str, accepted: int, seconds: float) -> None:
        self.last_route, self.last_accepted = route, accepted
        if route not in self.routes:  # a round without drafts
            return
        self.accepted_ema[route] = ema(self.accepted_ema.get(route), accepted)
        self.seconds_ema[route] = ema(self.seconds_ema.get(route), seconds)
        for other in self.routes:
            self.rounds_since[other] = 0 if other == route else self.rounds_since[other] + 1


def offered(lengths: dict[str, int], proposal_length: int) -> dict[str, int]:
    """The routes a round may take and their draft lengths: lookup only where its index proposed something, at most
    as many tokens as it proposed (the generator and the simulated rounds of the recipes both offer routes so)."""
    if LOOKUP not in lengths:
        return lengths
    drafts = min(lengths[LOOKUP], proposal_length)
    return {route: drafts if route == LOOKUP else k for route, k in lengths.items() if route != LOOKUP or drafts}


def entropy_and_top1(logits) -> tuple[float, float]:
    """Entropy (nats) and top-1 probability of logits [V] (-inf entries allowed)."""
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum()
    return float(entropy), float(p.max())


def ema(previous: float | None, value: float, decay: float = 0.5) -> float:
    return value if previous is None else decay * previous + (1 - decay) * value


FEATURE_NAMES = ("entropy", "top1_prob", "last_accepted", "log_position", "lookup_match", "lookup_drafts",
                 "lookup_corpus", "lookup_expected",
                 *(f"{route}_{what}" for route in ROUTES for what in ("ema", "seen", "last", "idle")))


def feature_vector(f: RoundFeatures) -> list[float]:
    """RoundFeatures -> the NeuralPolicy's inputs (FEATURE_NAMES), each roughly in [0, 1]."""
    per_route = [value for route in ROUTES for value in (
        min(f.accepted_ema.get(route, 0.0), 16) / 16,  # its recent record
        float(route in f.accepted_ema),  # whether it has drafted at all in this generation
        float(f.last_route == route),
        min(f.rounds_since.get(route, 0), 16) / 16)]
    return [
        min(f.entropy, 8.0) / 8.0 if f.entropy == f.entropy else 0.5,  # NaN before the first round
        f.top1_prob if f.top1_prob == f.top1_prob else 0.5,
        min(f.last_accepted, 16) / 16,
        min(1.0, math.log1p(f.position) / math.log(4096)),
        min(f.lookup_match, 8) / 8,
        min(f.lookup_drafts, 16) / 16,
        float(f.lookup_corpus),
        min(f.lookup_expected, 8) / 8,
        *per_route,
    ]


class NeuralPolicy(Policy, nn.Module):
    """A small MLP that predicts, from RoundFeatures, how many drafts each paradigm would get accepted;
    the route with the most expected tokens per (modelled) round second ** latency_weight wins, for the
    draft lengths the assistant drafts with.

    Saved as a folder: config.json (sizes, latency table, latency_weight) and model.safetensors.
    Trained by recipes/train_router.py on hindsight labels.
    """

    needs_costs = True
    rules = {"hidden": integer(1), "latency_weight": number(0)}  # the constructor's and config.json's

    def __init__(self, latency: dict, hidden: int = 32, latency_weight: float = 1.0):
        check({"hidden": hidden, "latency_weight": latency_weight}, self.rules, "NeuralPolicy")
        super().__init__()
        self.latency = LatencyModel.from_dict(latency)  # until use_costs: the training machine's
        self.hidden, self.latency_weight = hidden, latency_weight
        self.net = nn.Sequential(nn.Linear(len(FEATURE_NAMES), hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, len(ROUTES)))

    def use_costs(self, latency: LatencyModel) -> None:
        self.latency = latency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, features] -> expected accepted drafts [N, routes] (ROUTES order), non-negative."""
        return nn.functional.softplus(self.net(x))

    @torch.no_grad()
    def choose(self, features: RoundFeatures, lengths: dict[str, int]) -> str:
        if len(lengths) == 1:
            return next(iter(lengths))
        accepted = self(torch.tensor([feature_vector(features)]))[0].tolist()
        score = {r: (1 + min(accepted[ROUTES.index(r)], k))  # a draft of k tokens gets at most k accepted
                 / self.latency.round_seconds(r, k) ** self.latency_weight for r, k in lengths.items()}
        return max(score, key=score.get)

    def fit(self, features: torch.Tensor, accepted: torch.Tensor, epochs: int = 200, lr: float = 3e-3,
            batch_size: int = 256, seed: int = 0) -> float:
        """Regress accepted drafts [N, routes] from feature vectors [N, features] (MSE); returns the final loss."""
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(features), generator=generator).split(batch_size):
                loss = nn.functional.mse_loss(self(features[batch]), accepted[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.eval()
        with torch.no_grad():
            return float(nn.functional.mse_loss(self(features), accepted))

    def to_dict(self) -> dict:
        return {"type": "neural", "folder": POLICY_FOLDER}

    def save_pretrained(self, folder) -> Path:
        """config.json and model.safetensors, each written atomically with the umask's file modes."""
        config = {"features": list(FEATURE_NAMES), "routes": list(ROUTES), "hidden": self.hidden,
                  "latency_weight": self.latency_weight, "latency": self.latency.to_dict()}
        return write_folder(Path(folder), config, self.state_dict(), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, folder, **overrides) -> "NeuralPolicy":
        """Errors name the file: an unreadable config.json or model.safetensors, or a missing or invalid setting."""
        folder = Path(folder)
        config = read_config(folder)
        where = str(folder / "config.json")
        if config.get("features") != list(FEATURE_NAMES):
            raise CheckpointError(f"{where} was trained on features {config.get('features')}, this version "
                                  f"computes {list(FEATURE_NAMES)}: retrain it with recipes/train_router.py")
        sizes = check({key: config.get(key) for key in cls.rules}, cls.rules, where)
        try:
            policy = cls(config["latency"], **sizes | overrides)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{where}: latency is not a round-cost table ({error!r}); retrain the router with "
                                  "recipes/train_router.py") from None
        state, files = read_weights(folder)
        try:
            policy.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{files[0]}: the weights do not match {where} ({error})") from None
        return policy.eval()


class OracleRouter(Policy):
    """For measurement only: routes with hindsight, knowing how many drafts each paradigm would get
    accepted at every round start of one prompt (hindsight.acceptance_tables on the target's own greedy
    output, drafted with at least the lengths routed with)."""

    def __init__(self, tables: dict[str, torch.Tensor], latency: LatencyModel):
        self.tables, self.latency = tables, latency

    def choose(self, features: RoundFeatures, lengths: dict[str, int]) -> str:
        m = features.position - 1  # round start relative to the first round (the prefill made one token)

        def tokens_per_second(route):
            table, k = self.tables[route], lengths[route]
            accepted = min(int(table[m]), k) if m < len(table) else 0
            return (1 + accepted) / self.latency.round_seconds(route, k)

        return max(lengths, key=tokens_per_second)

    def to_dict(self) -> dict:
        return {"type": "oracle"}
