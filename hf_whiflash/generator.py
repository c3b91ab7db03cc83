"""One generate() call's drafting: transformers calls `get_candidates` and `update_candidate_strategy` alternately.

A round, top to bottom in `get_candidates`: queue the newly verified tokens and target features in every
drafter's cache (lookup indexes the tokens at once) -> the policy picks a route, knowing what lookup's index
offers -> that drafter catches up (one K/V-only pass for a neural drafter) and drafts ->
the draft is cut to what fits before max_length and before any stop string -> transformers verifies the
candidates (exact match, or speculative rejection sampling with the draft logits) -> `update_candidate_strategy`
records the outcome.
The generator never looks inside a drafter: all follow the same catch_up / draft protocol, and lookup also
answers `propose` before routing (its match and where it was found are round features, and it is offered only
where it matched).
"""

import torch
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.stopping_criteria import StopStringCriteria

from .calibration import DraftCut
from .names import DFLASH, GREEDY, LOOKUP, SAMPLED, TARGET
from .routing import RoutingState, entropy_and_top1, offered
from .sampling import draft_picker
from .stats import Clock, GenerationStats, Round


class WhiFlashCandidateGenerator(CandidateGenerator):
    """Per-call state: drafter caches, the policy's copy for this call, routing statistics and `stats`."""

    requires_model_outputs = True

    def __init__(self, assistant, stats: GenerationStats, generation_config, logits_processor, tokenizer=None):
        self.do_sample = bool(generation_config.do_sample)
        self.mode = mode = SAMPLED if self.do_sample else GREEDY  # sampling accepts less, pays more: own lengths
        # Drafters with a draft length of 0 never draft here (calibration found plain decoding faster).
        self.draft_lengths = {route: k for route, k in assistant.draft_lengths[mode].items() if k > 0}
        # What the policy weighs each route's round at: its fixed length (a chain cut per round costs what it drafts).
        self.scored_lengths = {route: assistant.fixed_lengths[mode][route] for route in self.draft_lengths}
        self.drafters = {route: assistant.drafters[route] for route in self.draft_lengths}
        self.caches = {route: drafter.new_cache() for route, drafter in self.drafters.items()}
        # Dynamic lengths: each round's draft length is cut by the drafter's confidence (draft_lengths: the cap).
        self.cuts = {route: DraftCut(assistant.latency, route, k, self.do_sample,
                                     (self.drafters[route].acceptance_by_confidence or {}).get(mode))
                     for route, k in self.draft_lengths.items() if route in assistant.dynamic_routes}
        self.eager = assistant.catch_up == "eager"  # baseline: every drafter absorbs every verified position
        self.policy = assistant.policy.for_generation()
        self.stats = stats
        # Capture only the layers the drafters read, unless the user asked for all hidden states anyway.
        layers = sorted({i for d in self.drafters.values() for i in d.feature_layers})
        self.model_kwargs_overrides = {"output_hidden_states": True if generation_config.output_hidden_states
                                       else layers or False}
        self.logits_processor = logits_processor
        self.vocab_size = assistant.target.get_output_embeddings().weight.shape[0]  # the verifier's logits width
        self.max_length = generation_config.max_length
        # transformers checks stop strings only at the end of each round; drafts that never complete one
        # make the round end exactly where plain generate() would stop.
        stop_strings = generation_config.stop_strings
        self.stop_strings = StopStringCriteria(tokenizer, stop_strings) if stop_strings and tokenizer else None
        self.clock = Clock(assistant.device)
        self.routing = RoutingState(tuple(self.drafters))
        self.num_verified = 0  # positions whose target features have been queued
        self.prompt_length = 0
        self.entropy, self.top1 = float("nan"), float("nan")  # of the newest verified token's distribution
        self.round: Round | None = None
        self.features = None  # the RoundFeatures the round in flight was routed on
        self.started = self.clock()

    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False, **kwargs):
        if input_ids.shape[0] != 1:
            raise ValueError("WhiFlash drafts for one sequence at a time (batch size 1), as transformers' "
                             "assisted generation does; call generate() once per prompt.")
        if is_first_iteration:  # no target features yet: the target prefills the prompt
            self.prompt_length = input_ids.shape[1]
            return input_ids, None
        round_ = Round(route=TARGET)
        with self.clock.adds_to(round_, "draft_s"):
            self._queue_verified(input_ids, model_outputs)
            fits = self.max_length - input_ids.shape[1] - 1  # candidates before max_length, besides the bonus token
            with self.clock.adds_to(round_, "route_s"):
                route, length = self._choose(input_ids.shape[1], fits)
            draft_ids, draft_logits = input_ids[:, :0], None
            if route != TARGET:
                drafter, cache = self.drafters[route], self.caches[route]
                with self.clock.adds_to(round_, "catch_up_s"):
                    round_.caught_up += drafter.catch_up(cache)
                pick = draft_picker(input_ids, self.logits_processor, self.do_sample, self.vocab_size)
                # Verified as far as it fits before max_length (a DFlash block is drafted whole: see _choose).
                draft_ids, draft_logits = _keep(*drafter.draft(cache, length, pick, self.cuts.get(route)), fits)
                draft_ids, draft_logits = self._cut_at_stop_strings(input_ids, draft_ids, draft_logits)
            if self.eager:
                with self.clock.adds_to(round_, "catch_up_s"):
                    round_.caught_up += sum(d.catch_up(self.caches[r]) for r, d in self.drafters.items() if r != route)
        round_.route, round_.drafted, round_.draft_ids = route, draft_ids.shape[1], draft_ids[0].tolist()
        self.round = self.stats.in_flight = round_
        self.verify_started = self.clock()
        return torch.cat([input_ids, draft_ids], dim=1), draft_logits if self.do_sample else None

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        now = self.clock()
        if self.draft_lengths:  # the distribution that produced the newest verified token: the router's entropy signal
            self.entropy, self.top1 = entropy_and_top1(scores[0, int(num_matches)])
        if self.round is None:  # the prompt prefill
            self.stats.prefill_s = now - self.started
            return
        record, self.round, self.stats.in_flight = self.round, None, None
        record.accepted, record.verify_s = int(num_matches), now - self.verify_started
        self.stats.rounds.append(record)
        self.routing.record(record.route, record.accepted, record.seconds)
        if record.route != TARGET:
            self.policy.observe(self.features, record.route, record.accepted, record.seconds)

    # --- the steps of a round -----------------------------------------------------------------------

    def _queue_verified(self, input_ids, model_outputs) -> None:
        """Queue the positions verified since the last round: the first `new` of the verify window."""
        if not self.drafters:  # no drafter drafts on this machine: nothing needs target features
            return
        new = input_ids.shape[1] - 1 - self.num_verified
        hidden_states = model_outputs.hidden_states  # None when only lookup drafts: it reads the tokens alone
        window = next(h for h in hidden_states if h is not None).shape[1] if hidden_states is not None else new
        if new > window:
            raise ValueError(
                f"WhiFlash needs the target's hidden states for every position, but the first forward covered "
                f"{window} of {new} prompt tokens: a pre-filled cache (past_key_values) is not supported."
            )
        # Token t+1 goes with the feature of position t (EAGLE-3 pairs); DFlash reads the features only.
        next_ids = input_ids[:, self.num_verified + 1: self.num_verified + 1 + new]
        for route, drafter in self.drafters.items():
            self.caches[route].enqueue(next_ids, drafter.features(hidden_states, new))
        self.num_verified += new

    def _choose(self, length_so_far: int, fits: int) -> tuple[str, int]:
        """The policy's route, weighing the candidates that fit before max_length (`fits`), and its draft length."""
        if fits <= 0 or not self.draft_lengths:
            return TARGET, 0
        lookup = self.drafters.get(LOOKUP)
        proposal = lookup.propose(self.caches[LOOKUP]) if lookup else None
        match, proposed = (proposal.match, len(proposal.tokens)) if proposal else (0, 0)
        lengths = offered({route: min(fits, k) for route, k in self.draft_lengths.items()}, proposed)
        scored = offered({route: min(fits, k) for route, k in self.scored_lengths.items()}, proposed)
        if not lengths:
            return TARGET, 0
        self.features = self.routing.features(
            self.entropy, self.top1, length_so_far - self.prompt_length, match, lengths.get(LOOKUP, 0),
            proposal is not None and proposal.from_corpus, lookup.expected(self.mode, proposal) if proposal else 0.0)
        route = self.policy.choose(self.features, scored)
        if route not in lengths:
            raise ValueError(f"routing policy chose {route!r}, but this assistant only has {tuple(lengths)}")
        # A DFlash block is drafted whole near max_length too: its logits depend on how many MASK positions it holds.
        # A chain's first drafts do not depend on its length, so it stops at what fits.
        return route, self.draft_lengths[route] if route == DFLASH else lengths[route]

    def _cut_at_stop_strings(self, input_ids, draft_ids, draft_logits):
        """Cut the draft before its first token that completes a stop string."""
        k = draft_ids.shape[1]
        if self.stop_strings is None or k == 0:
            return draft_ids, draft_logits
        window = self.stop_strings.maximum_token_len
        sequence = torch.cat([input_ids[0, -window:], draft_ids[0]])
        # Left-pad short prompts with an out-of-vocabulary id, which StopStringCriteria matches to nothing.
        pad = sequence.new_full((max(0, window + k - sequence.shape[0]),), torch.iinfo(torch.long).max)
        tails = torch.cat([pad, sequence]).unfold(0, window, 1)[-k:]  # [k, window]: ending at each draft token
        completes = self.stop_strings(tails, None).nonzero()
        if completes.numel() == 0:
            return draft_ids, draft_logits
        return _keep(draft_ids, draft_logits, int(completes[0]))


def _keep(draft_ids, draft_logits, count: int):
    """The first `count` drafts ([1, n]) and their logits ([1, n, V] or None)."""
    return draft_ids[:, :count], None if draft_logits is None else draft_logits[:, :count]
