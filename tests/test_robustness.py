"""Issue 36: a saved folder is all or nothing, and every setting is checked where it is read.

Each test names the defect it guards against; saves are killed in forked children (SIGKILL at every file
operation of a save, and at random times) and the folder must then be the old one or the new one, whole.
"""

import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import time

import pytest
from transformers import AutoModelForCausalLM

from hf_whiflash import DFlashDrafter, Eagle3Drafter, EntropyPolicy, WhiFlashAssistant, calibration, checkpoint
from hf_whiflash.calibration import calibrated_latency
from hf_whiflash.cli import main
from hf_whiflash.latency import LatencyModel
from hf_whiflash.names import SETTINGS_FILE
from hf_whiflash.routing import NeuralPolicy

COSTS = LatencyModel(verify_s={0: 1.0, 3: 1.5}, draft_s={"eagle3": {1: 0.1, 3: 0.3}, "dflash": {1: 0.2, 3: 0.2}},
                     sampled_draft_s={"eagle3": {1: 0.1, 3: 0.3}, "dflash": {1: 0.2, 3: 0.2}}, sample_row_s=0.01)


@pytest.fixture(scope="module")
def target(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "target").eval()


@pytest.fixture(scope="module")
def new(target):
    """An EAGLE-3-only assistant with the entropy policy: saving it over the tiny full folder (EAGLE-3, DFlash, a
    neural router) must leave no part of the old folder."""
    return WhiFlashAssistant(target, Eagle3Drafter.for_target(target, seed=12), policy=EntropyPolicy(threshold=0.7),
                             eagle_steps=2)


@pytest.fixture
def old(tiny, tmp_path):
    """A copy of the tiny full folder, in a parent of its own."""
    folder = tmp_path / "parent" / "drafters"
    shutil.copytree(tiny / "drafters", folder)
    return folder


def contents(folder) -> dict[str, str]:
    """Every file under `folder` (relative path -> digest): equal contents, equal folders."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder) -> list[str]:
    """Temporary names beside `folder` or inside it."""
    return [p.name for p in (*folder.parent.iterdir(), *folder.rglob("*")) if p.name.startswith(".")]


# --- saving: the folder is one unit -------------------------------------------------------------------------------

def test_saving_an_eagle3_only_assistant_over_a_full_folder_replaces_it_whole(target, new, old):
    new.save_pretrained(old)
    assert sorted(p.name for p in old.iterdir()) == ["eagle3", "lookup", SETTINGS_FILE]  # no old dflash/ or policy/
    loaded = WhiFlashAssistant.from_pretrained(target, old)
    assert loaded.dflash is None and loaded.eagle_steps == 2 and loaded.policy.threshold == 0.7


def test_a_save_that_fails_midway_leaves_the_old_folder_or_none(new, old, tmp_path, monkeypatch):
    """Before: killed after eagle3/ but before whiflash_config.json, the folder loaded as another assistant."""
    before = contents(old)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("hf_whiflash.assistant.write_settings", killed)
    for folder in (old, tmp_path / "fresh"):
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(folder)
    assert contents(old) == before and not (tmp_path / "fresh").exists() and leftovers(old) == []


def test_a_folder_that_is_not_a_whiflash_folder_is_not_replaced(new, tmp_path):
    (tmp_path / "mine" / "notes.txt").parent.mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a WhiFlash folder"):
        new.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_without_an_atomic_swap_the_old_folder_is_still_replaced_whole(target, new, old, monkeypatch):
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # a system without renameat2
    new.save_pretrained(old)
    assert sorted(p.name for p in old.iterdir()) == ["eagle3", "lookup", SETTINGS_FILE] and leftovers(old) == []


def test_leftovers_of_killed_writes_are_removed_by_the_next_writer(new, old, tmp_path):
    """Before: killed saves left `.model.safetensors.*.tmp` files and killed calibration writes their `.tmp`."""
    stray_folder = old.parent / f".{old.name}.tmp-1a2b3c4d"
    stray_folder.mkdir()
    stray_file = old / "eagle3" / ".model.safetensors.4242.deadbeef.tmp"  # an older version's name
    stray_file.write_bytes(b"half")
    new.save_pretrained(old)
    assert leftovers(old) == []
    cache = tmp_path / "cache"
    cache.mkdir()
    stray_entry = cache / ".0123.json.4242.deadbeef.tmp"
    stray_entry.write_text("{")
    checkpoint.write_text_atomically(cache / "0123.json", "{}")
    assert [p.name for p in cache.iterdir()] == ["0123.json"]


def test_the_router_is_written_atomically_with_the_umask_s_modes(tmp_path, monkeypatch):
    """Before: policy/model.safetensors was written in place, with mode 0600 under umask 022."""
    written = []
    real = checkpoint.replace_atomically
    monkeypatch.setattr(checkpoint, "replace_atomically",
                        lambda path, write: written.append(path.name) or real(path, write))
    previous = os.umask(0o022)
    try:
        folder = NeuralPolicy(COSTS.to_dict(), hidden=8).save_pretrained(tmp_path / "policy")
    finally:
        os.umask(previous)
    assert sorted(written) == ["config.json", "model.safetensors"]
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {"config.json": 0o644,
                                                                              "model.safetensors": 0o644}


# Saves killed in a forked child: the child counts the file operations a save makes (os.mkdir, os.replace,
# os.rename, the atomic swap, shutil.rmtree) and SIGKILLs itself just before the chosen one.
OPERATIONS = ((os, "mkdir"), (os, "replace"), (os, "rename"), (checkpoint, "_exchange"), (shutil, "rmtree"))


def count_operations(kill_at: int | None, events) -> None:
    for module, name in OPERATIONS:
        real = getattr(module, name)

        def counted(*args, _real=real, **kwargs):
            if next(events) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(module, name, counted)


def in_child(work, kill_after: float | None = None) -> int:
    """Run `work()` in a forked child, SIGKILLed after `kill_after` seconds if given; its exit status, or -signal
    when killed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = work()
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the saving child hung")


