"""Routing policies: the entropy policy's behaviour, and a NeuralPolicy learning an obvious rule."""

import torch

from hf_whiflash.names import DFLASH, EAGLE, GREEDY, LOOKUP, ROUTES
from hf_whiflash.routing import FEATURE_NAMES, EntropyPolicy, NeuralPolicy, RoundFeatures, RoutingState, feature_vector

LATENCY = {"verify_s": {1: 0.05, 15: 0.12}, "draft_s": {EAGLE: {1: 0.003, 15: 0.045}, DFLASH: {1: 0.012, 15: 0.015}}}
LENGTHS = {EAGLE: 6, DFLASH: 15}


def features(entropy: float, **state) -> RoundFeatures:
    return RoundFeatures(entropy=entropy, top1_prob=max(0.05, 1 - entropy / 4), position=50, last_route=None,
                         last_accepted=0, **state)


def synthetic_task(n: int, seed: int = 0):
    """Code-like rounds (low entropy): DFlash accepts 10 drafts, EAGLE-3 4. Prose (high entropy): DFlash 0, EAGLE-3 3.
    Lookup never matches here (0)."""
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(n, generator=g) * 4
    confident = entropy < 1.0
    accepted = torch.stack([torch.where(confident, 4.0, 3.0), torch.where(confident, 10.0, 0.0),
                            torch.zeros(n)], dim=-1)  # ROUTES order
    accepted[:, :2] += torch.randn(n, 2, generator=g).abs() * 0.5  # noisy labels
    x = torch.tensor([feature_vector(features(float(e))) for e in entropy])
    return x, accepted


def test_neural_policy_learns_the_obvious_rule(tmp_path):
    torch.manual_seed(0)
    policy = NeuralPolicy(LATENCY, hidden=16)
    loss = policy.fit(*synthetic_task(2000), epochs=200)
    assert loss < 1.0
    assert policy.choose(features(0.2), LENGTHS) == DFLASH
    assert policy.choose(features(3.0), LENGTHS) == EAGLE
    agree = sum(policy.choose(features(e), LENGTHS) == (DFLASH if e < 1.0 else EAGLE) for e in [i / 20 for i in range(80)])
    assert agree >= 76  # at most the boundary may blur
    loaded = NeuralPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy"))
    x = torch.tensor([feature_vector(features(0.5))])
    assert torch.equal(loaded(x), policy(x))


def test_neural_policy_weighs_latency(tmp_path):
    """The same predictions, but DFlash rounds 20x dearer: EAGLE-3 wins everywhere at latency_weight 1."""
    expensive = {**LATENCY, "draft_s": {**LATENCY["draft_s"], DFLASH: {1: 3.0, 15: 3.0}}}
    policy = NeuralPolicy(expensive, hidden=16)
    torch.manual_seed(0)
    policy.fit(*synthetic_task(2000), epochs=200)
    assert policy.choose(features(0.2), LENGTHS) == EAGLE
    policy.latency_weight = 0.0  # tokens per round only: latency ignored
    assert policy.choose(features(0.2), LENGTHS) == DFLASH


def test_entropy_policy_follows_regimes_and_explores():
    policy = EntropyPolicy(threshold=1.0, explore_every=4, priors={EAGLE: (2.0, 1.0), DFLASH: (3.0, 0.5)})
    assert policy.choose(features(0.3), LENGTHS) == DFLASH  # prior: confident -> DFlash
    assert policy.choose(features(2.5), LENGTHS) == EAGLE  # prior: uncertain -> EAGLE-3
    for _ in range(3):  # DFlash keeps failing on confident rounds: EAGLE-3 takes over
        policy.observe(features(0.3), DFLASH, 0, 0.1)
    assert policy.choose(features(0.3), LENGTHS) == EAGLE
    for _ in range(4):  # ... until DFlash has been idle for explore_every rounds of that regime
        policy.observe(features(0.3), EAGLE, 2, 0.1)
    assert policy.choose(features(0.3), LENGTHS) == DFLASH
    # latency: equal acceptance, but EAGLE-3 rounds measured 3x slower
    slow_eagle = features(2.5, seconds_ema={EAGLE: 0.3, DFLASH: 0.1})
    fresh = EntropyPolicy(priors={EAGLE: (1.0, 1.0), DFLASH: (1.0, 1.0)})
    assert fresh.choose(slow_eagle, LENGTHS) == DFLASH
    assert EntropyPolicy(latency_weight=0.0, priors={EAGLE: (1.0, 1.5), DFLASH: (1.0, 1.0)}).choose(
        slow_eagle, LENGTHS) == EAGLE


