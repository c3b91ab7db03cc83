"""What an install brings: core dependencies only what import and generate() need, extras named when missing."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import extra_requirements

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
DISTRIBUTION = {"yaml": "pyyaml"}  # module -> the distribution that installs it, where the names differ


def run_python(script: str, **env) -> str:
    import os

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


@pytest.mark.parametrize("extra", ["gguf", "cli", "bench", "train", "demo"])
def test_each_extra_installs_the_modules_its_error_message_promises(extra):
    from hf_whiflash.extras import EXTRAS

    declared = {requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for requirement in extra_requirements(PROJECT["optional-dependencies"], extra)}
    assert {DISTRIBUTION.get(module, module) for module in EXTRAS[extra]} <= declared


def test_core_dependencies_hold_no_extra():
    from hf_whiflash.extras import EXTRAS

    core = {requirement.split(">")[0].split("<")[0].strip().lower() for requirement in PROJECT["dependencies"]}
    assert core.isdisjoint(DISTRIBUTION.get(m, m) for modules in EXTRAS.values() for m in modules)


def test_import_loads_nothing_heavy_and_every_public_name_resolves():
    """`import hf_whiflash` is lazy (whiflash --help imports the package); each name comes from its module."""
    script = ("import sys, hf_whiflash\n"
              "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
              "names = [name for name in hf_whiflash.__all__ if getattr(hf_whiflash, name) is None]\n"
              "print(heavy, names, set(hf_whiflash.__all__) <= set(dir(hf_whiflash)))")
    assert run_python(script) == "[] [] True"
    with pytest.raises(AttributeError, match="module 'hf_whiflash' has no attribute 'Nope'"):
        import hf_whiflash

        hf_whiflash.Nope


def test_every_module_imports_and_generates_without_any_extra(tmp_path):
    """With every optional module missing, the package imports whole, generate() with an assistant runs, and a
    packaged (GGUF) target that must be converted names the extra it needs before downloading anything."""
    # Not tqdm and yaml: transformers and huggingface_hub depend on them themselves.
    blocked = ["gguf", "accelerate", "rich", "matplotlib", "gradio"]
    script = f"""
import importlib, pkgutil, sys
for module in {blocked}:
    sys.modules[module] = None  # as if not installed: importing it raises ImportError
import hf_whiflash
for info in pkgutil.walk_packages(hf_whiflash.__path__, "hf_whiflash."):
    importlib.import_module(info.name)
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from hf_whiflash import Eagle3Drafter, WhiFlashAssistant, load_target
torch.manual_seed(0)  # random weights: unseeded, greedy decoding ended early on EOS now and then
target = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
assistant = WhiFlashAssistant(target, Eagle3Drafter.for_target(target), eagle_steps=2)
out = target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, assistant_model=assistant)
try:
    load_target()
except hf_whiflash.MissingExtraError as error:
    print(out.shape[1], error)
"""
    line = run_python(script, HF_WHIFLASH_CACHE=str(tmp_path))
    assert line == ('7 loading SmolLM2-135M-Instruct (converted once from the GGUF SmolLM2-135M-Instruct.Q4_1.gguf) '
                    'needs gguf, accelerate, which is not installed: pip install "hf-whiflash[gguf]"')
    assert list(tmp_path.iterdir()) == []  # nothing downloaded


def test_wheels_are_read_never_installed(tmp_path, monkeypatch):
    """A data package is unpacked from its wheel (once) into the given folder: pip's environment does not list it."""
    from helpers import write_wheel

    from hf_whiflash.wheels import unpacked

    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index, "some-data", "2.0", {"some_data/data/rows.jsonl": b'{"a": 1}\n'})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    folder = unpacked("some-data==2.0", tmp_path / "packages")
    assert (folder / "some_data" / "data" / "rows.jsonl").read_text() == '{"a": 1}\n'
    assert [p.name for p in (tmp_path / "packages").iterdir()] == ["some_data-2.0"]  # no wheel or partial folder
    (index / "some_data-2.0-py3-none-any.whl").unlink()
    assert unpacked("some-data==2.0", tmp_path / "packages") == folder  # unpacked once: no second download
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("some-data")