def killed_save(assistant, folder, kill_at: int | None) -> int:
    def work():
        events = itertools.count()
        count_operations(kill_at, events)
        assistant.save_pretrained(folder)
        return next(events)  # the operations a whole save made

    return in_child(work)


def test_a_save_killed_at_any_point_leaves_the_old_folder_or_the_new_one(target, new, old, tmp_path):
    pristine = tmp_path / "pristine"
    shutil.copytree(old, pristine)
    reference = tmp_path / "reference"
    new.save_pretrained(reference)
    states = {"old": contents(pristine), "new": contents(reference)}
    operations = killed_save(new, old, None)  # the file operations of a whole save over an existing folder
    assert 5 < operations < 100 and contents(old) == states["new"]
    seen = set()
    for kill_at in range(operations):
        shutil.rmtree(old.parent)  # leftovers too: removing them would be operations of their own
        shutil.copytree(pristine, old)
        assert killed_save(new, old, kill_at) == -signal.SIGKILL
        state = next((name for name, files in states.items() if contents(old) == files), None)
        assert state is not None, f"killed at operation {kill_at}: a folder that is neither the old nor the new one"
        seen.add(state)
    assert seen == {"old", "new"}
    assert leftovers(old)  # the last kill left the swapped-out old folder behind...
    new.save_pretrained(old)
    assert leftovers(old) == [] and contents(old) == states["new"]  # ...which the next save removed
    assert WhiFlashAssistant.from_pretrained(target, old).dflash is None
    shutil.rmtree(old)
    shutil.copytree(pristine, old)
    assert WhiFlashAssistant.from_pretrained(target, old, policy=EntropyPolicy()).dflash is not None
    NeuralPolicy.from_pretrained(old / "policy")


def test_saves_killed_at_random_times_leave_the_old_folder_or_the_new_one(target, new, old, tmp_path):
    full = WhiFlashAssistant.from_pretrained(target, old, policy=EntropyPolicy(), eagle_steps=3, dflash_block_size=4)
    states = []
    for assistant in (full, new):
        assistant.save_pretrained(tmp_path / "reference")
        states.append(contents(tmp_path / "reference"))
    full.save_pretrained(old)

    def save_forever():
        for assistant in itertools.cycle((new, full)):
            assistant.save_pretrained(old)

    rng = random.Random(36)
    for _ in range(12):
        assert in_child(save_forever, kill_after=rng.uniform(0.0, 0.05)) == -signal.SIGKILL
        assert contents(old) in states
    full.save_pretrained(old)
    assert leftovers(old) == [] and contents(old) == states[0]


# --- reading settings: checked at load, errors name the file, the key, the value and what is allowed -------------

@pytest.fixture
def settings_folder(new, tmp_path):
    folder = tmp_path / "saved"
    new.save_pretrained(folder)
    return folder


def edit_settings(folder, change) -> None:
    path = folder / SETTINGS_FILE
    settings = json.loads(path.read_text())
    path.write_text(change if isinstance(change, str) else json.dumps(settings | change))


@pytest.mark.parametrize("change,message", [
    ({"eagle_steps": 0}, "eagle_steps = 0 is not allowed; expected an integer >= 1, or null"),
    ({"dflash_block_size": 0}, "dflash_block_size = 0 is not allowed; expected an integer >= 2"),
    ({"eagle_steps": "3"}, "eagle_steps = '3' is not allowed; expected an integer >= 1"),
    ({"eagle_steps": 2.5}, "eagle_steps = 2.5 is not allowed"),
    ({"policy": {"type": "entropy", "threshold": "high"}}, "policy: threshold = 'high' is not allowed; expected a "
                                                           "finite number >= 0"),
    ({"policy": {"type": "entropy", "treshold": 1.0}}, r"policy: unknown key\(s\) \['treshold'\]"),
    ({"policy": {"type": "neural"}}, "policy: folder is missing"),
    ({"policy": ["entropy"]}, "policy: expected a JSON object"),
    ('["eagle_steps", 3]', "expected a JSON object"),
    ('{"eagle_steps": 3', "is not valid JSON"),
])
def test_invalid_settings_are_refused_at_load_naming_file_key_and_value(target, settings_folder, change, message):
    edit_settings(settings_folder, change)
    with pytest.raises(ValueError, match=re.escape(str(settings_folder / SETTINGS_FILE)) + ".*" + message):
        WhiFlashAssistant.from_pretrained(target, settings_folder)


