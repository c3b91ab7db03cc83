"""Published DFlash variants compute what their references do; the last blocks are drafted whole; saved folders carry
what vLLM and SGLang read.

Variant checkpoints are written here from the published config keys and weight names (z-lab's hybrid sliding-window
drafters, MiMo's sliding-window drafter with attention sinks), and their drafts are checked against DFlash written out
in this file: every attention a full softmax over [context, block] with an explicit mask. The mask follows vLLM's
qwen3_dflash (see DFlashConfig.layer_attention for where z-lab's model.py differs).
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config

from hf_whiflash import (DEFAULT_TARGET, CheckpointError, DFlashConfig, DFlashDrafter, Eagle3Drafter,
                         LazyCatchUpCache, WhiFlashAssistant, shipped_drafters)
from helpers import WORDS, RoutePattern, Script, ScriptedDFlash, chat_ids, word_tokenizer

H, HEADS, KV, D, INTER, LAYERS, TARGET_LAYERS = 32, 4, 2, 8, 64, 3, 4
TOL = dict(atol=1e-5, rtol=1e-5)
FULL, SLIDING = "full_attention", "sliding_attention"

BASE = {  # z-lab's DFlashDraftModel layout (Qwen3 keys)
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "attention_bias": False, "block_size": 4,
    "head_dim": D, "hidden_act": "silu", "hidden_size": H, "intermediate_size": INTER, "max_position_embeddings": 512,
    "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "num_key_value_heads": KV,
    "num_target_layers": TARGET_LAYERS, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": len(WORDS), "dflash_config": {"mask_token_id": 1, "target_layer_ids": [0, 2]},
}
# z-lab's long-context drafters (Qwen3.6): sliding layers, then one full layer; no causality key
HYBRID = {**BASE, "layer_types": [SLIDING, SLIDING, FULL], "use_sliding_window": True, "sliding_window": 4,
          "max_window_layers": LAYERS}
# MiMo's: use_swa over all-full layer_types, its own window key, non-causal, a sink per head
MIMO = {**BASE, "layer_types": [FULL] * LAYERS, "sliding_window": None, "use_sliding_window": False,
        "dflash_config": {**BASE["dflash_config"], "use_swa": True, "swa_window_size": 4, "causal": False,
                          "attention_sink_bias": True}}
# NVIDIA's causal ones: dflash_config.causal over every layer, a window and sinks
CAUSAL = {**MIMO, "dflash_config": {**MIMO["dflash_config"], "causal": True}}
VARIANTS = {  # config, and the (window, causal) of each layer the engines resolve it to
    "hybrid": (HYBRID, [(4, True), (4, True), (None, False)]),
    "hybrid-non-causal": ({**HYBRID, "dflash_config": {**BASE["dflash_config"], "causal": False}},
                          [(4, False), (4, False), (None, False)]),
    "mimo": (MIMO, [(4, False)] * LAYERS),
    "causal-sinks": (CAUSAL, [(4, True)] * LAYERS),
}


def published_weights(sinks: bool, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc.weight": (H, 2 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (HEADS * D, H), p + "self_attn.k_proj.weight": (KV * D, H),
                   p + "self_attn.v_proj.weight": (KV * D, H), p + "self_attn.o_proj.weight": (H, HEADS * D),
                   p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
                   p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
                   p + "mlp.down_proj.weight": (H, INTER)}
        if sinks:
            shapes[p + "self_attn.attention_sink_bias"] = (HEADS,)
    # norms near 1, projections large enough for peaked attention (so a wrong mask shows)
    return {name: (1 + 0.1 * torch.randn(*shape, generator=g)) if len(shape) == 1 and "sink" not in name
            else torch.randn(*shape, generator=g) * (0.5 if len(shape) > 1 else 1.0) for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def tiny_target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=H, intermediate_size=INTER, num_hidden_layers=TARGET_LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV, pad_token_id=1, bos_token_id=None,
                         eos_token_id=None)
    return LlamaForCausalLM(config).eval()


def write_variant(folder, config, weights):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")
    return folder


# --- DFlash written out, with explicit masks ---------------------------------------------------------------------

def rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x, positions, theta=10000.0):
    """Default RoPE on x [T, heads, D] at absolute positions [T]."""
    angles = positions[:, None].double() * (1.0 / theta ** (torch.arange(0, D, 2).double() / D))[None]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None].float(), torch.cat([angles, angles], -1).sin()[:, None].float()
    half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], dim=-1)
    return x * cos + half * sin


def sees(query: int, key: int, window, causal) -> bool:
    """The engines' rule: a causal query sees no later key; a window W hides keys W or more positions away."""
    return not (causal and key > query) and not (window is not None and abs(query - key) >= window)


