"""Drafter folders in the published Hub layouts: config.json plus safetensors or pytorch_model.bin weights.

Both drafters load and save through `HubMixin`; the config is kept as the dict that was read, so
`save_pretrained` writes back the same keys (and other engines keep reading what we write).
"""

import contextlib
import copy
import errno
import glob
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .names import ACCEPTANCE_FILE, CONFIDENCE_BINS, GREEDY, SAMPLED
from .settings import Rule, check, integer, json_object

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A drafter folder that cannot be used as it is; the message names the file and the fix."""


class DrafterConfig:
    """A drafter's config.json as a dict, with attribute access and the derived fields both drafters need."""

    required: tuple[str, ...] = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    # The numbers the drafter is built from, checked when read (other keys are kept as they are); nested_rules:
    # the same for a nested object (e.g. dflash_config).
    rules: dict[str, Rule] = {key: integer(1) for key in required} | {
        "num_key_value_heads": integer(1, unset=True), "head_dim": integer(1, unset=True)}
    nested_rules: dict[str, dict[str, Rule]] = {}

    def __init__(self, raw: dict, source: str = "config.json"):
        missing = [key for key in self.required if key not in json_object(raw, source)]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {missing} for {type(self).__name__}.")
        check({key: raw[key] for key in self.rules if key in raw}, self.rules, source)
        for name, rules in self.nested_rules.items():
            nested = json_object(raw.get(name) or {}, f"{source}: {name}")
            check({key: nested[key] for key in rules if key in nested}, rules, f"{source}: {name}")
        self.__dict__["raw"] = copy.deepcopy(raw)
        self.__dict__["source"] = source

    def __getattr__(self, name):
        try:
            return self.__dict__["raw"][name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}") from None

    def __setattr__(self, name, value):
        self.raw[name] = value

    def get(self, name, default=None):
        return self.raw.get(name, default)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)

    @property
    def head_dim(self) -> int:
        return self.raw.get("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.raw.get("num_key_value_heads") or self.num_attention_heads

    @property
    def rms_norm_eps(self) -> float:
        return self.raw.get("rms_norm_eps", 1e-6)

    @property
    def rope_theta(self) -> float:
        # Older EAGLE checkpoints carry no rope_theta at all; transformers 5 nests it in rope_parameters.
        nested = self.raw.get("rope_parameters") or {}
        return float(nested.get("rope_theta", self.raw.get("rope_theta", 10000.0)))

    @property
    def rope_scaling(self) -> dict | None:
        scaling = self.raw.get("rope_scaling") or self.raw.get("rope_parameters")
        # mrope (vision-language heads) rotates sections of each head by a (time, height, width) position; a text
        # token has all three equal to its position, which makes it the default rope.
        if not scaling or scaling.get("rope_type", scaling.get("type", "default")) in ("default", "mrope"):
            return None
        return {k: v for k, v in scaling.items() if k != "rope_theta"}


def resolve_folder(path_or_hub_id: str | os.PathLike, revision: str | None = None, token=None) -> Path:
    """A local folder as is, or the snapshot of a Hub repo (downloaded once, then served from the HF cache)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    if path.is_absolute() or str(path_or_hub_id).startswith((".", "~")) or len(path.parts) > 2:
        raise FileNotFoundError(f"{path} does not exist (and is no Hub repo id, which looks like 'namespace/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(path_or_hub_id),
                revision=revision,
                token=token,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.py", "*.md"],
            )
        )
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"{path_or_hub_id!r} is not a local folder and could not be fetched from the Hub ({exc}). "
            "Pass a folder with config.json and weights, or a reachable Hub repo id."
        ) from exc


def push_folder(save, repo_id: str, *, token=None, private: bool | None = None, model_card: str | None = None,
                commit_message: str) -> str:
    """Upload what `save(folder)` writes (plus `model_card` as README.md) to a Hub repo; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        if model_card is not None:
            Path(tmp, "README.md").write_text(model_card)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message).commit_url


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is this a drafter checkpoint folder?")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; errors name the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is truncated or corrupted.") from exc
    return json_object(data, str(path))


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, safetensors preferred, single file or shards from an index."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{folder} has no weights: expected {SAFETENSORS} or {PYTORCH_BIN} (or a sharded index).")


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the weight index but missing; download the checkpoint again.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). "
            "The file is truncated or corrupted; download or save the checkpoint again."
        ) from exc


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A NaN or inf weight reads like any other number and would only show up as garbage drafts: refuse it."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise CheckpointError(
            f"{path}: non-finite values (NaN or inf) in {', '.join(bad[:8])}{more}. The weights are corrupted "
            "or training diverged; download or save the checkpoint again, or use an earlier one."
        )


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        tensors = _read_one(path)
        _check_finite(path, tensors)
        state.update(tensors)
    return state, files


