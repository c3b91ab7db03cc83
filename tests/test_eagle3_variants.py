"""Published EAGLE-3 variants compute what they were trained to, and the folders we save read in vLLM and SGLang
as we compute them.

Each checkpoint here is written by hand in the published layout (config keys and tensor names as SafeAILab/EAGLE,
SpecForge and vLLM read them), and its draft logits are checked against `reference_step`, a plain restatement
of the published forward, not only loaded.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_whiflash import CheckpointError, Eagle3Drafter

H, HEADS, KV, INTER, VOCAB, DRAFT_VOCAB, TARGET_LAYERS = 32, 4, 2, 64, 100, 40, 8
LAYER_IDS = "eagle_aux_hidden_state_layer_ids"

ORIGINAL = {  # yuhuili/EAGLE3-* style: LlamaForCausalLM, no rope_theta, no layer ids
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": H,
    "intermediate_size": INTER, "max_position_embeddings": 2048, "num_attention_heads": HEADS,
    "num_key_value_heads": KV, "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "torch_dtype": "float16", "vocab_size": VOCAB, "draft_vocab_size": VOCAB,
}
SPECFORGE_31 = {  # configs/qwen3-30B-A3B-eagle3.1.json style: fc_norm, norm_output, explicit head_dim
    **ORIGINAL, "architectures": ["LlamaForCausalLMEagle3"], "attention_bias": False, "head_dim": 16,
    "fc_norm": True, "norm_output": True, "rope_scaling": None, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "draft_vocab_size": DRAFT_VOCAB,
}


def published_weights(config: dict, *, mapping=True, embed=False, seed=0) -> dict[str, torch.Tensor]:
    """Random fp32 weights under the published tensor names for `config`."""
    D = config.get("head_dim") or H // HEADS
    draft_vocab = config.get("draft_vocab_size") or VOCAB
    shapes = {
        "fc.weight": (H, 3 * H),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (HEADS * D, 2 * H),
        "midlayer.self_attn.k_proj.weight": (KV * D, 2 * H),
        "midlayer.self_attn.v_proj.weight": (KV * D, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, HEADS * D),
        "midlayer.mlp.gate_proj.weight": (INTER, H),
        "midlayer.mlp.up_proj.weight": (INTER, H),
        "midlayer.mlp.down_proj.weight": (H, INTER),
        "norm.weight": (H,),
        "lm_head.weight": (draft_vocab, H),
    }
    if config.get("fc_norm"):  # SpecForge: nn.ModuleList of three RMSNorm(target_hidden_size)
        shapes |= {f"fc_norm.{i}.weight": (H,) for i in range(3)}
    if embed:
        shapes["embed_tokens.weight"] = (VOCAB, H)
    g = torch.Generator().manual_seed(seed)
    # Norm weights away from one, so that a norm applied or skipped shows in the logits.
    weights = {name: (1 + 0.5 * torch.randn(*shape, generator=g)) if len(shape) == 1 else
               0.3 * torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    if mapping:
        used = torch.randperm(VOCAB, generator=g)[:draft_vocab].sort().values
        weights["d2t"] = used - torch.arange(draft_vocab)
        weights["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, used, True)
    return weights


def write_folder(folder, config: dict, weights: dict):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")
    return folder


# --- the published forward, restated -------------------------------------------------------------------------------

def rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, theta: float):
    """Default rope over positions 0..T-1 of x [heads, T, D]."""
    D = x.shape[-1]
    angles = torch.arange(x.shape[1]).float()[:, None] / theta ** (torch.arange(0, D, 2).float() / D)  # [T, D/2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


def reference_step(config: dict, w: dict, features, embeds, theta: float):
    """One EAGLE-3 step over T positions from scratch: features [T, 3H] (low | mid | high), embeds [T, H] (the next
    tokens) -> draft logits [T, draft_vocab] and the state [T, H] the next step reads."""
    eps, D = config["rms_norm_eps"], config.get("head_dim") or H // HEADS
    T = features.shape[0]
    if config.get("fc_norm"):  # one norm per captured layer, each on its own third
        features = torch.cat([rms(part, w[f"fc_norm.{i}.weight"], eps) for i, part in enumerate(features.chunk(3, -1))],
                             -1)
    g = features @ w["fc.weight"].T
    normed = rms(g, w["midlayer.hidden_norm.weight"], eps)
    x = torch.cat([rms(embeds, w["midlayer.input_layernorm.weight"], eps), normed], -1)  # [T, 2H]: embedding first
    def project(name, heads):  # [heads, T, D]
        return (x @ w[f"midlayer.self_attn.{name}_proj.weight"].T).view(T, heads, D).transpose(0, 1)

    q, k, v = rotate(project("q", HEADS), theta), rotate(project("k", KV), theta), project("v", KV)
    k, v = k.repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
    scores = (q @ k.transpose(1, 2)) / D**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attention = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, HEADS * D) @ w["midlayer.self_attn.o_proj.weight"].T
    h = (normed if config.get("norm_before_residual") else g) + attention
    m = rms(h, w["midlayer.post_attention_layernorm.weight"], eps)
    h = h + (F.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (m @ w["midlayer.mlp.up_proj.weight"].T)) \
        @ w["midlayer.mlp.down_proj.weight"].T
    out = rms(h, w["norm.weight"], eps) if config.get("norm_output", True) else h
    return out @ w["lm_head.weight"].T, h


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                        num_hidden_layers=TARGET_LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=KV)).eval()


def drafted(drafter, target, config: dict, weights: dict, T=7):
    """The loaded head's logits and next state on random features, and the reference's on the same inputs."""
    g = torch.Generator().manual_seed(5)
    features, next_ids = torch.randn(1, T, 3 * H, generator=g), torch.randint(0, VOCAB, (1, T), generator=g)
    with torch.no_grad():
        logits, state = drafter(next_ids, drafter.project(features))
    table = weights.get("embed_tokens.weight", target.get_input_embeddings().weight.detach())
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    expected_logits, expected_state = reference_step(config, weights, features[0], table[next_ids[0]], theta)
    return (logits[0], state[0]), (expected_logits, expected_state)


def assert_computes_the_reference(drafter, target, config, weights):
    (logits, state), (expected_logits, expected_state) = drafted(drafter, target, config, weights)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-4)
    return logits, expected_logits


# --- variants ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_key", ["equal", "absent"])
def test_a_head_without_d2t_t2d_drafts_over_the_whole_vocabulary(tmp_path, target, vocab_key):
    """Released when the draft vocabulary is the full vocabulary; EAGLE's own loader reads it as the identity."""
    config = ORIGINAL if vocab_key == "equal" else {k: v for k, v in ORIGINAL.items() if k != "draft_vocab_size"}
    weights = published_weights(ORIGINAL, mapping=False)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "in", config, weights)).attach(target)
    assert torch.equal(head.to_target_ids(torch.arange(VOCAB)), torch.arange(VOCAB))
    assert bool(head.t2d.all())
    logits, _ = assert_computes_the_reference(head, target, config, weights)
    cache = head.new_cache()  # the cached chain drafts the argmax, as a target id
    g = torch.Generator().manual_seed(5)  # the inputs `drafted` gave
    features, next_ids = torch.randn(1, 7, 3 * H, generator=g), torch.randint(0, VOCAB, (1, 7), generator=g)
    cache.enqueue(next_ids, features)
    ids, _ = head.draft(cache, 1)
    assert ids.item() == logits[-1].argmax().item()
    # saved in the layout it came in: no d2t/t2d written, and it loads back the same
    saved = head.save_pretrained(tmp_path / "out")
    assert set(load_file(saved / "model.safetensors")) == set(weights)
    again = Eagle3Drafter.from_pretrained(saved).attach(target)
    assert torch.equal(drafted(again, target, config, weights)[0][0], logits)