def test_entropy_policy_explores_a_clearly_worse_route_rarely():
    """Once both round times are known, an idle route waits explore_every x (best score / its score)."""
    policy = EntropyPolicy(threshold=1.0, explore_every=4, priors={EAGLE: (1.0, 1.0), DFLASH: (1.0, 1.0)})
    timed = features(2.5, seconds_ema={EAGLE: 0.1, DFLASH: 0.4})  # DFlash scores a quarter of EAGLE-3
    chosen = []
    for _ in range(20):
        chosen.append(policy.choose(timed, LENGTHS))
        policy.observe(timed, chosen[-1], 1, 0.1)
    assert chosen.index(DFLASH) == 16 and chosen.count(DFLASH) == 1
    close = features(2.5, seconds_ema={EAGLE: 0.1, DFLASH: 0.125})  # 0.8 of the best: after 5 idle rounds
    policy = policy.for_generation()
    for _ in range(4):
        assert policy.choose(close, LENGTHS) == EAGLE
        policy.observe(close, EAGLE, 1, 0.1)
    assert policy.choose(close, LENGTHS) == EAGLE  # idle 4 < 4 x 1.25
    policy.observe(close, EAGLE, 1, 0.1)
    assert policy.choose(close, LENGTHS) == DFLASH


def test_routing_state_tracks_what_the_features_report():
    state = RoutingState(ROUTES)
    state.record(EAGLE, 4, 0.1)
    state.record(EAGLE, 2, 0.1)
    state.record(DFLASH, 7, 0.2)
    f = state.features(0.5, 0.9, position=20)
    assert f.last_route == DFLASH and f.last_accepted == 7
    assert f.accepted_ema == {EAGLE: 3.0, DFLASH: 7.0}
    assert f.rounds_since == {EAGLE: 1, DFLASH: 0, LOOKUP: 3}
    vector = feature_vector(f)
    assert len(vector) == len(FEATURE_NAMES) and all(0.0 <= v <= 1.0 for v in vector)


def test_an_eagle_steps_override_is_what_the_router_scores_and_what_is_drafted(tiny):
    """The assistant's draft lengths are the one source: the policy is asked with them (cut only by the length
    budget) and the drafter drafts them; the neural router scores round costs at those lengths."""
    from transformers import AutoModelForCausalLM

    from hf_whiflash import WhiFlashAssistant

    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    assistant = WhiFlashAssistant.from_pretrained(target, tiny / "drafters", routes=(EAGLE, DFLASH), eagle_steps=2,
                                                  dflash_block_size=5)
    assert isinstance(assistant.policy, NeuralPolicy)  # the folder's router, trained with other lengths
    asked, costed = [], []
    choose, round_seconds = assistant.policy.choose, assistant.policy.latency.round_seconds
    assistant.policy.choose = lambda features, lengths: asked.append(dict(lengths)) or choose(features, lengths)
    assistant.policy.latency.round_seconds = lambda route, k: costed.append((route, k)) or round_seconds(route, k)
    target.generate(torch.tensor([[3, 8, 4, 9, 12, 5, 7]]), max_new_tokens=30, do_sample=False,
                    assistant_model=assistant)
    assert asked and asked[0] == {EAGLE: 2, DFLASH: 4} == assistant.draft_lengths[GREEDY]
    assert all(lengths[EAGLE] <= 2 and lengths[DFLASH] <= 4 for lengths in asked)
    assert {(EAGLE, 2), (DFLASH, 4)} <= set(costed) and all(k <= 4 for _, k in costed)
    routed = [r for r in assistant.stats.rounds if r.route in ROUTES]  # one per question to the policy
    assert len(routed) == len(asked) and all(r.drafted == lengths[r.route] for r, lengths in zip(routed, asked))
