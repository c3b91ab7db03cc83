"""Lookup drafter (prompt lookup / suffix decoding): no weights, no target features.

It proposes what followed the most recent earlier occurrence of the text's longest suffix of
`min_match`..`max_match` tokens, searched in the prompt and the tokens verified so far: code that
repeats an identifier, a tool call that copies an argument from the prompt, a list that repeats its
pattern. Where the text has no such match, a `Corpus` of what the target wrote before (its own responses to
the drafters' training prompts, `corpus.safetensors`) proposes the most frequent continuation of the text's
longest suffix of `corpus_min_match`..`corpus_max_match` tokens found there at least twice: the target's
habits (how it opens a code block, formats a tool call, phrases a step), which no single text repeats.
Drafting costs a few dictionary lookups and binary searches, so it pays in any round where a match exists,
which is what the router reads before drafting (`LookupDrafter.propose`: the match, its source and the proposal).

Its per-generation state, a `LookupIndex`, takes verified tokens through the same `enqueue` as the neural
drafters' LazyCatchUpCache and indexes them at once (a few n-grams per new token: no rescans), so
`catch_up` has nothing left to do. A lookup draft has no distribution: under sampling it is a one-hot draft
(probability 1 on the proposed token), which speculative rejection sampling verifies exactly
(accepted with the target's probability of that token, else resampled from the target's distribution
with that token removed).

Folder (inside a WhiFlash folder, `lookup/`): config.json with the settings below and, optionally,
acceptance.json: expected tokens per round by draft cap (`tokens_per_round`, as the neural drafters'
profiles, for the "does it pay here" decision), per match length the chance that draft j is accepted
when the drafts before it were (`acceptance_by_match`, for cutting each round's proposal and for the router),
and the same chance for a corpus draft by its share (`acceptance_by_share`: per bin of the share of the
corpus occurrences that continue with it); and corpus.safetensors ("tokens": int32 [N], documents separated
by -1), written by recipes/lookup_corpus.py.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
from safetensors import SafetensorError

from ..checkpoint import CheckpointError, read_json_object, replace_atomically, write_text_atomically
from ..names import ACCEPTANCE_FILE, CONFIDENCE_BINS, GREEDY, SAMPLED, read_bins
from ..settings import SettingsError, check, integer

CONFIG_FILE = "config.json"
CORPUS_FILE = "corpus.safetensors"
SEPARATOR = -1  # between a corpus's documents: equal to no token, so no match or continuation crosses it
MIN_OCCURRENCES = 2  # a corpus suffix or continuation seen once is a coincidence, not a habit


@dataclass
class Proposal:
    tokens: list[int]  # what followed the match, at most max_drafts
    match: int  # length of the matched suffix (0: no match, no tokens)
    shares: list[float] | None = None  # a corpus match: per draft, the share of its occurrences continuing so

    @property
    def from_corpus(self) -> bool:
        return self.shares is not None


class Corpus:
    """Token sequences the target wrote before, indexed for the most frequent continuation of a text's suffix.

    Every position is sorted by the tokens that end there, read backwards (that token, the one before it, ...,
    `max_match` of them), so the positions where any suffix of the text ends form one contiguous range, found by
    narrowing one token at a time with binary searches; the continuation is then counted over that range.
    """

    def __init__(self, tokens: np.ndarray, max_match: int = 8):
        # [max_match + N + 1]: separators before (no lookback runs off the start) and after (nor forward off the end)
        pad = np.full(max_match, SEPARATOR, dtype=np.int32)
        self.tokens = np.concatenate([pad, np.asarray(tokens, dtype=np.int32), pad[:1]])
        self.max_match = max_match
        # keys[k][i] = the token k places before i; lexsort's primary key is the last one: the token at i itself.
        keys = [np.concatenate([pad[:k], self.tokens[:len(self.tokens) - k]]) for k in reversed(range(max_match))]
        self.ends = np.lexsort(keys).astype(np.int32)  # [N'] positions in backwards-suffix order
        self.last = self.tokens[self.ends]  # [N'] the sorted first key: where the text's last token occurs

    def __len__(self) -> int:
        return len(self.tokens) - self.max_match - 1

    def propose(self, text: list[int], min_match: int, max_drafts: int) -> Proposal:
        """The most frequent continuation of the longest suffix of `text` (at least `min_match` tokens) that the
        corpus holds at least MIN_OCCURRENCES times, while each next token has that many occurrences too."""
        if not text:
            return Proposal([], 0)
        lo, hi = np.searchsorted(self.last, _bounds(text[-1]))
        match = 1
        while match < min(self.max_match, len(text)) and hi - lo >= MIN_OCCURRENCES:
            before = self.tokens[self.ends[lo:hi] - match]  # sorted within the range: the next key
            a, b = np.searchsorted(before, _bounds(text[-1 - match]))
            if b - a < MIN_OCCURRENCES:
                break
            lo, hi, match = lo + a, lo + b, match + 1
        if match < min_match or hi - lo < MIN_OCCURRENCES:
            return Proposal([], 0)
        follow = self.ends[lo:hi] + 1  # where each occurrence's continuation starts
        tokens, shares = [], []
        while len(tokens) < max_drafts:
            after = self.tokens[follow]
            values, counts = np.unique(after[after != SEPARATOR], return_counts=True)
            if not len(counts) or counts.max() < MIN_OCCURRENCES:
                break
            best = values[counts.argmax()]
            tokens.append(int(best))
            shares.append(float(counts.max() / len(follow)))
            follow = follow[after == best] + 1
        return Proposal(tokens, match, shares) if tokens else Proposal([], 0)

    @classmethod
    def from_documents(cls, documents, max_match: int = 8) -> "Corpus":
        """Token id lists (the target's responses) -> a Corpus."""
        tokens = [t for document in documents for t in (*document, SEPARATOR)]
        return cls(np.array(tokens, dtype=np.int32), max_match)

    def save(self, path: Path) -> None:
        tokens = self.tokens[self.max_match:-1]
        replace_atomically(Path(path), lambda tmp: safetensors.numpy.save_file({"tokens": tokens}, str(tmp)))

    @classmethod
    def load(cls, path: Path, max_match: int) -> "Corpus":
        try:
            tokens = safetensors.numpy.load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            raise CheckpointError(f"{path} is not a lookup corpus ({error!r}): expected a safetensors file with "
                                  '"tokens" (int32 [N], documents separated by -1); write one with '
                                  "recipes/lookup_corpus.py") from None
        if tokens.dtype != np.int32 or tokens.ndim != 1:
            raise CheckpointError(f"{path}: \"tokens\" must be int32 [N], got {tokens.dtype} {list(tokens.shape)}")
        return cls(tokens, max_match)


class LookupIndex:
    """One generation's verified tokens and, for every n-gram of min_match..max_match tokens, the position just
    after its most recent occurrence that has a token after it."""

    def __init__(self, min_match: int, max_match: int):
        self.min_match, self.max_match = min_match, max_match
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it
        self.proposed: tuple[int, Proposal] | None = None  # (len(tokens) when made, LookupDrafter's proposal)

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


def _bounds(token: int) -> np.ndarray:
    """[token, token + 1] in the corpus's dtype (a search with other dtypes converts the whole sorted array)."""
    return np.array([token, token + 1], dtype=np.int32)


class LookupDrafter:
    """The lookup route: `catch_up` / `draft` like the neural drafters, over a LookupIndex as its cache, and
    optionally a Corpus, shared read-only by every generation, for the rounds where the text has no match."""

    feature_layers: list[int] = []  # reads no target hidden states
    acceptance_by_confidence = None  # its cut reads acceptance_by_match / acceptance_by_share instead
    rules = {"min_match": integer(1), "max_match": integer(1), "max_drafts": integer(1),  # config.json's too
             "corpus_min_match": integer(1), "corpus_max_match": integer(1)}

    def __init__(self, min_match: int = 2, max_match: int = 4, max_drafts: int = 8,
                 tokens_per_round: dict[str, dict[int, float]] | None = None,
                 acceptance_by_match: dict[str, dict[int, list[float]]] | None = None, *,
                 corpus: Corpus | None = None, corpus_min_match: int = 3, corpus_max_match: int = 8,
                 acceptance_by_share: dict[str, list[float]] | None = None, source: str = "LookupDrafter"):
        check({"min_match": min_match, "max_match": max_match, "max_drafts": max_drafts,
               "corpus_min_match": corpus_min_match, "corpus_max_match": corpus_max_match}, self.rules, source)
        if max_match < min_match:
            raise SettingsError(f"{source}: max_match ({max_match}) must be >= min_match ({min_match})")
        if corpus_max_match < corpus_min_match:
            raise SettingsError(f"{source}: corpus_max_match ({corpus_max_match}) must be >= corpus_min_match "
                                f"({corpus_min_match})")
        if corpus is not None and corpus.max_match != corpus_max_match:
            raise SettingsError(f"{source}: the corpus is indexed for matches of up to {corpus.max_match} tokens, "
                                f"corpus_max_match is {corpus_max_match}: build it with Corpus(tokens, "
                                f"max_match={corpus_max_match})")
        self.min_match, self.max_match, self.max_drafts = min_match, max_match, max_drafts
        self.corpus, self.corpus_min_match, self.corpus_max_match = corpus, corpus_min_match, corpus_max_match
        self.tokens_per_round = tokens_per_round  # mode -> draft cap -> expected tokens per round, or None
        self.acceptance_by_match = acceptance_by_match  # mode -> match length -> [chance of draft j | j-1 accepted]
        self.acceptance_by_share = acceptance_by_share  # mode -> [chance of a corpus draft per bin of its share]
        self.vocab_size, self.device = None, torch.device("cpu")

    def attach(self, target) -> "LookupDrafter":
        """A copy that drafts ids on the target's device and one-hot rows as wide as its logits (a copy: the same
        settings may serve assistants of other targets)."""
        bound = copy.copy(self)
        bound.vocab_size, bound.device = target.get_output_embeddings().weight.shape[0], target.device
        return bound

    def settings(self) -> dict:
        return {"min_match": self.min_match, "max_match": self.max_match, "max_drafts": self.max_drafts,
                "corpus_min_match": self.corpus_min_match, "corpus_max_match": self.corpus_max_match}

    # --- the inference protocol (the candidate generator and LatencyModel) ---------------------------

    def new_cache(self) -> LookupIndex:
        return LookupIndex(self.min_match, self.max_match)

    def features(self, hidden_states, length: int | None = None) -> None:
        return None

    def catch_up(self, cache: LookupIndex) -> int:
        return 0  # enqueue indexed the verified tokens already: the router needs the match before drafting

    def propose(self, cache: LookupIndex) -> Proposal:
        """This round's proposal: the text's own match first (it accepts more), else the corpus's. Kept on the
        cache until the text grows, so routing and drafting search once a round."""
        if cache.proposed is not None and cache.proposed[0] == len(cache.tokens):
            return cache.proposed[1]
        proposal = cache.propose(self.max_drafts)
        if not proposal.tokens and self.corpus is not None:
            proposal = self.corpus.propose(cache.tokens[-self.corpus_max_match:], self.corpus_min_match,
                                           self.max_drafts)
        cache.proposed = (len(cache.tokens), proposal)
        return proposal

    def chances(self, mode: str, proposal: Proposal) -> list[float] | None:
        """Per draft of `proposal`: the profiled chance it is accepted when the drafts before it were (a corpus
        draft without a profile: its share)."""
        if proposal.from_corpus:
            if not self.acceptance_by_share:
                return proposal.shares
            return read_bins(self.acceptance_by_share[mode], proposal.shares)
        if not self.acceptance_by_match or not proposal.match:
            return None
        by_match = self.acceptance_by_match[mode]
        nearest = min(by_match, key=lambda n: abs(n - proposal.match))  # longer matches share the longest's
        return by_match[nearest][:len(proposal.tokens)]

    def expected(self, mode: str, proposal: Proposal, drafts: int | None = None) -> float:
        """The expected accepted drafts of the proposal's first `drafts` (all: None) by their profiled chances (a
        round feature; 0 without a profile)."""
        chances, reach, total = (self.chances(mode, proposal) or [])[:drafts], 1.0, 0.0
        for chance in chances:
            reach *= chance
            total += reach
        return total

    def draft(self, cache: LookupIndex, length: int, pick=None, cut=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to `length` tokens of the proposal -> draft ids [1, n] and, with `pick` (sampling or logits
        processors), one-hot rows [1, n, V] (0 at the drafted token, -inf elsewhere) for the verifier. With a
        `cut` (calibration.DraftCut) only the prefix the profiled chances say is worth verifying."""
        proposal = self.propose(cache)
        tokens = proposal.tokens[:length]
        chances = self.chances(cut.mode, proposal) if cut is not None else None
        keep = cut.keep(chances[:len(tokens)]) if chances else len(tokens)
        ids = torch.tensor([tokens[:keep]], dtype=torch.long, device=self.device)  # [1, n]
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
            if self.acceptance_by_share is not None:
                profile["acceptance_by_share"] = self.acceptance_by_share
            write_text_atomically(folder / ACCEPTANCE_FILE, json.dumps(profile, indent=1) + "\n")
        if self.corpus is not None:
            self.corpus.save(folder / CORPUS_FILE)
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
            by_share = {mode: [float(c) for c in profile["acceptance_by_share"][mode]]
                        for mode in (GREEDY, SAMPLED)} if "acceptance_by_share" in profile else None
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SettingsError(f"{folder / ACCEPTANCE_FILE} is not a lookup acceptance profile ({error!r}): expected "
                             '{"tokens_per_round": {"greedy": {"<cap>": <tokens>, ...}, "sampling": {...}}, '
                             '"acceptance_by_match": {"greedy": {"<match length>": [<chance>, ...]}, '
                             '"sampling": {...}}, optionally "acceptance_by_share": {"greedy": [<chance per '
                             f'share bin>, ... {CONFIDENCE_BINS}], "sampling": [...]}}}}') from None
        max_match = settings.get("corpus_max_match", 8)
        corpus = Corpus.load(folder / CORPUS_FILE, max_match) if (folder / CORPUS_FILE).is_file() else None
        return cls(**settings, tokens_per_round=tokens, acceptance_by_match=by_match, corpus=corpus,
                   acceptance_by_share=by_share, source=str(folder / CONFIG_FILE))
