"""Published Hub layouts load exactly, save back to the same layout, and round-trip bit-exactly."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from hf_whiflash import CheckpointError, DFlashDrafter, Eagle3Drafter

# Tiny shapes; every name and shape below is written from the published layouts, not from our modules.
H, HEADS, KV, INTER, VOCAB, DRAFT_VOCAB = 32, 4, 2, 64, 100, 40


def tensors(shapes: dict, dtype, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g).to(dtype) for name, shape in shapes.items()}


def eagle3_weights(dtype, head_dim=H // HEADS, target_hidden=H, embed=False) -> dict:
    attn = HEADS * head_dim
    shapes = {
        "fc.weight": (H, 3 * target_hidden),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (attn, 2 * H),
        "midlayer.self_attn.k_proj.weight": (KV * head_dim, 2 * H),
        "midlayer.self_attn.v_proj.weight": (KV * head_dim, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, attn),
        "midlayer.mlp.gate_proj.weight": (INTER, H),
        "midlayer.mlp.up_proj.weight": (INTER, H),
        "midlayer.mlp.down_proj.weight": (H, INTER),
        "norm.weight": (H,),
        "lm_head.weight": (DRAFT_VOCAB, H),
    }
    if embed:
        shapes["embed_tokens.weight"] = (VOCAB, H)
    weights = tensors(shapes, dtype)
    used = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:DRAFT_VOCAB].sort().values
    weights["d2t"] = used - torch.arange(DRAFT_VOCAB)
    weights["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, used, True)
    return weights


def dflash_weights(dtype, layers=2, n_targets=2, head_dim=16) -> dict:
    shapes = {"fc.weight": (H, n_targets * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, H),
            p + "self_attn.k_proj.weight": (KV * head_dim, H),
            p + "self_attn.v_proj.weight": (KV * head_dim, H),
            p + "self_attn.o_proj.weight": (H, HEADS * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,),
            p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate_proj.weight": (INTER, H),
            p + "mlp.up_proj.weight": (INTER, H),
            p + "mlp.down_proj.weight": (H, INTER),
        }
    return tensors(shapes, dtype)


EAGLE3_ORIGINAL = {  # yuhuili/EAGLE3-LLaMA3.1-Instruct-8B style: LlamaForCausalLM, no rope_theta
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": H, "intermediate_size": INTER, "initializer_range": 0.02,
    "max_position_embeddings": 2048, "num_attention_heads": HEADS, "num_key_value_heads": KV,
    "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.28.1", "use_cache": True, "vocab_size": VOCAB, "draft_vocab_size": DRAFT_VOCAB,
}
EAGLE3_SPECFORGE = {  # SpecForge/lmsys style: LlamaForCausalLMEagle3, llama3 rope, explicit head_dim and aux layers
    **EAGLE3_ORIGINAL, "architectures": ["LlamaForCausalLMEagle3"], "torch_dtype": "bfloat16", "head_dim": 16,
    "rope_theta": 500000.0, "target_hidden_size": 48,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 1024, "rope_type": "llama3"},
    "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 5, 9], "use_aux_hidden_state": True},
}
DFLASH_ZLAB = {  # z-lab/Qwen3-8B-DFlash-b16 style
    "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0, "block_size": 16,
    "dflash_config": {"mask_token_id": 99, "target_layer_ids": [1, 9]}, "dtype": "bfloat16", "head_dim": 16,
    "hidden_act": "silu", "hidden_size": H, "intermediate_size": INTER, "layer_types": ["full_attention"] * 2,
    "max_position_embeddings": 40960, "max_window_layers": 2, "num_attention_heads": HEADS,
    "num_hidden_layers": 2, "num_key_value_heads": KV, "num_target_layers": 12, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
}


def write_checkpoint(folder, config, weights, fmt="safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(weights, folder / "model.safetensors")
    elif fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    elif fmt == "sharded":  # two shards plus index, as transformers writes large checkpoints
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: weights[k] for k in keys}, folder / shard)
        index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def assert_same_weights(model, weights):
    state = model.state_dict()
    assert set(state) == set(weights)
    for name, tensor in weights.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def assert_round_trip(model, weights, config, tmp_path):
    out = model.save_pretrained(tmp_path / "saved")
    assert json.loads((out / "config.json").read_text()) == config
    reloaded = type(model).from_pretrained(out)
    assert_same_weights(reloaded, weights)
    return reloaded


# What save_pretrained adds to a published config: the fields vLLM and SGLang read (test_eagle3_variants.py reads
# our saved configs the way they do).
ENGINE_FIELDS = {"architectures": ["LlamaForCausalLMEagle3"], "norm_before_residual": False}
SAVED_ADDS = {
    "eagle3-original-bin": ENGINE_FIELDS | {"target_hidden_size": H},
    "eagle3-specforge-embed": ENGINE_FIELDS | {"eagle_aux_hidden_state_layer_ids": [2, 6, 10]},
    "eagle3-sharded": ENGINE_FIELDS | {"target_hidden_size": H},
}

CASES = [
    ("eagle3-original-bin", Eagle3Drafter, EAGLE3_ORIGINAL, lambda: eagle3_weights(torch.float16), "bin"),
    ("eagle3-specforge-embed", Eagle3Drafter, EAGLE3_SPECFORGE,
     lambda: eagle3_weights(torch.bfloat16, head_dim=16, target_hidden=48, embed=True), "safetensors"),
    ("eagle3-sharded", Eagle3Drafter, EAGLE3_ORIGINAL, lambda: eagle3_weights(torch.float32), "sharded"),
    ("dflash-zlab", DFlashDrafter, DFLASH_ZLAB, lambda: dflash_weights(torch.bfloat16), "safetensors"),
    ("dflash-bin", DFlashDrafter, DFLASH_ZLAB, lambda: dflash_weights(torch.float32), "bin"),
]


@pytest.mark.parametrize("name,cls,config,make_weights,fmt", CASES, ids=[c[0] for c in CASES])
def test_published_layout_loads_and_round_trips(tmp_path, name, cls, config, make_weights, fmt):
    weights = make_weights()
    model = cls.from_pretrained(write_checkpoint(tmp_path / name, config, weights, fmt))
    assert_same_weights(model, weights)
    assert_round_trip(model, weights, config | SAVED_ADDS.get(name, {}), tmp_path)


def test_eagle3_config_fields_are_read_as_published(tmp_path):
    original = Eagle3Drafter.from_pretrained(
        write_checkpoint(tmp_path / "o", EAGLE3_ORIGINAL, eagle3_weights(torch.float16), "bin"))
    assert original.config.rope_theta == 10000.0  # no rope_theta in old checkpoints
    assert original.config.rope_scaling is None
    assert original.config.head_dim == H // HEADS
    assert original.feature_layers is None  # decided by the target's depth at attach time
    assert not hasattr(original, "embed_tokens")
    used = torch.nonzero(original.t2d).squeeze(1)
    assert torch.equal(original.to_target_ids(torch.arange(DRAFT_VOCAB)), used)

    specforge = Eagle3Drafter.from_pretrained(write_checkpoint(
        tmp_path / "s", EAGLE3_SPECFORGE, eagle3_weights(torch.bfloat16, 16, 48, True)))
    assert specforge.config.rope_theta == 500000.0
    assert specforge.config.rope_scaling["rope_type"] == "llama3"
    assert specforge.feature_layers == [2, 6, 10]  # layer outputs 1, 5, 9 = hidden_states 2, 6, 10
    assert specforge.fc.in_features == 3 * 48
    assert specforge.embed_tokens.weight.dtype == torch.bfloat16


def test_dflash_target_layers_default_from_num_target_layers(tmp_path):
    config = {**DFLASH_ZLAB, "dflash_config": {"mask_token_id": 7}, "num_target_layers": 36,
              "num_hidden_layers": 5, "layer_types": ["full_attention"] * 5}
    model = DFlashDrafter.from_pretrained(write_checkpoint(tmp_path, config, dflash_weights(torch.float32, 5, 5)))
    assert model.target_layer_ids == [1, 9, 17, 25, 33]
    assert model.feature_layers == [2, 10, 18, 26, 34]
    assert model.block_size == 16 and model.mask_token_id == 7


def test_saving_pytorch_bin_keeps_the_original_format(tmp_path):
    weights = eagle3_weights(torch.float16)
    model = Eagle3Drafter.from_pretrained(write_checkpoint(tmp_path / "in", EAGLE3_ORIGINAL, weights, "bin"))
    out = model.save_pretrained(tmp_path / "out", safe_serialization=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert_same_weights(Eagle3Drafter.from_pretrained(out), weights)
    # a stale safetensors file would shadow the new .bin: refuse instead of silently loading the old weights
    Eagle3Drafter.from_pretrained(out).save_pretrained(tmp_path / "both")
    with pytest.raises(CheckpointError, match="shadow"):
        model.save_pretrained(tmp_path / "both", safe_serialization=False)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights_raise_an_error_naming_the_file(tmp_path, fmt):
    folder = write_checkpoint(tmp_path, DFLASH_ZLAB, dflash_weights(torch.float32), fmt)
    path = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)) as err:
        DFlashDrafter.from_pretrained(folder)
    assert "truncated or corrupted" in str(err.value)


def test_corrupted_header_and_config_raise_clear_errors(tmp_path):
    folder = write_checkpoint(tmp_path / "a", DFLASH_ZLAB, dflash_weights(torch.float32))
    path = folder / "model.safetensors"
    path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DFlashDrafter.from_pretrained(folder)

    folder = write_checkpoint(tmp_path / "b", DFLASH_ZLAB, dflash_weights(torch.float32))
    (folder / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        DFlashDrafter.from_pretrained(folder)


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    wrong_shape = write_checkpoint(tmp_path / "shape", {**EAGLE3_ORIGINAL, "intermediate_size": 128},
                                   eagle3_weights(torch.float32))
    with pytest.raises(CheckpointError, match="midlayer.mlp.*shape"):
        Eagle3Drafter.from_pretrained(wrong_shape)
    # (a full draft vocabulary: a reduced one without d2t/t2d is refused for that, see test_eagle3_variants.py)
    dflash_as_eagle = write_checkpoint(tmp_path / "kind", {**EAGLE3_ORIGINAL, "draft_vocab_size": VOCAB},
                                       dflash_weights(torch.float32))
    with pytest.raises(CheckpointError, match="right kind of drafter"):
        Eagle3Drafter.from_pretrained(dflash_as_eagle)


def test_unsupported_and_incomplete_configs_are_rejected(tmp_path):
    # transformers (and so vLLM and SGLang) ignore sliding_window unless use_sliding_window is set
    sliding = {**DFLASH_ZLAB, "layer_types": ["sliding_attention"] * 2, "sliding_window": 2048}
    with pytest.raises(CheckpointError, match="sliding-window layers need a window"):
        DFlashDrafter.from_pretrained(write_checkpoint(tmp_path / "s", sliding, dflash_weights(torch.float32)))
    no_mask = {**DFLASH_ZLAB, "dflash_config": {"target_layer_ids": [1, 9]}}
    with pytest.raises(CheckpointError, match="mask_token_id is missing"):
        DFlashDrafter.from_pretrained(write_checkpoint(tmp_path / "m", no_mask, dflash_weights(torch.float32)))
    with pytest.raises(CheckpointError, match="no config.json"):
        DFlashDrafter.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):  # a path, not a Hub id: no download
        DFlashDrafter.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_saved_drafters_follow_the_umask(tmp_path, umask, safe):
    """Another user of a shared folder reads what the umask allows (a temporary file made them 0600 whatever
    the umask was)."""
    model = DFlashDrafter.from_pretrained(write_checkpoint(tmp_path / "in", DFLASH_ZLAB, dflash_weights(torch.float32)))
    old = os.umask(umask)
    try:
        out = model.save_pretrained(tmp_path / "shared" / "dflash", safe_serialization=safe)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "config.json": 0o666 & ~umask, "model.safetensors" if safe else "pytorch_model.bin": 0o666 & ~umask}


@pytest.mark.parametrize("fmt,bad_file", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin"),
                                          ("sharded", "model-00002-of-00002.safetensors")])  # both bad ones in it
def test_non_finite_weights_are_refused_naming_file_and_tensors(tmp_path, fmt, bad_file):
    """NaN or inf in weights loads like any number and only shows as garbage drafts: refuse it at load."""
    weights = eagle3_weights(torch.float32)
    weights["midlayer.mlp.up_proj.weight"][3, 5] = float("nan")
    weights["norm.weight"][0] = float("-inf")
    folder = write_checkpoint(tmp_path, EAGLE3_ORIGINAL, weights, fmt)
    with pytest.raises(CheckpointError) as err:
        Eagle3Drafter.from_pretrained(folder)
    prefix = f"{folder / bad_file}: non-finite values (NaN or inf) in "
    message = str(err.value)
    assert message.startswith(prefix)
    assert set(message[len(prefix):].split(". ")[0].split(", ")) == {"midlayer.mlp.up_proj.weight", "norm.weight"}


def test_assistant_folder_round_trips_through_the_hub(tiny, tmp_path, monkeypatch):
    """push_to_hub uploads what save_pretrained writes; from_pretrained(target, repo_id) fetches it back (a fake
    Hub in a folder: no network here)."""
    import shutil
    from pathlib import Path

    import huggingface_hub
    from transformers import AutoModelForCausalLM

    from hf_whiflash import WhiFlashAssistant

    hub = tmp_path / "hub"

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    def fake_snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    target = AutoModelForCausalLM.from_pretrained(tiny / "target").eval()
    original = WhiFlashAssistant.from_pretrained(target, tiny / "drafters")
    assert original.push_to_hub("me/whiflash-tiny", model_card="# card\n").endswith("/commit/1")
    assert (hub / "me/whiflash-tiny" / "README.md").read_text() == "# card\n"
    loaded = WhiFlashAssistant.from_pretrained(target, "me/whiflash-tiny")
    assert not Path("me/whiflash-tiny").exists() and set(loaded.drafters) == set(original.drafters)
    assert loaded.lookup.settings() == original.lookup.settings()
    for route, drafter in ((r, d) for r, d in original.drafters.items() if r != "lookup"):
        for key, tensor in drafter.state_dict().items():
            assert torch.equal(loaded.drafters[route].state_dict()[key], tensor), (route, key)
    assert type(loaded.policy) is type(original.policy)
    assert (loaded.eagle_steps, loaded.dflash_block_size) == (original.eagle_steps, original.dflash_block_size)
