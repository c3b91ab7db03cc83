"""The lookup route: its index, its proposals, routing with three routes, and lossless generation with it."""

import random
import threading
from collections import Counter

import pytest
import torch

from hf_whiflash import EntropyPolicy, LookupDrafter, RoundFeatures, WhiFlashAssistant, shipped_drafters
from hf_whiflash.checkpoint import CheckpointError
from hf_whiflash.drafters.lookup import CORPUS_FILE, Corpus
from hf_whiflash.hindsight import acceptance_tables, lookup_accepted, lookup_proposals, simulate_routing
from hf_whiflash.latency import LatencyModel
from hf_whiflash.names import DFLASH, EAGLE, GREEDY, LOOKUP, SAMPLED, SAMPLING
from hf_whiflash.routing import FEATURE_NAMES, RoutingState, feature_vector
from helpers import PROMPTS, chat_ids, random_drafters


def index_of(tokens, **settings):
    drafter = LookupDrafter(**settings)
    index = drafter.new_cache()
    index.enqueue(torch.tensor([tokens]))
    return drafter, index


def test_the_longest_earlier_suffix_proposes_its_most_recent_continuation():
    drafter, index = index_of([5, 1, 2, 3, 9, 1, 2, 7, 7, 1, 2, 3], min_match=2, max_match=4, max_drafts=8)
    # suffix [1, 2, 3] occurred at 1..3 (followed by 9 1 2 7 ...); [2, 3] alone would match the same place,
    # [1, 2] more recently (followed by 7): the longest match wins
    proposal = drafter.propose(index)
    assert proposal.match == 3 and proposal.tokens == [9, 1, 2, 7, 7, 1, 2, 3]
    index.enqueue(torch.tensor([[4, 4]]))  # suffix [4, 4] never occurred before
    assert drafter.propose(index).match == 0 and drafter.propose(index).tokens == []


def test_the_index_grows_with_each_round_without_rescanning():
    drafter, index = index_of([1, 2, 3, 4], min_match=2, max_match=3)
    indexed = len(index.after)
    index.enqueue(torch.tensor([[1, 2]]))  # each new token adds at most max_match - min_match + 1 n-grams
    assert len(index.after) - indexed <= 2 * 2
    assert drafter.propose(index).tokens == [3, 4, 1, 2]  # the newest suffix [1, 2] never matches itself
    index.enqueue(torch.tensor([[3]]))
    assert drafter.propose(index).match == 3 and drafter.propose(index).tokens[:1] == [4]


def test_proposals_stop_at_the_draft_cap_and_the_requested_length():
    drafter, index = index_of(list(range(20)) + [0, 1], max_drafts=5)
    assert drafter.propose(index).tokens == [2, 3, 4, 5, 6]  # the cap, though 18 tokens followed
    ids, rows = drafter.draft(index, 3)  # the length budget (max_new_tokens) cuts it further
    assert ids.tolist() == [[2, 3, 4]] and rows is None


def test_a_sampled_lookup_draft_is_one_hot():
    drafter, index = index_of([7, 8, 9, 7, 8])
    drafter.vocab_size = 12
    ids, rows = drafter.draft(index, 4, pick=lambda *args: None)
    assert ids.tolist() == [[9, 7, 8]] and rows.shape == (1, 3, 12)
    probabilities = rows.softmax(-1)
    assert torch.equal(probabilities.argmax(-1), ids) and torch.all(probabilities.max(-1).values == 1)


def test_bad_lookup_settings_name_the_setting():
    with pytest.raises(ValueError, match="max_drafts = 0"):
        LookupDrafter(max_drafts=0)
    with pytest.raises(ValueError, match="max_match"):
        LookupDrafter(min_match=3, max_match=2)
    with pytest.raises(TypeError, match="lookup must be"):
        WhiFlashAssistant(None, lookup="yes")


def test_the_corpus_proposes_the_most_frequent_continuation_of_the_longest_suffix_it_holds_twice():
    corpus = Corpus.from_documents([[1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 6], [7, 2, 3, 4, 5, 6], [2, 3, 8]], max_match=8)
    # [2, 3, 4] ends three times (followed by 5, 6, 5); [9, 2, 3, 4] only once, so the match stays at 3 tokens
    proposal = corpus.propose([9, 2, 3, 4], min_match=3, max_drafts=8)
    assert proposal.match == 3 and proposal.tokens == [5, 6] and proposal.shares == [2 / 3, 1.0]
    assert corpus.propose([9, 2, 3, 4], min_match=3, max_drafts=1).tokens == [5]
    assert corpus.propose([5, 2, 3], min_match=3, max_drafts=8).tokens == []  # [2, 3] is too short a match
    assert corpus.propose([4, 6], min_match=1, max_drafts=8).tokens == []  # what follows 6 is a document's end