def test_a_reduced_draft_vocabulary_without_d2t_t2d_is_refused_by_name(tmp_path):
    config = {**ORIGINAL, "draft_vocab_size": DRAFT_VOCAB}
    folder = write_folder(tmp_path / "in", config, published_weights(config, mapping=False))
    with pytest.raises(CheckpointError, match=r"draft_vocab_size 40 != vocab_size 100, but the weights carry no "
                                              r"d2t/t2d"):
        Eagle3Drafter.from_pretrained(folder)


def test_specforge_fc_norm_normalises_each_captured_layer_before_fc(tmp_path, target):
    """EAGLE 3.1 (SpecForge `fc_norm: true`): fc_norm.{0,1,2}, one RMSNorm per captured layer's features."""
    weights = published_weights(SPECFORGE_31, embed=True)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "in", SPECFORGE_31, weights))
    logits, _ = assert_computes_the_reference(head, target, SPECFORGE_31, weights)
    _, (without_norm, _) = drafted(head, target, {**SPECFORGE_31, "fc_norm": False}, weights)
    assert (logits - without_norm).abs().max() > 1  # the norms matter on these inputs
    saved = head.save_pretrained(tmp_path / "out")
    assert {f"fc_norm.{i}.weight" for i in range(3)} <= set(load_file(saved / "model.safetensors"))
    assert json.loads((saved / "config.json").read_text())["fc_norm"] is True


def test_specforge_norm_output_false_takes_logits_from_the_pre_norm_state(tmp_path, target):
    config = {**SPECFORGE_31, "fc_norm": False, "norm_output": False}
    weights = published_weights(config, embed=True)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "in", config, weights))
    logits, _ = assert_computes_the_reference(head, target, config, weights)
    _, (normed, _) = drafted(head, target, {**config, "norm_output": True}, weights)
    assert (logits - normed).abs().max() > 1


