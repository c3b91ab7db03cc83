"""Routing policies: the entropy policy's behaviour, and a NeuralPolicy learning an obvious rule."""

import torch

from hf_whiflash.routing import (DFLASH, EAGLE, ROUTES, EntropyPolicy, NeuralPolicy, RoundFeatures, RoutingState,
                                 feature_vector)

LATENCY = {"verify_s": {1: 0.05, 15: 0.12}, "draft_s": {EAGLE: {1: 0.003, 15: 0.045}, DFLASH: {1: 0.012, 15: 0.015}}}
LENGTHS = {EAGLE: 6, DFLASH: 15}


def features(entropy: float, **state) -> RoundFeatures:
    return RoundFeatures(entropy=entropy, top1_prob=max(0.05, 1 - entropy / 4), position=50, last_route=None,
                         last_accepted=0, **state)


def synthetic_task(n: int, seed: int = 0):
    """Code-like rounds (low entropy): DFlash accepts 10 drafts, EAGLE-3 4. Prose (high entropy): DFlash 0, EAGLE-3 3."""
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(n, generator=g) * 4
    confident = entropy < 1.0
    accepted = torch.stack([torch.where(confident, 4.0, 3.0), torch.where(confident, 10.0, 0.0)], dim=-1)
    accepted += torch.randn(n, 2, generator=g).abs() * 0.5  # noisy labels
    x = torch.tensor([feature_vector(features(float(e))) for e in entropy])
    return x, accepted


def test_neural_policy_learns_the_obvious_rule(tmp_path):
    torch.manual_seed(0)
    policy = NeuralPolicy(LATENCY, LENGTHS, hidden=16)
    loss = policy.fit(*synthetic_task(2000), epochs=200)
    assert loss < 1.0
    assert policy.choose(features(0.2), ROUTES) == DFLASH
    assert policy.choose(features(3.0), ROUTES) == EAGLE
    agree = sum(policy.choose(features(e), ROUTES) == (DFLASH if e < 1.0 else EAGLE) for e in [i / 20 for i in range(80)])
    assert agree >= 76  # at most the boundary may blur
    loaded = NeuralPolicy.from_pretrained(policy.save_pretrained(tmp_path / "policy"))
    x = torch.tensor([feature_vector(features(0.5))])
    assert torch.equal(loaded(x), policy(x))


def test_neural_policy_weighs_latency(tmp_path):
    """The same predictions, but DFlash rounds 20x dearer: EAGLE-3 wins everywhere at latency_weight 1."""
    expensive = {**LATENCY, "draft_s": {**LATENCY["draft_s"], DFLASH: {1: 3.0, 15: 3.0}}}
    policy = NeuralPolicy(expensive, LENGTHS, hidden=16)
    torch.manual_seed(0)
    policy.fit(*synthetic_task(2000), epochs=200)
    assert policy.choose(features(0.2), ROUTES) == EAGLE
    policy.latency_weight = 0.0  # tokens per round only: latency ignored
    assert policy.choose(features(0.2), ROUTES) == DFLASH


def test_entropy_policy_follows_regimes_and_explores():
    policy = EntropyPolicy(threshold=1.0, explore_every=4, priors={EAGLE: (2.0, 1.0), DFLASH: (3.0, 0.5)})
    assert policy.choose(features(0.3), ROUTES) == DFLASH  # prior: confident -> DFlash
    assert policy.choose(features(2.5), ROUTES) == EAGLE  # prior: uncertain -> EAGLE-3
    for _ in range(3):  # DFlash keeps failing on confident rounds: EAGLE-3 takes over
        policy.observe(features(0.3), DFLASH, 0, 0.1)
    assert policy.choose(features(0.3), ROUTES) == EAGLE
    for _ in range(4):  # ... until DFlash has been idle for explore_every rounds of that regime
        policy.observe(features(0.3), EAGLE, 2, 0.1)
    assert policy.choose(features(0.3), ROUTES) == DFLASH
    # latency: equal acceptance, but EAGLE-3 rounds measured 3x slower
    slow_eagle = features(2.5, seconds_ema={EAGLE: 0.3, DFLASH: 0.1})
    fresh = EntropyPolicy(priors={EAGLE: (1.0, 1.0), DFLASH: (1.0, 1.0)})
    assert fresh.choose(slow_eagle, ROUTES) == DFLASH
    assert EntropyPolicy(latency_weight=0.0, priors={EAGLE: (1.0, 1.5), DFLASH: (1.0, 1.0)}).choose(
        slow_eagle, ROUTES) == EAGLE


def test_entropy_policy_explores_a_clearly_worse_route_rarely():
    """Once both round times are known, an idle route waits explore_every x (best score / its score)."""
    policy = EntropyPolicy(threshold=1.0, explore_every=4, priors={EAGLE: (1.0, 1.0), DFLASH: (1.0, 1.0)})
    timed = features(2.5, seconds_ema={EAGLE: 0.1, DFLASH: 0.4})  # DFlash scores a quarter of EAGLE-3
    chosen = []
    for _ in range(20):
        chosen.append(policy.choose(timed, ROUTES))
        policy.observe(timed, chosen[-1], 1, 0.1)
    assert chosen.index(DFLASH) == 16 and chosen.count(DFLASH) == 1
    close = features(2.5, seconds_ema={EAGLE: 0.1, DFLASH: 0.125})  # 0.8 of the best: after 5 idle rounds
    policy.reset()
    for _ in range(4):
        assert policy.choose(close, ROUTES) == EAGLE
        policy.observe(close, EAGLE, 1, 0.1)
    assert policy.choose(close, ROUTES) == EAGLE  # idle 4 < 4 x 1.25
    policy.observe(close, EAGLE, 1, 0.1)
    assert policy.choose(close, ROUTES) == DFLASH


def test_routing_state_tracks_what_the_features_report():
    state = RoutingState(ROUTES)
    state.record(EAGLE, 4, 0.1)
    state.record(EAGLE, 2, 0.1)
    state.record(DFLASH, 7, 0.2)
    f = state.features(0.5, 0.9, position=20)
    assert f.last_route == DFLASH and f.last_accepted == 7
    assert f.accepted_ema == {EAGLE: 3.0, DFLASH: 7.0}
    assert f.rounds_since == {EAGLE: 1, DFLASH: 0}
    vector = feature_vector(f)
    assert len(vector) == 12 and all(0.0 <= v <= 1.0 for v in vector)
