"""Drafter numerics and target binding on the real SmolLM2-135M-Instruct target."""

import pytest
import torch
from transformers import DynamicCache

from hf_whiflash import DFlashConfig, DFlashDrafter, Eagle3Config, Eagle3Drafter, IncompatibleDrafterError

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 rounding; logits reach ~50 in magnitude


@pytest.fixture(scope="module")
def drafters(target):
    return Eagle3Drafter.for_target(target, seed=0), DFlashDrafter.for_target(target, num_layers=2, seed=1)


@pytest.fixture(scope="module")
def hidden(target, tokenizer, drafters):
    """input_ids [1, T] and the target's hidden_states for the layers both drafters read."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    layers = sorted(set(drafters[0].feature_layers) | set(drafters[1].feature_layers))
    with torch.no_grad():
        out = target(ids, output_hidden_states=layers)
    return ids, out.hidden_states


def test_for_target_uses_the_brief_default_layers(drafters, target):
    eagle, dflash = drafters
    assert eagle.feature_layers == [2, 15, 27]  # L=30: hidden_states 2, L/2, L-3
    assert DFlashDrafter.for_target(target, num_layers=5).target_layer_ids == [1, 8, 14, 20, 27]  # round half to even, as the reference
    assert dflash.target_embedding is target.get_input_embeddings()
    assert dflash.target_head is target.get_output_embeddings()
    assert "target_head.weight" not in dflash.state_dict()  # shared, never saved with the drafter


def test_eagle3_kv_only_absorb_equals_full_forward(drafters, hidden):
    eagle, _ = drafters
    ids, hs = hidden
    n = ids.shape[1] - 1
    g = eagle.project(eagle.features(hs)[:, :n])  # pairs (feature t, token t+1)
    with torch.no_grad():
        full = DynamicCache()
        eagle(ids[:, 1:], g, full)
        chunked = DynamicCache()
        for lo, hi in [(0, 5), (5, 6), (6, n)]:  # uneven chunks, as lazy catch-up produces them
            eagle.absorb(ids[:, 1 + lo:1 + hi], g[:, lo:hi], chunked)
    assert chunked.get_seq_length() == n
    torch.testing.assert_close(chunked.layers[0].keys, full.layers[0].keys, **TOL)
    torch.testing.assert_close(chunked.layers[0].values, full.layers[0].values, **TOL)


def test_eagle3_cached_chain_equals_recomputation_without_cache(drafters, hidden):
    eagle, _ = drafters
    ids, hs = hidden
    n = ids.shape[1] - 1
    g = eagle.project(eagle.features(hs)[:, :n])
    with torch.no_grad():
        cache = DynamicCache()
        eagle.absorb(ids[:, 1:n], g[:, :n - 1], cache)
        logits, h = eagle(ids[:, n:], g[:, n - 1:], cache)  # first draft from the last verified pair
        tokens, states, cached_logits = [ids[:, n:]], [g[:, n - 1:]], [logits[:, -1]]
        for _ in range(4):  # chain: feed back the drafter's own pre-norm state and token
            token = eagle.to_target_ids(cached_logits[-1].argmax(-1, keepdim=True))
            tokens.append(token)
            states.append(h[:, -1:])
            logits, h = eagle(token, h[:, -1:], cache)
            cached_logits.append(logits[:, -1])
        # recompute every step from scratch over [context pairs, drafted pairs] with no cache
        for step in range(5):
            seq_ids = torch.cat([ids[:, 1:n]] + tokens[:step + 1], dim=1)
            seq_hidden = torch.cat([g[:, :n - 1]] + states[:step + 1], dim=1)
            fresh, _ = eagle(seq_ids, seq_hidden)
            torch.testing.assert_close(fresh[:, -1], cached_logits[step], **TOL)


def test_dflash_kv_only_absorb_equals_full_forward(drafters, hidden):
    _, dflash = drafters
    ids, hs = hidden
    features = dflash.features(hs)
    block = dflash.block_ids(ids[:, -1:])
    with torch.no_grad():
        full = DynamicCache()
        dflash(block, features, full)  # context absorbed inside a full drafting pass
        chunked = DynamicCache()
        for lo, hi in [(0, 3), (3, 4), (4, features.shape[1])]:
            dflash.absorb(features[:, lo:hi], chunked)
    assert chunked.get_seq_length() == features.shape[1] == full.get_seq_length()
    for a, b in zip(chunked.layers, full.layers):
        torch.testing.assert_close(a.keys, b.keys, **TOL)
        torch.testing.assert_close(a.values, b.values, **TOL)


def test_dflash_cached_block_equals_recomputation_without_cache(drafters, hidden):
    _, dflash = drafters
    ids, hs = hidden
    features = dflash.features(hs)
    T = features.shape[1]
    with torch.no_grad():
        cache = DynamicCache()
        dflash.absorb(features[:, :T - 6], cache)
        first = dflash.logits(dflash(dflash.block_ids(ids[:, -1:]), features[:, T - 6:T - 2], cache))
        second = dflash.logits(dflash(dflash.block_ids(ids[:, -1:], 8), features[:, T - 2:], cache))
        fresh_first = dflash.logits(dflash(dflash.block_ids(ids[:, -1:]), features[:, :T - 2]))
        fresh_second = dflash.logits(dflash(dflash.block_ids(ids[:, -1:], 8), features))
    assert cache.get_seq_length() == T  # block K/V never stay in the cache
    torch.testing.assert_close(first, fresh_first, **TOL)
    torch.testing.assert_close(second, fresh_second, **TOL)


def test_eagle3_draft_ids_map_onto_the_draft_vocab(target):
    eagle = Eagle3Drafter.for_target(target, draft_vocab_size=1000, seed=0)
    used = torch.randperm(49152, generator=torch.Generator().manual_seed(0))[:1000]
    eagle.set_draft_vocab(used)
    assert eagle.to_target_ids(torch.arange(1000)).tolist() == sorted(used.tolist())


# --- mismatches: each raises IncompatibleDrafterError naming the problem and the fix ---------------

def eagle_with(target, **changes):
    raw = Eagle3Drafter.for_target(target, draft_vocab_size=64).config.to_dict() | changes
    return Eagle3Drafter(Eagle3Config(raw))


def dflash_with(target, **changes):
    raw = DFlashDrafter.for_target(target, num_layers=2, intermediate_size=64).config.to_dict()
    raw["dflash_config"] |= changes.pop("dflash_config", {})
    return DFlashDrafter(DFlashConfig(raw | changes))


MISMATCHES = [
    ("eagle3 hidden size", lambda t: eagle_with(t, target_hidden_size=960), "features of width 960"),
    ("eagle3 embedding width", lambda t: eagle_with(t, hidden_size=512, head_dim=64), "embedding width"),
    ("eagle3 vocab", lambda t: eagle_with(t, vocab_size=32000), "vocab size 32000 != target vocab size 49152"),
    ("eagle3 layers", lambda t: eagle_with(t, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 15, 40]},
                                           eagle_aux_hidden_state_layer_ids=[2, 16, 41]),  # both conventions
     r"exceed the target's depth \(30 layers\)"),
    ("dflash hidden size", lambda t: dflash_with(t, hidden_size=960, target_hidden_size=960),
     "hidden size 960 != target hidden size 576"),
    ("dflash vocab", lambda t: dflash_with(t, vocab_size=151936, draft_vocab_size=151936), "vocab size 151936"),
    ("dflash layers", lambda t: dflash_with(t, dflash_config={"target_layer_ids": [1, 33]}),
     r"target_layer_ids \[1, 33\] exceed the target's depth"),
    ("dflash mask", lambda t: dflash_with(t, dflash_config={"mask_token_id": 49152}),
     r"mask_token_id 49152 is outside the target vocabulary"),
    ("dflash trained for", lambda t: dflash_with(t, num_target_layers=36), "trained for a 36-layer target"),
]


@pytest.mark.parametrize("name,make,message", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatch_raises_a_clear_error(target, name, make, message):
    drafter = make(target)
    with pytest.raises(IncompatibleDrafterError, match=message) as err:
        drafter.attach(target)
    assert "for_target(target)" in str(err.value)  # the fix is named


def test_draft_vocab_mapping_out_of_range_is_rejected(target):
    eagle = Eagle3Drafter.for_target(target, draft_vocab_size=64)
    eagle.d2t[-1] = 10**6
    with pytest.raises(IncompatibleDrafterError, match="d2t maps draft ids to target ids outside"):
        eagle.attach(target)
    eagle = Eagle3Drafter.for_target(target, draft_vocab_size=64)
    eagle.t2d[5] = False
    with pytest.raises(IncompatibleDrafterError, match="d2t and t2d disagree"):
        eagle.attach(target)


def test_for_target_drafters_save_and_load_for_the_same_target(target, tmp_path):
    eagle = Eagle3Drafter.for_target(target, draft_vocab_size=256, seed=3)
    dflash = DFlashDrafter.for_target(target, seed=4)
    for drafter in (eagle, dflash):
        folder = drafter.save_pretrained(tmp_path / type(drafter).__name__)
        loaded = type(drafter).from_pretrained(folder).attach(target)
        for name, tensor in drafter.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        assert loaded.feature_layers == drafter.feature_layers


def test_eagle3_training_time_test_matches_the_inference_chain(drafters, hidden):
    """TTT step j at anchor t computes exactly what the cached chain computes j steps after anchor t,
    whether every position drafts or only chosen anchors do."""
    eagle, _ = drafters
    ids, hs = hidden
    steps, n = 3, ids.shape[1] - 4  # anchors 0..n-1 all have tokens t+1..t+steps
    g = eagle.project(eagle.features(hs))
    with torch.no_grad():
        every = torch.arange(n)[None]
        ttt, unrolled, state = eagle.start_ttt(ids[:, 1:n + 1], g[:, :n], every), [], g[:, :n]
        for j in range(steps):
            logits, state = eagle(ids[:, 1 + j:n + 1 + j], state, ttt=ttt)
            unrolled.append(logits)
        chosen = torch.tensor([[0, 5, n - 1]])
        ttt, state = eagle.start_ttt(ids[:, 1:n + 1], g[:, :n], chosen), g[:, chosen[0]]
        for j in range(steps):
            logits, state = eagle(ids[:, chosen[0] + 1 + j], state, ttt=ttt)
            torch.testing.assert_close(logits, unrolled[j][:, chosen[0]], **TOL)
        for t in chosen[0].tolist():
            cache = DynamicCache()
            if t:
                eagle.absorb(ids[:, 1:t + 1], g[:, :t], cache)
            state = g[:, t:t + 1]
            for j in range(steps):  # teacher-forced chain: feed the true token t+1+j
                logits, state = eagle(ids[:, t + 1 + j:t + 2 + j], state, cache)
                torch.testing.assert_close(logits[:, 0], unrolled[j][:, t], **TOL)


def test_dflash_training_blocks_match_inference_blocks(drafters, hidden):
    """Several anchored blocks in one training pass equal one inference pass per anchor."""
    _, dflash = drafters
    ids, hs = hidden
    features = dflash.features(hs)
    anchors = torch.tensor([[3, 10, ids.shape[1] - 16]])
    blocks = torch.cat([dflash.block_ids(ids[:, a:a + 1]) for a in anchors[0].tolist()], dim=1)
    with torch.no_grad():
        trained = dflash.forward_blocks(blocks, anchors, features)
        for i, a in enumerate(anchors[0].tolist()):
            alone = dflash(dflash.block_ids(ids[:, a:a + 1]), features[:, :a])  # context strictly before a
            torch.testing.assert_close(trained[:, i * 16:(i + 1) * 16], alone, **TOL)