def brute_force(documents, text, min_match, max_match, max_drafts):
    """Corpus.propose by counting every occurrence directly."""
    def ends(pattern):  # (document, index after the occurrence) of each occurrence of pattern
        return [(d, i + len(pattern)) for d, doc in enumerate(documents) for i in range(len(doc) - len(pattern) + 1)
                if doc[i:i + len(pattern)] == pattern]
    match = max((n for n in range(1, min(max_match, len(text)) + 1) if len(ends(text[-n:])) >= 2), default=0)
    if match < min_match:
        return [], []
    follow, tokens, shares = ends(text[-match:]), [], []
    while len(tokens) < max_drafts:
        counts = Counter(documents[d][i] for d, i in follow if i < len(documents[d]))
        if not counts or max(counts.values()) < 2:
            break
        best = min(t for t, c in counts.items() if c == max(counts.values()))  # ties: the smaller id, as np.unique
        tokens.append(best)
        shares.append(counts[best] / len(follow))
        follow = [(d, i + 1) for d, i in follow if i < len(documents[d]) and documents[d][i] == best]
    return tokens, shares


def test_corpus_proposals_equal_counting_every_occurrence():
    rng = random.Random(0)
    for trial in range(200):
        documents = [[rng.randrange(4) for _ in range(rng.randrange(1, 30))] for _ in range(rng.randrange(1, 6))]
        text = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
        max_match, min_match = rng.randrange(1, 7), rng.randrange(1, 4)
        proposal = Corpus.from_documents(documents, max_match).propose(text, min_match, 5)
        tokens, shares = brute_force(documents, text, min_match, max_match, 5)
        assert proposal.tokens == tokens and (proposal.shares or []) == pytest.approx(shares), (documents, text)