def test_the_cli_reports_invalid_settings_without_a_traceback(tiny, settings_folder, capsys):
    edit_settings(settings_folder, '{"eagle_steps": 3')
    assert main(["generate", "hi", "--target", str(tiny / "target"), "--drafters", str(settings_folder),
                 "--system", "eagle3", "--no-compare"]) == 2
    assert f"error: {settings_folder / SETTINGS_FILE} is not valid JSON" in capsys.readouterr().err


def test_null_means_unset(target, settings_folder):
    edit_settings(settings_folder, {"eagle_steps": None, "dflash_block_size": None})
    assert WhiFlashAssistant.from_pretrained(target, settings_folder).eagle_steps == 6  # the default chain


def test_the_constructor_applies_the_same_rules(target, new):
    with pytest.raises(ValueError, match="WhiFlashAssistant: eagle_steps = 0 is not allowed"):
        WhiFlashAssistant(target, new.eagle3, eagle_steps=0)
    with pytest.raises(ValueError, match="EntropyPolicy: threshold = 'high' is not allowed"):
        EntropyPolicy(threshold="high")


def test_a_truncated_router_names_its_file(target, old):
    weights = old / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        WhiFlashAssistant.from_pretrained(target, old)


@pytest.mark.parametrize("change,message", [
    ({"block_size": 0}, "block_size = 0 is not allowed; expected an integer >= 2"),
    ({"block_size": -3}, "block_size = -3 is not allowed"),
    ({"block_size": 1}, "block_size = 1 is not allowed"),
    ({"dflash_config": {"mask_token_id": 1, "target_layer_ids": ["1", "3"]}},
     r"dflash_config: target_layer_ids = \['1', '3'\] is not allowed; expected a non-empty list of integers"),
])
def test_invalid_dflash_configs_are_refused_naming_file_key_and_value(target, tmp_path, change, message):
    """Before: a block of 0, -3 or 1 loaded and never drafted; layer ids as strings were a bare TypeError."""
    folder = DFlashDrafter.for_target(target, seed=1).save_pretrained(tmp_path / "dflash")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) + ": " + message):
        DFlashDrafter.from_pretrained(folder)


def test_invalid_eagle3_config_numbers_are_refused_naming_file_key_and_value(target, tmp_path):
    folder = Eagle3Drafter.for_target(target, seed=1).save_pretrained(tmp_path / "eagle3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"hidden_size": "32"}))
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json")) + ": hidden_size = '32' is not"):
        Eagle3Drafter.from_pretrained(folder)


# --- the calibration cache: a damaged entry is measured again ----------------------------------------------------

@pytest.mark.parametrize("damage", [[], "not a dict", {"latency": {}}, {"key": "KEY", "latency": {"verify_s": 3}},
                                    {"key": "KEY", "latency": COSTS.to_dict() | {"draft_s": {}}}])
def test_a_damaged_calibration_entry_is_measured_again_with_a_note(new, tmp_path, monkeypatch, damage):
    """Before: a cache file holding [] crashed every assistant build."""
    measured = []
    monkeypatch.setattr(LatencyModel, "measure", classmethod(lambda cls, assistant: measured.append(1) or COSTS))
    monkeypatch.setattr(calibration, "cache_dir", lambda: tmp_path)
    calibrated_latency(new)
    (path,) = tmp_path.glob("*.json")
    key = json.loads(path.read_text())["key"]
    path.write_text(json.dumps(damage).replace('"KEY"', json.dumps(key)))
    with pytest.warns(UserWarning, match=re.escape(str(path)) + " is a damaged calibration cache entry"):
        assert calibrated_latency(new) == COSTS
    assert len(measured) == 2 and json.loads(path.read_text())["key"] == key


# --- whiflash bench: argument errors before any model loads ------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    def load_target(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("hf_whiflash.targets.load_target", load_target)


@pytest.mark.parametrize("flags,message", [
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["--per-category", "0"], "argument --per-category: expected an integer >= 1, got '0'"),
])
def test_bench_argument_errors_come_before_any_model_loads(tiny, tmp_path, capsys, no_loading, flags, message):
    with pytest.raises(SystemExit) as done:
        main(["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
              "--out", str(tmp_path / "out"), *flags])
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_bench_with_a_missing_prompts_file_fails_before_any_model_loads(tiny, tmp_path, capsys, no_loading):
    missing = tmp_path / "nope.jsonl"
    assert main(["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
                 "--prompts", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert f"--prompts {missing}: no such file" in capsys.readouterr().err