def written_out(w, layout, features, block_embeds, sinks):
    """Normed block hidden states [Tb, H] for context features [Tc, 2H] (positions 0..Tc-1) and a block [Tb, H]."""
    ctx = rms(features @ w["fc.weight"].T, w["hidden_norm.weight"])
    Tc, Tb = ctx.shape[0], block_embeds.shape[0]
    positions = torch.arange(Tc + Tb)
    x = block_embeds
    for i, (window, causal) in enumerate(layout):
        p = f"layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rotate(rms((h @ w[p + "self_attn.q_proj.weight"].T).view(Tb, HEADS, D), w[p + "self_attn.q_norm.weight"]),
                   positions[Tc:])
        inputs = torch.cat([ctx, h])  # keys and values: context, then the block
        k = rotate(rms((inputs @ w[p + "self_attn.k_proj.weight"].T).view(Tc + Tb, KV, D),
                       w[p + "self_attn.k_norm.weight"]), positions)
        v = (inputs @ w[p + "self_attn.v_proj.weight"].T).view(Tc + Tb, KV, D)
        mask = torch.tensor([[sees(Tc + a, b, window, causal) for b in range(Tc + Tb)] for a in range(Tb)])
        heads = []
        for head in range(HEADS):
            kv = head // (HEADS // KV)
            scores = (q[:, head] @ k[:, kv].T) / D ** 0.5  # [Tb, Tc+Tb]
            scores = scores.masked_fill(~mask, float("-inf"))
            if sinks:  # one more logit per query row, for no key
                scores = torch.cat([scores, w[p + "self_attn.attention_sink_bias"][head].expand(Tb, 1)], dim=-1)
            weights = scores.softmax(-1)[:, :Tc + Tb]
            heads.append(weights @ v[:, kv])
        x = x + torch.cat(heads, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["norm.weight"])


# --- the variants load and compute exactly ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_published_variant_matches_masked_attention_written_out(tmp_path, tiny_target, name):
    config, layout = VARIANTS[name]
    sinks = config["dflash_config"].get("attention_sink_bias", False)
    weights = published_weights(sinks)
    drafter = DFlashDrafter.from_pretrained(write_variant(tmp_path / name, config, weights)).attach(tiny_target)
    assert drafter.config.layer_attention == layout
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 11, 2 * H, generator=g)  # 11 context positions: well past the window of 4
    block = drafter.block_ids(torch.tensor([[5]]))
    embeds = tiny_target.get_input_embeddings()(block)[0]
    with torch.no_grad():
        expected = written_out(weights, layout, features[0], embeds, sinks)
        at_once = drafter(block, features)[0]
        cache = LazyCatchUpCache()  # context arriving in catch-ups of several rounds
        for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 11)]:
            drafter.absorb(features[:, lo:hi], cache)
        caught_up = drafter(block, cache=cache)[0]
        ignoring_masks = written_out(weights, [(None, False)] * LAYERS, features[0], embeds, sinks)
    torch.testing.assert_close(at_once, expected, **TOL)
    torch.testing.assert_close(caught_up, expected, **TOL)
    assert (ignoring_masks - expected).abs().max() > 1e-2  # the masks matter here: a test that can fail


@pytest.mark.parametrize("name", VARIANTS)
def test_training_blocks_see_what_drafting_sees(tmp_path, tiny_target, name):
    """Several anchored blocks in one training pass (hindsight tables, fine-tuning) equal one drafting pass each."""
    config, _ = VARIANTS[name]
    weights = published_weights(config["dflash_config"].get("attention_sink_bias", False))
    drafter = DFlashDrafter.from_pretrained(write_variant(tmp_path / name, config, weights)).attach(tiny_target)
    features = torch.randn(1, 20, 2 * H, generator=torch.Generator().manual_seed(2))
    tokens = torch.randint(3, len(WORDS), (1, 20), generator=torch.Generator().manual_seed(3))
    anchors = torch.tensor([[2, 9, 15]])
    blocks = torch.cat([drafter.block_ids(tokens[:, a:a + 1]) for a in anchors[0].tolist()], dim=1)
    with torch.no_grad():
        trained = drafter.forward_blocks(blocks, anchors, features)
        for i, a in enumerate(anchors[0].tolist()):
            alone = drafter(drafter.block_ids(tokens[:, a:a + 1]), features[:, :a])
            torch.testing.assert_close(trained[:, i * 4:(i + 1) * 4], alone, **TOL)


def test_variant_folders_round_trip_with_their_sinks(tmp_path):
    weights = published_weights(sinks=True)
    drafter = DFlashDrafter.from_pretrained(write_variant(tmp_path / "in", MIMO, weights))
    out = drafter.save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text()) == MIMO
    reloaded = DFlashDrafter.from_pretrained(out).state_dict()
    assert all(torch.equal(reloaded[name], tensor) for name, tensor in weights.items())