def test_lookup_prefers_the_texts_own_match_and_falls_back_to_its_corpus(tmp_path):
    corpus = Corpus.from_documents([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    drafter = LookupDrafter(corpus=corpus, corpus_min_match=2)
    index = drafter.new_cache()
    index.enqueue(torch.tensor([[1, 6, 7, 3, 6, 7]]))  # [6, 7] occurred in the text, followed by 3
    assert drafter.propose(index).tokens[:1] == [3] and not drafter.propose(index).from_corpus
    index.enqueue(torch.tensor([[8]]))  # [6, 7, 8] is new to the text, and the corpus has it twice
    proposal = drafter.propose(index)
    assert proposal.from_corpus and proposal.match == 3 and proposal.tokens == [9]
    assert drafter.draft(index, 4)[0].tolist() == [[9]]
    loaded = LookupDrafter.from_pretrained(drafter.save_pretrained(tmp_path / "lookup"))
    assert loaded.settings() == drafter.settings() and loaded.propose(index) == proposal
    (tmp_path / "lookup" / CORPUS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corpus.safetensors is not a lookup corpus"):
        LookupDrafter.from_pretrained(tmp_path / "lookup")


def test_corpus_drafts_are_cut_by_their_profiled_acceptance_by_share():
    corpus = Corpus.from_documents([[1, 2, 3, 4]] * 3 + [[1, 2, 3, 5]] * 2)
    drafter = LookupDrafter(corpus=corpus, corpus_min_match=2)
    index = drafter.new_cache()
    index.enqueue(torch.tensor([[0, 1, 2]]))
    proposal = drafter.propose(index)
    assert proposal.tokens == [3, 4] and proposal.shares == [1.0, 0.6]
    assert drafter.chances(GREEDY, proposal) == [1.0, 0.6]  # no profile: the shares themselves
    drafter.acceptance_by_share = {GREEDY: [0.1 * b for b in range(10)], SAMPLED: [0.0] * 10}
    assert drafter.chances(GREEDY, proposal) == pytest.approx([0.9, 0.6])  # bins of width 0.1, a share of 1 in the last


def test_hindsight_replays_the_index_as_generation_feeds_it():
    sequence = torch.tensor([[0, 4, 5, 6, 1, 4, 5, 6, 2, 4, 5, 9]])
    drafter = LookupDrafter(min_match=2, max_match=3, max_drafts=4)
    proposals = lookup_proposals(drafter, sequence, start=6)  # round starts m = 6..10, x_m newest
    assert [p.match for p in proposals] == [2, 3, 0, 0, 2]  # m = 7: [4, 5, 6] is verified and occurred before
    assert proposals[0].tokens == [6, 1, 4, 5]  # after [4, 5] at m = 6: its earlier occurrence's continuation
    assert proposals[4].tokens == [6, 2, 4, 5]  # m = 10: the most recent earlier [4, 5]
    assert [lookup_accepted(p, sequence, m) for m, p in enumerate(proposals, 6)] == [1, 0, 0, 0, 0]


def test_the_router_gets_lookup_only_where_it_matched_and_sees_the_match(tiny):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    asked = []

    class Recording(EntropyPolicy):
        def for_generation(self):
            return self

        def choose(self, features, lengths):
            asked.append((features, dict(lengths)))
            return super().choose(features, lengths)

    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters", eagle_steps=2, dflash_block_size=3,
                                                  policy=Recording())
    assert set(assistant.drafters) == {EAGLE, DFLASH, LOOKUP}  # lookup is there by default
    prompt = torch.tensor([[3, 8, 4, 9, 12, 5, 7, 3, 8, 4, 9, 12]])
    target.generate(prompt, max_new_tokens=24, do_sample=False, assistant_model=assistant)
    assert any(LOOKUP in lengths for _, lengths in asked)
    for features, lengths in asked:
        assert (LOOKUP in lengths) == (features.lookup_match > 0)
        assert lengths.get(LOOKUP, 0) == features.lookup_drafts <= assistant.draft_lengths[GREEDY][LOOKUP]


def features(match: int, drafts: int, entropy: float = 2.5) -> RoundFeatures:
    return RoundFeatures(entropy=entropy, top1_prob=0.5, position=10, last_route=EAGLE, last_accepted=1,
                         accepted_ema={EAGLE: 0.6}, seconds_ema={EAGLE: 0.05}, lookup_match=match,
                         lookup_drafts=drafts)


def test_entropy_policy_takes_a_long_match_and_learns_a_short_one_fails():
    policy = EntropyPolicy(priors={LOOKUP: (0.2, 0.8, 1.5, 2.5)}).for_generation()
    lengths = {EAGLE: 3, DFLASH: 15, LOOKUP: 8}
    assert policy.choose(features(4, 8), lengths) == LOOKUP  # untimed lookup costs what EAGLE-3's rounds do
    assert policy.choose(features(1, 8), lengths) == EAGLE  # a one-token match promises less than the chain
    for _ in range(3):  # four-token matches keep failing here: the estimate for them falls below EAGLE-3's
        policy.observe(features(4, 8), LOOKUP, 0, 0.05)
    assert policy.choose(features(4, 8), lengths) == EAGLE
    assert policy.choose(features(4, 1), {**lengths, LOOKUP: 1}) == EAGLE


def test_entropy_policy_weighs_corpus_matches_in_a_regime_of_their_own():
    policy = EntropyPolicy(priors={LOOKUP: (0.2, 0.8, 1.5, 2.5)}).for_generation()  # saved before corpora: kept
    assert policy.priors[LOOKUP][-1] == EntropyPolicy.PRIORS[LOOKUP][-1]
    lengths = {EAGLE: 3, LOOKUP: 8}
    corpus_match = RoundFeatures(**{**vars(features(4, 8)), "lookup_corpus": True})
    assert policy.choose(features(4, 8), lengths) == LOOKUP
    for _ in range(3):  # corpus matches keep failing; the text's four-token matches keep their estimate
        policy.observe(corpus_match, LOOKUP, 0, 0.05)
    assert policy.choose(corpus_match, lengths) == EAGLE and policy.choose(features(4, 8), lengths) == LOOKUP


def test_routing_features_cover_three_routes():
    state = RoutingState((EAGLE, DFLASH, LOOKUP))
    state.record(LOOKUP, 5, 0.05)
    state.record(EAGLE, 1, 0.06)
    f = state.features(0.5, 0.9, position=20, lookup_match=3, lookup_drafts=8, lookup_corpus=True)
    vector = feature_vector(f)
    assert len(vector) == len(FEATURE_NAMES) and all(0.0 <= v <= 1.0 for v in vector)
    assert vector[FEATURE_NAMES.index("lookup_corpus")] == 1
    assert vector[FEATURE_NAMES.index("lookup_ema")] == 5 / 16 and vector[FEATURE_NAMES.index("lookup_match")] > 0
    assert vector[FEATURE_NAMES.index("lookup_idle")] == 1 / 16 and vector[FEATURE_NAMES.index("eagle3_last")] == 1


def test_simulated_routing_offers_lookup_as_generation_does(target, tokenizer):
    ids = chat_ids(tokenizer, "Write the word 'banana' ten times, separated by commas.")
    sequence = target.generate(ids, max_new_tokens=40, do_sample=False)
    eagle, _ = random_drafters(target)
    hindsight = acceptance_tables(target, sequence, ids.shape[1], eagle=eagle, eagle_steps=2,
                                  lookup=LookupDrafter().attach(target))
    latency = LatencyModel({0: 0.02, 1: 0.021, 8: 0.025}, {EAGLE: {1: 0.001}, LOOKUP: {1: 0.0}})
    records = simulate_routing(hindsight, EntropyPolicy(), latency, {EAGLE: 2, LOOKUP: 8})
    assert sum(a.get(r, 0) + 1 for _, r, a, _ in records) >= len(hindsight.entropy)  # every round start walked
    looked_up = [a[LOOKUP] for _, r, a, _ in records if r == LOOKUP]
    assert looked_up and max(looked_up) >= 3  # the repeated word is found and accepted
    alone = simulate_routing(hindsight, EntropyPolicy(), latency, {LOOKUP: 8}, routes=(LOOKUP,))
    assert {r for _, r, _, _ in alone} == {LOOKUP, "target"}  # no match: a plain step


@pytest.mark.parametrize("mode", [GREEDY, SAMPLED])
def test_lookup_alone_and_all_routes_are_lossless_on_the_real_target(target, tokenizer, mode):
    folder = shipped_drafters("SmolLM2-135M-Instruct")
    settings = {"do_sample": False} if mode == GREEDY else {"do_sample": True, **SAMPLING}
    for routes in ((LOOKUP,), (EAGLE, DFLASH, LOOKUP)):
        assistant = WhiFlashAssistant.from_pretrained(target, folder, routes=routes, policy=EntropyPolicy(),
                                                      eagle_steps=3, dflash_block_size=8)
        routed, from_corpus = [], 0
        for row in PROMPTS[::13][:4]:
            ids = chat_ids(tokenizer, row["prompt"])
            torch.manual_seed(0)
            out = target.generate(ids, max_new_tokens=48, assistant_model=assistant, **settings)
            if mode == GREEDY:
                assert torch.equal(out, target.generate(ids, max_new_tokens=48, do_sample=False)), (routes, row)
            routed += assistant.stats.routes
            from_corpus += sum(p.from_corpus for p in lookup_proposals(assistant.lookup, out, ids.shape[1]))
        assert LOOKUP in routed and from_corpus, routes  # the shipped corpus proposed in some rounds


def test_each_generation_has_its_own_lookup_index(target, tokenizer):
    """Two threads share one assistant: a lookup index per generate() call, so each thread's proposals come from
    its own text (a shared index would draft the other thread's tokens, and greedy output would still match,
    so the proof is that each thread's lookup drafts are accepted as often as when run alone)."""
    assistant = WhiFlashAssistant.from_pretrained(target, shipped_drafters("SmolLM2-135M-Instruct"),
                                                  routes=(LOOKUP,), policy=EntropyPolicy())
    prompts = ["Write a Python class Stack with push, pop and peek methods.",
               "List the planets of the solar system, one per line, with their order from the sun."]
    inputs = [chat_ids(tokenizer, p) for p in prompts]
    alone = []
    for ids in inputs:
        assistant_out = target.generate(ids, max_new_tokens=64, do_sample=False, assistant_model=assistant)
        alone.append((assistant_out, [r.draft_ids for r in assistant.stats.rounds]))
    results = {}

    def run(i):
        for _ in range(2):
            out = target.generate(inputs[i], max_new_tokens=64, do_sample=False, assistant_model=assistant)
            results.setdefault(i, []).append((out, [r.draft_ids for r in assistant.stats.rounds]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        for out, drafts in results[i]:
            assert torch.equal(out, alone[i][0]) and drafts == alone[i][1]