def test_vllm_norm_before_residual_starts_the_residual_from_the_normed_hidden(tmp_path, target):
    config = {**ORIGINAL, "norm_before_residual": True}
    weights = published_weights(config)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "in", config, weights)).attach(target)
    logits, _ = assert_computes_the_reference(head, target, config, weights)
    _, (after, _) = drafted(head, target, {**config, "norm_before_residual": False}, weights)
    assert (logits - after).abs().max() > 1


MROPE = [
    {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 1000000.0},  # Qwen2.5-VL heads
    {"rope_scaling": {"rope_type": "mrope", "mrope_section": [2, 3, 3]}, "rope_theta": 1000000.0},
    # transformers 5 writes rope_parameters; its VL configs turn mrope into rope_type default plus mrope_section
    {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}},
    {"rope_parameters": {"rope_type": "mrope", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                         "rope_theta": 1000000.0}},
]


@pytest.mark.parametrize("rope", MROPE, ids=["rope_scaling-type", "rope_scaling-rope_type", "rope_parameters-default",
                                             "rope_parameters-mrope"])
def test_mrope_heads_rotate_text_positions_like_the_default_rope(tmp_path, target, rope):
    """A text token's (time, height, width) positions are all its position: mrope is the default rope there."""
    config = {**SPECFORGE_31, "head_dim": 16, "fc_norm": False} | rope
    plain = {**SPECFORGE_31, "head_dim": 16, "fc_norm": False, "rope_theta": 1000000.0}
    weights = published_weights(config, embed=True)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "mrope", config, weights))
    default = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "default", plain, weights))
    logits, _ = assert_computes_the_reference(head, target, config, weights)
    assert torch.equal(logits, drafted(default, target, plain, weights)[0][0])


@pytest.mark.parametrize("change,message", [
    ({"norm_before_fc": True}, "norm_before_fc = true"),
    ({"eagle_config": {"norm_before_fc": True}}, "eagle_config.norm_before_fc = true"),
    ({"eagle_config": {"use_aux_hidden_state": False}}, "use_aux_hidden_state = false"),
    ({"fc_norm": 1}, "fc_norm = 1 is not allowed; expected true or false"),
    ({LAYER_IDS: [2, 4, 6], "eagle_config": {LAYER_IDS: [2, 4, 6]}},
     r"name different target layers.*Keep the key the head was trained with"),
])
def test_variants_we_cannot_compute_are_refused_by_name(tmp_path, change, message):
    folder = write_folder(tmp_path / "in", ORIGINAL | change, published_weights(ORIGINAL))
    with pytest.raises(ValueError, match=message):
        Eagle3Drafter.from_pretrained(folder)


# --- saved folders, read the way vLLM and SGLang read them ----------------------------------------------------------

