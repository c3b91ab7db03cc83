"""Lookup drafter (prompt lookup / suffix decoding): no weights, no target features.

It proposes what followed the most recent earlier occurrence of the text's longest suffix of
`min_match`..`max_match` tokens, searched in the prompt and the tokens verified so far: code that
repeats an identifier, a tool call that copies an argument from the prompt, a list that repeats its
pattern. Drafting costs a few dictionary lookups, so it pays in any round where a match exists, which is
what the router reads before drafting (`LookupIndex.propose`: the match length and the proposal).

Its per-generation state, a `LookupIndex`, takes verified tokens through the same `enqueue` as the neural
drafters' LazyCatchUpCache and indexes them at once (a few n-grams per new token: no rescans), so
`catch_up` has nothing left to do. A lookup draft has no distribution: under sampling it is a one-hot draft
(probability 1 on the proposed token), which speculative rejection sampling verifies exactly
(accepted with the target's probability of that token, else resampled from the target's distribution
with that token removed).

Folder (inside a WhiFlash folder, `lookup/`): config.json with the settings below and, optionally,
acceptance.json: expected tokens per round by draft cap (`tokens_per_round`, as the neural drafters'
profiles, for the "does it pay here" decision) and, per match length, the chance that draft j is accepted
when the drafts before it were (`acceptance_by_match`, for cutting each round's proposal and for the router).
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_json_object, write_text_atomically
from ..names import ACCEPTANCE_FILE, GREEDY, SAMPLED
from ..settings import SettingsError, check, integer

CONFIG_FILE = "config.json"


@dataclass
class Proposal:
    tokens: list[int]  # what followed the match, at most max_drafts
    match: int  # length of the matched suffix (0: no match, no tokens)


class LookupIndex:
    """One generation's verified tokens and, for every n-gram of min_match..max_match tokens, the position just
    after its most recent occurrence that has a token after it."""

    def __init__(self, min_match: int, max_match: int):
        self.min_match, self.max_match = min_match, max_match
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it

    def enqueue(self, ids: torch.Tensor, features=None) -> None:
        """Index newly verified tokens ids [1, t]. An n-gram is indexed once a token follows it, so the newest
        suffix never matches itself. (The neural drafters' queue starts at position 1, paired with position 0's
        features; the index misses only position 0, the chat template's start token.)"""
        old = len(self.tokens)
        self.tokens += ids[0].tolist()
        for end in range(max(old - 1, 0), len(self.tokens) - 1):  # n-grams ending at `end` now have a follower
            for n in range(self.min_match, min(self.max_match, end + 1) + 1):
                self.after[tuple(self.tokens[end + 1 - n:end + 1])] = end + 1

    def propose(self, max_drafts: int) -> Proposal:
        """The continuation of the longest suffix that occurred before (most recent occurrence first)."""
        for n in range(min(self.max_match, len(self.tokens)), self.min_match - 1, -1):
            start = self.after.get(tuple(self.tokens[-n:]))
            if start is not None:
                return Proposal(self.tokens[start:start + max_drafts], n)
        return Proposal([], 0)

    def snapshot(self):
        """What a draft changes, for the calibration's reset: nothing (drafts never enter the index)."""

    def restore(self, snapshot) -> None:
        pass


class LookupDrafter:
    """The lookup route: `catch_up` / `draft` like the neural drafters, over a LookupIndex as its cache."""

    feature_layers: list[int] = []  # reads no target hidden states
    acceptance_by_confidence = None  # its cut reads acceptance_by_match instead
    rules = {"min_match": integer(1), "max_match": integer(1), "max_drafts": integer(1)}  # config.json's too

    def __init__(self, min_match: int = 2, max_match: int = 4, max_drafts: int = 8,
                 tokens_per_round: dict[str, dict[int, float]] | None = None,
                 acceptance_by_match: dict[str, dict[int, list[float]]] | None = None, *, source: str = "LookupDrafter"):
        check({"min_match": min_match, "max_match": max_match, "max_drafts": max_drafts}, self.rules, source)
        if max_match < min_match:
            raise SettingsError(f"{source}: max_match ({max_match}) must be >= min_match ({min_match})")
        self.min_match, self.max_match, self.max_drafts = min_match, max_match, max_drafts
        self.tokens_per_round = tokens_per_round  # mode -> draft cap -> expected tokens per round, or None
        self.acceptance_by_match = acceptance_by_match  # mode -> match length -> [chance of draft j | j-1 accepted]
        self.vocab_size, self.device = None, torch.device("cpu")

    def attach(self, target) -> "LookupDrafter":
        """A copy that drafts ids on the target's device and one-hot rows as wide as its logits (a copy: the same
        settings may serve assistants of other targets)."""
        bound = copy.copy(self)
        bound.vocab_size, bound.device = target.get_output_embeddings().weight.shape[0], target.device
        return bound

    def settings(self) -> dict:
        return {"min_match": self.min_match, "max_match": self.max_match, "max_drafts": self.max_drafts}

    # --- the inference protocol (the candidate generator and LatencyModel) ---------------------------

    def new_cache(self) -> LookupIndex:
        return LookupIndex(self.min_match, self.max_match)

    def features(self, hidden_states, length: int | None = None) -> None:
        return None

    def catch_up(self, cache: LookupIndex) -> int:
        return 0  # enqueue indexed the verified tokens already: the router needs the match before drafting

    def propose(self, cache: LookupIndex) -> Proposal:
        return cache.propose(self.max_drafts)

    def chances(self, mode: str, proposal: Proposal) -> list[float] | None:
        """Per draft of `proposal`: the profiled chance it is accepted when the drafts before it were."""
        if not self.acceptance_by_match or not proposal.match:
            return None
        by_match = self.acceptance_by_match[mode]
        nearest = min(by_match, key=lambda n: abs(n - proposal.match))  # longer matches share the longest's
        return by_match[nearest][:len(proposal.tokens)]

    def draft(self, cache: LookupIndex, length: int, pick=None, cut=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to `length` tokens of the proposal -> draft ids [1, n] and, with `pick` (sampling or logits
        processors), one-hot rows [1, n, V] (0 at the drafted token, -inf elsewhere) for the verifier. With a
        `cut` (calibration.DraftCut) only the prefix the profiled chances say is worth verifying."""
        proposal = self.propose(cache)
        proposal.tokens = proposal.tokens[:length]
        chances = self.chances(cut.mode, proposal) if cut is not None else None
        keep = cut.keep(chances) if chances else len(proposal.tokens)
        ids = torch.tensor([proposal.tokens[:keep]], dtype=torch.long, device=self.device)  # [1, n]
        if pick is None:
            return ids, None
        rows = torch.full((1, ids.shape[1], self.vocab_size), float("-inf"), device=self.device)
        return ids, rows.scatter_(-1, ids[..., None], 0.0)

    # --- persistence: lookup/ inside a WhiFlash folder -------------------------------------------------

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / CONFIG_FILE, json.dumps(self.settings(), indent=2) + "\n")
        if self.tokens_per_round is not None:
            profile = {"tokens_per_round": self.tokens_per_round, "acceptance_by_match": self.acceptance_by_match}
            write_text_atomically(folder / ACCEPTANCE_FILE, json.dumps(profile, indent=1) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder) -> "LookupDrafter":
        folder = Path(folder)
        settings = check(read_json_object(folder / CONFIG_FILE), cls.rules, str(folder / CONFIG_FILE))
        profile = read_json_object(folder / ACCEPTANCE_FILE) if (folder / ACCEPTANCE_FILE).is_file() else {}
        try:
            tokens = {mode: {int(k): float(v) for k, v in profile["tokens_per_round"][mode].items()}
                      for mode in (GREEDY, SAMPLED)} if profile else None
            by_match = {mode: {int(n): [float(c) for c in chances]
                               for n, chances in profile["acceptance_by_match"][mode].items()}
                        for mode in (GREEDY, SAMPLED)} if profile else None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SettingsError(f"{folder / ACCEPTANCE_FILE} is not a lookup acceptance profile ({error!r}): expected "
                             '{"tokens_per_round": {"greedy": {"<cap>": <tokens>, ...}, "sampling": {...}}, '
                             '"acceptance_by_match": {"greedy": {"<match length>": [<chance>, ...]}, '
                             '"sampling": {...}}}') from None
        return cls(**settings, tokens_per_round=tokens, acceptance_by_match=by_match, source=str(folder / CONFIG_FILE))