REFUSED = [
    ({**BASE, "draft_vocab_size": 10}, "draft_vocab_size 10 differs from vocab_size"),
    ({**BASE, "target_hidden_size": 64}, "target_hidden_size 64 differs from hidden_size"),
    ({**MIMO, "dflash_config": {**MIMO["dflash_config"], "attention_value_scale": 0.5}},
     "dflash_config.attention_value_scale"),
    ({**BASE, "is_neox_style": False}, "interleaved rotary"),
    ({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({**BASE, "layer_types": [FULL, "chunked_attention", FULL]}, "layer_types"),
    ({**MIMO, "dflash_config": {**MIMO["dflash_config"], "swa_window_size": None}}, "need a window"),
    ({**BASE, "layer_types": [FULL, FULL]}, "must name 3 layers"),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=[m for _, m in REFUSED])
def test_variants_not_computed_exactly_are_refused_by_name(tmp_path, config, message):
    folder = write_variant(tmp_path / "v", config, published_weights(sinks="attention_sink_bias" in str(config)))
    with pytest.raises(CheckpointError, match=message):
        DFlashDrafter.from_pretrained(folder)


# --- the last blocks before max_length are drafted whole ------------------------------------------------------------

class RecordingDFlash(ScriptedDFlash):
    """Scripted to draft the target's own continuation; records the drafter's own logits of every block."""

    def logits(self, hidden):
        self.recorded.append(DFlashDrafter.logits(self, hidden))
        return super().logits(hidden)


def generate_recording(target, tokenizer, reference, max_new_tokens):
    drafter = RecordingDFlash.for_target(target, seed=1)
    drafter.recorded, drafter.script = [], Script(reference, 15, perfect=True)
    assistant = WhiFlashAssistant(target, None, drafter, RoutePattern(["dflash"]), dflash_block_size=16)
    out = target.generate(chat_ids(tokenizer, "Write a haiku about the sea."), max_new_tokens=max_new_tokens,
                          do_sample=False, assistant_model=assistant)
    return out, drafter.recorded, assistant.stats.rounds


def test_last_blocks_are_drafted_whole_and_verified_as_far_as_they_fit(target, tokenizer):
    ids = chat_ids(tokenizer, "Write a haiku about the sea.")
    reference = target.generate(ids, max_new_tokens=40, do_sample=False)
    assert reference.shape[1] - ids.shape[1] > 32  # the script needs the continuation
    _, far_logits, _ = generate_recording(target, tokenizer, reference, 40)  # max_length far away
    for max_new in (15, 16, 17, 32):  # rounds of 16 tokens: the last block cut to 13, 14, none, 14 drafts
        out, logits, rounds = generate_recording(target, tokenizer, reference, max_new)
        assert torch.equal(out, reference[:, :ids.shape[1] + max_new]), max_new
        assert sum(r.accepted + 1 for r in rounds) == max_new - 1  # the prefill made the first token
        for r, (block, far) in enumerate(zip(logits, far_logits)):
            assert block.shape[1] == 15, (max_new, r)  # the whole block, whatever fits
            torch.testing.assert_close(block, far, **TOL)
        fits = (max_new - 1) % 16 - 1
        assert rounds[-1].drafted == (fits if fits >= 0 else 15), max_new


def test_chains_stop_at_the_drafts_that_fit(target, tokenizer, monkeypatch):
    """Unlike a DFlash block, a chain's first drafts do not depend on its length: near max_length it drafts only
    the steps that can be verified."""
    asked = []  # the length each round's draft was asked for
    draft = Eagle3Drafter.draft
    monkeypatch.setattr(Eagle3Drafter, "draft",
                        lambda self, cache, length, *rest: (asked.append(length), draft(self, cache, length, *rest))[1])
    assistant = WhiFlashAssistant(target, Eagle3Drafter.for_target(target, seed=0), lookup=False, eagle_steps=6)
    max_new = 10
    target.generate(chat_ids(tokenizer, "Write a haiku about the sea."), max_new_tokens=max_new, do_sample=False,
                    assistant_model=assistant)
    produced, expected = 1, []  # the prefill makes the first token
    for round_ in assistant.stats.rounds:
        fits = max_new - produced - 1  # candidates before max_length, besides the round's bonus token
        if fits > 0:
            expected.append(min(6, fits))
        produced += round_.accepted + 1
    assert asked == expected and expected[-1] < 6


# --- saved folders load in vLLM and SGLang ---------------------------------------------------------------------------

def vllm_reads(config: dict, target_vocab_size: int) -> dict:
    """What vLLM's DFlash (qwen3_dflash.py, eagle3_utils.py) takes from a draft config.json, which it parses as
    transformers' Qwen3Config."""
    hf = Qwen3Config(**config)
    dflash = getattr(hf, "dflash_config", None) or {}
    aux = getattr(hf, "eagle_aux_hidden_state_layer_ids", None) or [i + 1 for i in dflash.get("target_layer_ids", [])]
    layer_types = getattr(hf, "layer_types", None)
    any_sliding = SLIDING in (layer_types or [])
    layers = []
    for i in range(hf.num_hidden_layers):
        use_swa = dflash.get("use_swa", False)
        sliding = use_swa if layer_types is None or (use_swa and not any_sliding) else layer_types[i] == SLIDING
        window = dflash.get("swa_window_size", getattr(hf, "sliding_window", None)) if sliding else None
        assert not sliding or window is not None, "vLLM: DFlash sliding attention requires a window size"
        causal = getattr(hf, "is_causal", None)
        causal = dflash.get("causal") if causal is None else causal
        layers.append((window, bool(causal) if causal is not None else bool(layer_types) and layer_types[i] == SLIDING))
    draft_vocab = getattr(hf, "draft_vocab_size", None) or hf.vocab_size
    return {"mask_token_id": dflash.get("mask_token_id", getattr(hf, "mask_token_id", None)), "aux_layers": aux,
            "fc_input": (getattr(hf, "target_hidden_size", None) or hf.hidden_size) * (len(aux) or hf.num_hidden_layers),
            "layers": layers, "sinks": dflash.get("attention_sink_bias", getattr(hf, "add_swa_attention_sink_bias", False)),
            "d2t": draft_vocab != target_vocab_size}


def sglang_reads(config: dict, vocab: dict[str, int], target_vocab_size: int) -> dict:
    """What SGLang's DFlash (dflash_utils.parse_dflash_draft_config, dflash_worker, models/dflash.py) takes from it."""
    dflash = config.get("dflash_config") or {}
    mask_token = dflash.get("mask_token", config.get("mask_token")) or "<|MASK|>"
    mask_token_id = dflash.get("mask_token_id", config.get("mask_token_id"))
    assert isinstance(mask_token, str) and isinstance(mask_token_id, int) and not isinstance(mask_token_id, bool)
    assert 0 <= mask_token_id < target_vocab_size
    assert vocab.get(mask_token, mask_token_id) == mask_token_id, "SGLang: mask_token_id conflicts with mask_token"
    assert isinstance(dflash.get("attention_sink_bias", False), bool)
    assert config["hidden_act"] == "silu"
    hf = Qwen3Config(**config)  # sliding layers: causal with window_left = sliding_window - 1; full: non-causal
    kinds = [("causal", hf.sliding_window - 1) if t == SLIDING else ("non-causal", -1) for t in hf.layer_types]
    return {"block_size": dflash.get("block_size", config.get("block_size")),
            "num_target_layers": dflash.get("num_target_layers", config.get("num_target_layers")),
            "target_layer_ids": dflash.get("target_layer_ids", config.get("target_layer_ids")),
            "mask_token_id": mask_token_id, "layers": kinds}


def assert_engines_serve(folder, tokenizer, target):
    """Both engines, reading the saved config.json, build the drafter we computed with."""
    config = json.loads((folder / "config.json").read_text())
    drafter = DFlashDrafter.from_pretrained(folder)
    tc = target.config
    vllm = vllm_reads(config, tc.vocab_size)
    assert vllm == {"mask_token_id": drafter.mask_token_id, "aux_layers": drafter.feature_layers,
                    "fc_input": drafter.fc.in_features, "layers": drafter.config.layer_attention, "sinks": False,
                    "d2t": False}
    sglang = sglang_reads(config, tokenizer.get_vocab(), tc.vocab_size)
    assert sglang == {"block_size": drafter.block_size, "num_target_layers": tc.num_hidden_layers,
                      "target_layer_ids": drafter.target_layer_ids, "mask_token_id": drafter.mask_token_id,
                      "layers": [("non-causal", -1)] * drafter.config.num_hidden_layers}


def test_saved_folders_carry_what_vllm_and_sglang_read(tmp_path, tiny_target):
    tokenizer = word_tokenizer()
    drafter = DFlashDrafter.for_target(tiny_target, num_layers=2, block_size=8, mask_token_id=2, tokenizer=tokenizer)
    folder = drafter.save_pretrained(tmp_path / "dflash")
    assert json.loads((folder / "config.json").read_text())["dflash_config"]["mask_token"] == "<eos>"
    assert_engines_serve(folder, tokenizer, tiny_target)


def test_shipped_drafter_carries_what_vllm_and_sglang_read(target, tokenizer):
    assert_engines_serve(shipped_drafters(DEFAULT_TARGET) / "dflash", tokenizer, target)


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_resolve_as_vllm_reads_them(name):
    config, layout = VARIANTS[name]
    assert vllm_reads(config, len(WORDS))["layers"] == DFlashConfig(config).layer_attention == layout