# Parameter names vLLM's llama_eagle3.py places (after renaming midlayer. to layers.0.); d2t becomes
# draft_id_to_target_id and t2d is skipped. Any other tensor is a KeyError there.
VLLM_WEIGHTS = {"fc.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight", "d2t", "t2d"} | {
    f"midlayer.{name}.weight" for name in ("hidden_norm", "input_layernorm", "post_attention_layernorm",
                                           "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def vllm_reads(config: dict, weights: dict, target_layers: int) -> dict:
    """What vLLM's EAGLE-3 path computes with, from config.json and the weights (model_executor/models/
    llama_eagle3.py, transformers_utils/configs/eagle.py, the aux-layer helper of spec_decode/eagle3)."""
    arch = config["architectures"][0]  # with method "eagle3", anything else is renamed Eagle3<arch>
    assert arch in ("Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3") or f"Eagle3{arch}" == "Eagle3LlamaForCausalLM"
    ids = config.get(LAYER_IDS)  # a layer id is captured as the stream entering that layer: hidden_states[id]
    captured = list(ids) if ids else [2, target_layers // 2, target_layers - 3]
    draft_vocab = config.get("draft_vocab_size") or config["vocab_size"]
    d2t = weights.get("d2t", torch.zeros(draft_vocab, dtype=torch.long))  # absent: its zero buffer stays
    return {"captured": captured, "draft_to_target": torch.arange(draft_vocab) + d2t,
            "fc_in": 3 * config.get("target_hidden_size", config["hidden_size"]),
            "uses_aux": (config.get("eagle_config") or {}).get("use_aux_hidden_state", True),
            "norm_before_residual": config.get("norm_before_residual", False),
            "layers": config["num_hidden_layers"], "unplaced": sorted(set(weights) - VLLM_WEIGHTS)}


def sglang_reads(config: dict, weights: dict, target_layers: int) -> dict:
    """What SGLang's EAGLE-3 path computes with (models/llama_eagle3.py, the draft config read in model_runner.py
    and eagle_worker.py, set_eagle3_layers_to_capture of the target, get_draft_hidden_dim)."""
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]  # the EntryClass it dispatches to
    eagle_config = config.get("eagle_config")
    try:
        uses_aux, ids = eagle_config.get("use_aux_hidden_state", True), eagle_config[LAYER_IDS]
    except (AttributeError, KeyError):  # model_runner: no eagle_config or no ids -> the default layers
        uses_aux, ids = True, None
    # layers_to_capture = id + 1, and layer j captures the stream entering it: hidden_states[id + 1]
    captured = [2, target_layers // 2, target_layers - 3] if ids is None else [i + 1 for i in ids]
    draft_vocab = config["draft_vocab_size"]  # read as an attribute: must be there (null: the target's lm_head)
    assert draft_vocab is not None
    hot = weights["d2t"] + torch.arange(draft_vocab) if "d2t" in weights else torch.arange(draft_vocab)
    aux = (eagle_config or {}).get("use_aux_hidden_state", False)  # get_draft_hidden_dim's own default
    features = max(len((eagle_config or {}).get(LAYER_IDS, [])), 1)
    width = config.get("target_hidden_size", config["hidden_size"]) * features
    return {"captured": captured, "draft_to_target": hot, "fc_in": width if aux else None, "uses_aux": uses_aux,
            "layers": config["num_hidden_layers"]}


def published_original(tmp_path, target):
    weights = published_weights(ORIGINAL, mapping=False)
    return Eagle3Drafter.from_pretrained(write_folder(tmp_path / "original", ORIGINAL, weights)).attach(target)


def published_specforge(tmp_path, target):
    config = {**SPECFORGE_31, "fc_norm": False, "eagle_config": {LAYER_IDS: [0, 3, 5], "use_aux_hidden_state": True}}
    return Eagle3Drafter.from_pretrained(write_folder(tmp_path / "specforge", config,
                                                      published_weights(config, embed=True)))


HEADS_TO_SAVE = {
    "ours, default layers": lambda tmp, t: Eagle3Drafter.for_target(t, draft_vocab_size=DRAFT_VOCAB, seed=0),
    "ours, chosen layers": lambda tmp, t: Eagle3Drafter.for_target(t, feature_layers=[1, 4, 7], seed=0),
    "EAGLE original, no ids, no d2t": published_original,
    "SpecForge, layer outputs 0, 3, 5": published_specforge,
}


@pytest.mark.parametrize("make", HEADS_TO_SAVE.values(), ids=HEADS_TO_SAVE.keys())
def test_saved_folders_read_in_vllm_and_sglang_as_we_compute_them(tmp_path, target, make):
    head = make(tmp_path, target)
    folder = head.save_pretrained(tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    ours = {"captured": head.feature_layers, "fc_in": head.fc.in_features,
            "draft_to_target": head.to_target_ids(torch.arange(head.config.draft_vocab_size))}
    for engine in (vllm_reads(config, weights, TARGET_LAYERS), sglang_reads(config, weights, TARGET_LAYERS)):
        assert engine["captured"] == ours["captured"]
        assert torch.equal(engine["draft_to_target"], ours["draft_to_target"])
        assert engine["fc_in"] == ours["fc_in"] and engine["uses_aux"] and engine["layers"] == 1  # one layer
    vllm = vllm_reads(config, weights, TARGET_LAYERS)
    assert vllm["norm_before_residual"] == head.config.norm_before_residual and vllm["unplaced"] == []
    # the layer ids are written once per engine convention, and read back as one list
    assert config[LAYER_IDS] == [i + 1 for i in config["eagle_config"][LAYER_IDS]] == head.feature_layers
    again = Eagle3Drafter.from_pretrained(folder)
    assert again.feature_layers == head.feature_layers and LAYER_IDS not in again.config.raw["eagle_config"]
    assert json.loads((again.save_pretrained(tmp_path / "again") / "config.json").read_text()) == config


def test_a_head_saved_before_any_target_names_no_layers_and_engines_pick_ours(tmp_path, target):
    """Without a target the default layers are unknown: none are written, and both engines then capture what the
    head reads once attached (hidden_states 2, L/2, L-3)."""
    weights = published_weights(ORIGINAL, mapping=False)
    head = Eagle3Drafter.from_pretrained(write_folder(tmp_path / "in", ORIGINAL, weights))
    folder = head.save_pretrained(tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    assert LAYER_IDS not in config and "eagle_config" not in config
    attached = head.attach(target)
    for engine in (vllm_reads(config, weights, TARGET_LAYERS), sglang_reads(config, weights, TARGET_LAYERS)):
        assert engine["captured"] == attached.feature_layers == [2, 4, 5]