@contextlib.contextmanager
def writer_lock(folder: Path, waiting_note: str | None = None):
    """The right to write into `folder`: an exclusive flock on the folder itself.

    The kernel releases it when its holder exits or is killed, so whoever holds it knows that every temporary
    name there (temporary_sibling) was left by a writer that died: no live process is writing it. A pid in the
    name could not tell that as surely (pids are reused, and a folder shared between containers sees pids from
    other namespaces). `waiting_note` is printed when another writer holds the lock (for long waits).
    Not reentrant: its holder must not write files into `folder` itself through replace_atomically (which takes it).
    """
    try:
        import fcntl  # POSIX only
    except ImportError:  # Windows: no lock (a file that a live writer holds open cannot be removed there anyway)
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_note:
                print(waiting_note, file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path` that a writer of `path` writes to before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")


# The temporary names writers of NAME use beside it: temporary_sibling's, and those of older versions (drafter and
# settings files: .NAME.PID.HEX.tmp; converted targets: .NAME.partial-HEX).
LEFTOVER = re.compile(r"\.(tmp-[0-9a-f]+|partial-[0-9a-f]+|\d+\.[0-9a-f]+\.tmp)")


def remove_leftovers(path: Path) -> None:
    """Remove what killed writers of `path` left beside it (files or folders under a temporary name), saying so.
    Call it holding writer_lock(path.parent), so that no live writer is among them. A leftover this user may not
    remove (a shared folder) stays: it is hidden and never read."""
    prefix = f".{path.name}"
    for stale in path.parent.glob(f"{glob.escape(prefix)}.*"):
        if not LEFTOVER.fullmatch(stale.name[len(prefix):]):
            continue
        print(f"removing {stale}, left by a writer that was killed", file=sys.stderr)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def replace_atomically(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so an interrupted save never leaves a half file; the
    leftovers of earlier interrupted writes of `path` are removed first.

    The saved file gets the permissions of any new file (0666 minus the umask), so a folder shared with other
    users stays readable by them: the temporary file is created with 0666 for the kernel to apply the umask
    (mkstemp would force 0600), and that mode is put back after `write`, since safetensors writes 0600 files.
    """
    with writer_lock(path.parent):
        remove_leftovers(path)
        tmp = temporary_sibling(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def replace_folder_atomically(folder: Path, write) -> None:
    """Build a folder with `write(tmp)` in a temporary sibling, then put it in place of `folder` whole (never merged
    into an existing one), so that a reader sees the old folder or the new one, never a mix. The caller holds
    writer_lock(folder.parent); leftovers of killed writes of `folder` are removed first.

    An existing folder is swapped with the new one in one step where the system can (Linux renameat2 with
    RENAME_EXCHANGE); elsewhere it is renamed to a temporary name just before the new one is renamed into place,
    and between those two renames (microseconds) `folder` does not exist. A writer killed in between leaves both
    under temporary names: the next writer removes them, and a reader finds no folder until then.
    Each path a reader opens is in the old folder or the new one; a load that straddles the swap may still
    fail (the old files are removed right after it) and is then simply repeated.
    """
    remove_leftovers(folder)
    tmp = temporary_sibling(folder)
    tmp.mkdir()  # not mkdtemp, which makes it 0700: other users of a shared folder could not read it
    try:
        write(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif not _exchange(tmp, folder):
            old = temporary_sibling(folder)
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)  # the old folder back rather than none
                raise
            tmp = old
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old folder


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem cannot."""
    import ctypes

    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.5
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_acceptance(folder: Path, tokens_per_round: dict[str, dict[int, float]],
                     by_confidence: dict[str, list[float]] | None = None) -> None:
    profile = {mode: {str(k): round(v, 4) for k, v in sorted(by_length.items())}
               for mode, by_length in tokens_per_round.items()}
    data = {"tokens_per_round": profile}
    if by_confidence is not None:
        data["acceptance_by_confidence"] = {mode: [round(c, 4) for c in bins] for mode, bins in by_confidence.items()}
    write_text_atomically(folder / ACCEPTANCE_FILE, json.dumps(data, indent=1) + "\n")


def read_acceptance(folder: Path) -> tuple[dict[str, dict[int, float]] | None, dict[str, list[float]] | None]:
    """A drafter folder's acceptance profile (mode -> draft length -> tokens per round) and, where measured, its
    acceptance by confidence (mode -> chance per confidence bin); None for what it does not ship."""
    path = folder / ACCEPTANCE_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
        profile = {mode: {int(k): float(v) for k, v in data["tokens_per_round"][mode].items()}
                   for mode in (GREEDY, SAMPLED)}
        bins = data.get("acceptance_by_confidence")
        by_confidence = {mode: [float(c) for c in bins[mode]] for mode in (GREEDY, SAMPLED)} if bins else None
        if by_confidence and any(len(b) != CONFIDENCE_BINS for b in by_confidence.values()):
            raise ValueError(f"acceptance_by_confidence needs {CONFIDENCE_BINS} bins per mode")
        return profile, by_confidence
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{path} is not an acceptance profile ({error!r}): expected "
                              '{"tokens_per_round": {"greedy": {"<draft length>": <tokens>, ...}, "sampling": '
                              '{...}}, optionally "acceptance_by_confidence": {"greedy": [<chance per bin> x '
                              f'{CONFIDENCE_BINS}], "sampling": [...]}}}}; delete it or rerun '
                              'recipes/profile_acceptance.py') from None


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor], safe_serialization: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name, shadowing = (SAFETENSORS, PYTORCH_BIN) if safe_serialization else (PYTORCH_BIN, SAFETENSORS)
    if not safe_serialization and (folder / shadowing).exists():
        # Loaders prefer safetensors: the new .bin would be silently ignored. Refuse rather than delete user files.
        raise CheckpointError(
            f"{folder / shadowing} exists and would shadow the new {name}; save to an empty folder or remove it."
        )
    tensors = {key: t.detach().to("cpu").contiguous() for key, t in state.items()}
    if safe_serialization:
        replace_atomically(folder / name, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        replace_atomically(folder / name, lambda tmp: torch.save(tensors, tmp))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_text_atomically(folder / "config.json", text)
    return folder


class HubMixin:
    """from_pretrained / save_pretrained / push_to_hub for an nn.Module drafter with a `config` (DrafterConfig)."""

    config_class: type[DrafterConfig]
    # Mean tokens per round (accepted drafts + 1) by decoding mode ("greedy", "sampling") and draft length,
    # measured on a dev set by recipes/profile_acceptance.py; None when unknown. With round costs measured on
    # the user's machine it decides the draft length of each mode (calibration.py).
    tokens_per_round: dict[str, dict[int, float]] | None = None
    # By mode: the chance that a draft is accepted (given the drafts before it were), per bin of the drafter's
    # confidence in it (CONFIDENCE_BINS equal bins of [0, 1]), measured on the same dev set. Dynamic lengths
    # (calibration.DraftCut) read confidences through it; None: taken at face value.
    acceptance_by_confidence: dict[str, list[float]] | None = None

    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, dtype=None, device=None, revision=None, token=None,
                        read_profile: bool = True):
        """`read_profile=False` leaves the folder's acceptance profile unread (profile_acceptance.py replaces it)."""
        folder = resolve_folder(path_or_hub_id, revision, token)
        config = cls.config_class(read_config(folder), source=str(folder / "config.json"))
        state, files = read_weights(folder)
        model = cls(config, **cls._modules_for(state))
        model._load_strict(state, files)
        if read_profile:
            model.tokens_per_round, model.acceptance_by_confidence = read_acceptance(folder)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model

    @classmethod
    def _modules_for(cls, state: dict) -> dict:
        """Constructor flags for optional modules the checkpoint carries (e.g. its own embedding)."""
        return {}

    def _load_strict(self, state: dict[str, torch.Tensor], files: list[Path]) -> None:
        where = ", ".join(str(f) for f in files)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: weight names do not match a {type(self).__name__} with this config.json "
                f"(missing {missing[:8]}, unexpected {unexpected[:8]}); is this the right kind of drafter?"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise CheckpointError(
                    f"{where}: {key} has shape {list(tensor.shape)} but config.json implies "
                    f"{list(expected[key].shape)}; config.json and weights do not belong together."
                )
        # assign=True keeps the checkpoint's own tensors and dtype, so a save/load round trip is bit-exact.
        self.load_state_dict(state, strict=True, assign=True)

    def save_pretrained(self, save_directory, *, safe_serialization: bool = True) -> Path:
        folder = write_folder(Path(save_directory), self.config.to_dict(), self.state_dict(), safe_serialization)
        if self.tokens_per_round is not None:
            write_acceptance(folder, self.tokens_per_round, self.acceptance_by_confidence)
        return folder

    def push_to_hub(self, repo_id: str, *, token=None, private: bool | None = None, model_card: str | None = None,
                    commit_message: str = "Upload drafter") -> str:
        """Save into a temporary folder (plus `model_card`, the card's markdown, as README.md) and upload it."""
        return push_folder(self.save_pretrained, repo_id, token=token, private=private, model_card=model_card,
                           commit_message=commit_message)
