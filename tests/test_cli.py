"""`whiflash` CLI on a tiny configuration: arguments, errors, outputs written."""

import io
import json
import sys

import pytest
import torch

from hf_whiflash.cli import main


def test_help_explains_every_flag(capsys):
    for argv in (["--help"], ["generate", "--help"], ["bench", "--help"], ["calibrate", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--max-new-tokens", "--system", "--decoding", "--drafters", "--device", "--dtype", "--prompt-file",
                 "--dflash-block-size", "--eagle-steps", "--quick", "--systems", "--out", "examples:"):
        assert flag in text
    assert "(default: 128)" in text and "(default: SmolLM2-135M-Instruct)" in text and "(default: greedy sampling)" in text
    for older in ("--mode ", "--sample ", "--block-size", "--modes"):  # still accepted, no longer advertised
        assert older not in text


def test_version_and_bare_command_help_and_exit_0(capsys):
    from hf_whiflash.names import package_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"whiflash {package_version()} (tested with transformers")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: whiflash" in out and all(command in out for command in ("generate", "bench", "calibrate"))


def test_help_and_version_load_neither_torch_nor_transformers():
    """`whiflash --help` must answer at once: the heavy imports wait for a command to run."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\nfrom hf_whiflash.cli import main\n"
              "for argv in ([], ['--help'], ['--version'], ['generate', '--help'], ['bench', '--help'], "
              "['calibrate', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('LOADED', sorted(m for m in ('torch', 'transformers', 'rich', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.splitlines()[-1] == "LOADED []"


def test_older_flag_names_still_work():
    from hf_whiflash.cli import parser

    old = parser().parse_args(["generate", "hi", "--mode", "eagle3", "--sample", "--block-size", "4"])
    new = parser().parse_args(["generate", "hi", "--system", "eagle3", "--decoding", "sampling",
                               "--dflash-block-size", "4"])
    assert (old.system, old.decoding, old.dflash_block_size) == (new.system, new.decoding, new.dflash_block_size) \
        == ("eagle3", "sampling", 4)
    assert parser().parse_args(["bench", "--modes", "greedy"]).modes == ["greedy"]
    assert parser().parse_args(["bench", "--decoding", "greedy"]).modes == ["greedy"]


class Stdin(io.StringIO):
    def __init__(self, text: str, tty: bool = False):
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_prompt_from_the_argument_a_file_or_standard_input(tmp_path, monkeypatch):
    from hf_whiflash.cli import parser, read_prompt

    def prompt(*argv, stdin="", tty=False):
        monkeypatch.setattr("sys.stdin", Stdin(stdin, tty))
        return read_prompt(parser().parse_args(["generate", *argv]))

    (tmp_path / "prompt.txt").write_text("from a file\n")
    assert prompt("as an argument", stdin="ignored") == "as an argument"
    assert prompt("--prompt-file", str(tmp_path / "prompt.txt"), stdin="ignored") == "from a file"
    assert prompt("-", stdin="piped\n", tty=True) == "piped"  # '-' reads even a terminal
    assert prompt(stdin="piped without -\n") == "piped without -"
    with pytest.raises(ValueError, match="no prompt: give it as an argument"):
        prompt(tty=True)  # nothing given, and a terminal would only wait
    with pytest.raises(ValueError, match="not both"):
        prompt("hi", "--prompt-file", str(tmp_path / "prompt.txt"))
    with pytest.raises(ValueError, match="the prompt is empty"):
        prompt("-", stdin="\n")


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt-file", "/no/such/prompt.txt"], "No such file or directory: '/no/such/prompt.txt'"),
    (["generate", "-"], "the prompt is empty"),
])
def test_prompt_problems_are_usage_errors(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.stdin", Stdin(""))
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "usage: whiflash generate" in err and message in err


def test_generate_reads_a_piped_prompt(tiny, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Stdin("what is one plus one\n"))
    assert main(["generate", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
                 "--max-new-tokens", "4", "--no-compare", "--device", "cpu"]) == 0
    assert "--- WhiFlash (whiflash): 4 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
    (["generate", "hi", "--dflash-block-size", "1"], "expected an integer >= 2, got '1'"),
    (["generate", "hi", "--system", "tree"], "invalid choice: 'tree'"),
    (["generate", "hi", "--mode", "tree"], "invalid choice: 'tree'"),
    (["generate", "hi", "--device", "tpu"], "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["bench", "--decoding", "beam"], "invalid choice: 'beam'"),
    (["bench", "--modes", "beam"], "invalid choice: 'beam'"),
    (["calibrate", "--threads", "0"], "expected an integer >= 1, got '0'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [["generate", "hi"], ["bench"], ["calibrate"]])
def test_a_cuda_device_torch_cannot_see_is_refused_before_anything_loads(tiny, capsys, monkeypatch, command):
    from hf_whiflash import targets

    monkeypatch.setattr(targets, "load_target", lambda *a, **kw: pytest.fail("a model loaded"))
    assert main([*command, "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
                 "--device", "cuda"]) == 2
    assert "device = 'cuda' is not available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_generate_runs_target_and_drafters_on_the_gpu(tiny, capsys, device):
    """Drafters follow the target onto the GPU (a tensor left on the CPU would fail the first round)."""
    assert main(["generate", "what is one plus one", "--target", str(tiny / "target"), "--drafters",
                 str(tiny / "drafters"), "--max-new-tokens", "6", "--device", device]) == 0
    out = capsys.readouterr().out
    assert "--- WhiFlash (whiflash): 6 tokens" in out and "identical output: yes" in out


@pytest.mark.parametrize("command,module,extra", [(["generate", "hi"], "rich", "cli"),
                                                   (["bench"], "matplotlib", "bench")])
def test_a_missing_extra_is_named_before_anything_loads(tiny, capsys, monkeypatch, command, module, extra):
    from hf_whiflash import targets

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    monkeypatch.setattr(targets, "load_target", lambda *a, **kw: pytest.fail("a model loaded"))
    assert main([*command, "--target", str(tiny / "target")]) == 2
    assert f'needs {module}, which is not installed: pip install "hf-whiflash[{extra}]"' in capsys.readouterr().err


def test_generate_streams_and_compares_with_plain_generate(tiny, capsys):
    code = main(["generate", "what is one plus one", "--target", str(tiny / "target"), "--drafters",
                 str(tiny / "drafters"), "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- WhiFlash (whiflash): 6 tokens" in out and "tok/s" in out
    assert "identical output: yes" in out


@pytest.mark.parametrize("color", ["always", "never"])
def test_generate_colours_tokens_by_who_proposed_them_only_when_asked(tiny, capsys, color):
    code = main(["generate", "what is one plus one", "--target", str(tiny / "target"), "--drafters",
                 str(tiny / "drafters"), "--max-new-tokens", "6", "--no-compare", "--color", color])
    out = capsys.readouterr().out
    assert code == 0 and "--- WhiFlash (whiflash): 6 tokens" in out
    if color == "always":
        assert "\x1b[" in out and "target corrected a draft" in out  # styled text and the legend
    else:
        assert "\x1b[" not in out and "target corrected a draft" not in out


def test_generate_colours_every_route_s_drafts(tiny, capsys):
    """Lookup's drafts get their own colour: a source without a style would end the stream with a KeyError."""
    prompt = " ".join(["one plus one"] * 8)  # the tiny target repeats it, so lookup finds matches to draft
    code = main(["generate", prompt, "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
                 "--system", "lookup", "--max-new-tokens", "24", "--no-compare", "--color", "always"])
    out = capsys.readouterr().out
    assert code == 0 and "lookup draft" in out
    assert "\x1b[32m" in out  # green: at least one lookup draft was accepted and shown


def test_bench_writes_json_markdown_and_plots(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"),
                 "--prompts", str(tiny / "prompts.jsonl"), "--max-new-tokens", "5", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    systems = result["summary"]["greedy"]
    assert set(systems) == {"plain", "prompt-lookup", "eagle3", "dflash", "lookup", "whiflash"}
    assert systems["plain"]["overall"]["speedup"] == pytest.approx(1.0)
    assert all(c["speedup_interval"][0] <= c["speedup"] <= c["speedup_interval"][1]
               for s in systems.values() for c in s.values())
    assert set(systems["eagle3"]["overall"]["route_share"]) == {"eagle3"}
    assert len(result["runs"]) == 2 * 4 * 6  # modes x prompts x systems
    assert all(systems[s]["overall"]["identical"] == 1.0 for s in systems)  # fp32 greedy: every output as plain's
    assert result["summary"]["sampling"]["eagle3"]["overall"]["identical"] is None
    assert (out / "speedup.png").stat().st_size > 1000 and (out / "trace.png").stat().st_size > 1000
    table = (out / "bench.md").read_text()
    assert "| whiflash |" in table and "Command: `whiflash bench" in table
    # WhiFlash against each route alone, paired by prompt; single-route systems get no such comparison
    paired = systems["whiflash"]["overall"]["over_single_routes"]
    assert set(paired) == {"eagle3", "dflash", "lookup"} and systems["eagle3"]["overall"]["over_single_routes"] == {}
    assert all(p["interval"][0] <= p["ratio"] <= p["interval"][1] for p in paired.values())
    assert "| whiflash | lookup |" in table


def test_generate_for_a_target_without_drafters_says_how_to_train_them(tiny, capsys):
    """Once it ran untrained drafters with a note, which only showed WhiFlash being slow."""
    assert main(["generate", "hi", "--target", str(tiny / "target")]) == 2
    err = capsys.readouterr().err
    assert "no trained drafters for" in err and "recipes/README.md" in err and "--drafters" in err


def test_bench_without_drafters_says_how_to_fix(tiny, capsys):
    assert main(["bench", "--target", str(tiny / "target")]) == 2
    assert "pass --drafters FOLDER" in capsys.readouterr().err


def test_bench_with_the_neural_router_and_the_oracle(tiny, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"), "--prompts",
                 str(tiny / "prompts.jsonl"), "--max-new-tokens", "8", "--out", str(out), "--systems", "plain",
                 "eagle3", "lookup", "whiflash", "whiflash-neural", "oracle"]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert "oracle" in result["summary"]["greedy"] and "oracle" not in result["summary"]["sampling"]
    neural = result["summary"]["greedy"]["whiflash-neural"]["overall"]
    assert neural["tokens_per_cost"] > 0 and 0 <= neural["routing_pct"] < 100
    shares = result["summary"]["greedy"]["lookup"]["overall"]["route_share"]
    assert set(shares) <= {"lookup"}  # lookup alone drafts only lookup rounds (where it matched)
    assert "Rounds per route" in (out / "bench.md").read_text() or not any(
        len(cats["overall"]["route_share"]) > 1 for cats in result["summary"]["greedy"].values())


@pytest.mark.parametrize("systems,message", [
    (["tree"], "unknown systems ['tree']"),
    (["plain", "assisted"], "the 'assisted' system needs --assistant MODEL"),
])
def test_bench_rejects_systems_it_cannot_run(tiny, capsys, systems, message):
    assert main(["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"), "--prompts",
                 str(tiny / "prompts.jsonl"), "--systems", *systems]) == 2
    assert message in capsys.readouterr().err


def test_bench_compares_with_transformers_assisted_generation(tiny, tmp_path):
    """--assistant adds transformers' own assisted generation; no WhiFlash drafters are needed for it."""
    out = tmp_path / "bench"
    assert main(["bench", "--target", str(tiny / "target"), "--assistant", str(tiny / "target"), "--systems",
                 "plain", "prompt-lookup", "--modes", "greedy", "--prompts", str(tiny / "prompts.jsonl"),
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result["summary"]["greedy"]) == {"plain", "prompt-lookup", "assisted"}
    assert result["meta"]["assistant"] == str(tiny / "target")
    assert all(r["new_tokens"] == 6 for r in result["runs"])


def test_extra_peak_memory_counts_the_weights_a_system_adds(tiny):
    """bench's "extra peak MB" starts from a system's own weights; what it shares with the target is not added."""
    from hf_whiflash import WhiFlashAssistant, load_target
    from hf_whiflash.bench import added_weights_mb
    from hf_whiflash.names import DFLASH, EAGLE
    from hf_whiflash.routing import EntropyPolicy

    target, _ = load_target(str(tiny / "target"))
    copy, _ = load_target(str(tiny / "target"))
    assert added_weights_mb(target, {}) == added_weights_mb(target, {"prompt_lookup_num_tokens": 10}) == 0
    assert added_weights_mb(target, {"assistant_model": target}) == 0
    target_mb = sum(t.nbytes for t in (*target.parameters(), *target.buffers())) / 2**20
    assert added_weights_mb(target, {"assistant_model": copy}) == pytest.approx(target_mb)
    mb = {routes: added_weights_mb(target, {"assistant_model": WhiFlashAssistant.from_pretrained(
        target, tiny / "drafters", routes=routes, policy=EntropyPolicy())}) for routes in ((EAGLE,), (DFLASH,),
                                                                                            (EAGLE, DFLASH))}
    assert mb[(EAGLE,)] > 0 and mb[(DFLASH,)] > 0
    assert mb[(EAGLE, DFLASH)] == pytest.approx(mb[(EAGLE,)] + mb[(DFLASH,)])


def test_bench_warms_every_system_up_before_timing_any(tiny, monkeypatch):
    """One untimed generation per system and mode comes first, and none of them is reported as a run."""
    from hf_whiflash import bench, load_target

    target, tokenizer = load_target(str(tiny / "target"))
    prompts = bench.load_prompts(str(tiny / "prompts.jsonl"), None)
    systems = bench.build_systems(target, tiny / "drafters", ["plain", "eagle3", "whiflash-entropy"])
    generated, generated_before_run = [], []
    real_generate, real_run_one = target.generate, bench.run_one
    monkeypatch.setattr(target, "generate", lambda ids, **kw: generated.append(
        (id(kw.get("assistant_model")), kw["do_sample"])) or real_generate(ids, **kw))
    monkeypatch.setattr(bench, "run_one", lambda *a, **kw: generated_before_run.append(len(generated))
                        or real_run_one(*a, **kw))
    runs, _ = bench.benchmark(target, tokenizer, prompts, systems, ["greedy", "sampling"], 4, 1, 0, progress=False)
    warm = set(generated[:generated_before_run[0]])
    assert warm == {(id(extra.get("assistant_model")), sample) for extra in systems.values() for sample in (False, True)}
    assert len(runs) == 2 * len(prompts) * len(systems)


def test_bench_repeats_sample_afresh_and_greedy_repeats_agree(tiny):
    """Sampled speed depends on what is drawn, so each repeat samples with its own seed; greedy repeats
    generate the same tokens."""
    from hf_whiflash import bench, load_target

    target, tokenizer = load_target(str(tiny / "target"))
    prompts = bench.load_prompts(str(tiny / "prompts.jsonl"), None)
    systems = bench.build_systems(target, tiny / "drafters", ["plain"])
    runs, _ = bench.benchmark(target, tokenizer, prompts, systems, ["greedy", "sampling"], 8, 2, 0, progress=False)
    outputs = {(r.mode, r.prompt_id, r.repeat): r.output for r in runs}
    differ = {mode: [outputs[mode, p["id"], 0] != outputs[mode, p["id"], 1] for p in prompts]
              for mode in ("greedy", "sampling")}
    assert not any(differ["greedy"]) and all(differ["sampling"])


def test_bench_checks_out_first_keeps_every_finished_run_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    """A bench killed midway keeps its finished runs (a torn last line is dropped) and the same command
    resumes, running only what is missing; an unwritable --out or another bench's folder fails before
    any model loads."""
    from hf_whiflash import bench, targets

    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setattr(targets, "load_target", lambda *a, **kw: pytest.fail("a model loaded before --out was checked"))
    assert main(["bench", "--target", str(tiny / "target"), "--out", str(blocked / "bench"), "--systems", "plain"]) == 2
    assert "cannot write bench results to" in capsys.readouterr().err
    monkeypatch.undo()

    out = tmp_path / "bench"
    command = ["bench", "--target", str(tiny / "target"), "--drafters", str(tiny / "drafters"), "--prompts",
               str(tiny / "prompts.jsonl"), "--max-new-tokens", "5", "--systems", "plain", "eagle3", "--modes",
               "greedy", "--out", str(out)]
    assert main(command) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 2  # prompts x systems, each on its own line as it finished
    (out / "runs.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while appending run 6
    (out / "bench.json").unlink()  # ... so the bench never finished
    ran = []
    real_run_one = bench.run_one
    monkeypatch.setattr(bench, "run_one", lambda *a, **kw: ran.append(a[2]) or real_run_one(*a, **kw))
    assert main(command) == 0
    assert len(ran) == 3 and "resuming: 5 runs" in capsys.readouterr().err
    result = json.loads((out / "bench.json").read_text())
    assert sorted((r["prompt_id"], r["system"]) for r in result["runs"]) == sorted(
        (f"{c}-0", s) for c in ("code", "tool", "math", "chat") for s in ("plain", "eagle3"))
    (out / "bench.json").unlink()
    assert main(command[:-2] + ["--max-new-tokens", "6", "--out", str(out)]) == 2
    assert "holds bench runs of other settings" in capsys.readouterr().err
    ran.clear()
    assert main(command) == 0 and not ran  # not finished (no bench.json), nothing missing: nothing runs
    summarized = (out / "bench.json").read_text()
    assert main(command) == 0 and not ran  # a finished bench run again: summarized again, its runs kept
    assert "its summary is written again from its runs" in capsys.readouterr().err
    assert json.loads((out / "bench.json").read_text())["runs"] == json.loads(summarized)["runs"]


def test_paired_speedups_tell_a_small_gap_that_prompt_spread_hides():
    """System b is 3% faster than a on every prompt (+-1% timing noise), while prompts run at 10-40 tok/s:
    each system's speedup interval over plain overlaps the other's, b against a excludes 1.0."""
    from hf_whiflash.bench import Run, median_interval, speedups

    runs = []
    for i in range(20):
        plain = 10 + 1.5 * i  # tok/s of plain decoding on prompt i
        gain = 1.5 + 0.05 * (i % 7)  # how much drafting pays on it
        noise = [1 + 0.01 * ((7 * i + k) % 3 - 1) for k in range(3)]
        for system, rate in (("plain", plain), ("a", plain * gain * noise[0]), ("b", plain * gain * 1.03 * noise[1])):
            runs.append(Run(f"p{i}", "code", system, "greedy", 64, 64 / rate, 0.0))
    a, b = (median_interval(speedups(runs, "greedy", s)) for s in ("a", "b"))
    assert a[0] < b[0] < a[1] < b[1]  # overlapping
    paired = speedups(runs, "greedy", "b", baseline="a")
    assert len(paired) == 20 and 1.0 < median_interval(paired)[0] <= 1.03 <= median_interval(paired)[1]
    assert speedups(runs, "greedy", "b", "tool") == []  # no prompts in that category


def test_bench_names_the_cpu_generation_and_the_versions(monkeypatch):
    """One model name ("AMD EPYC") covers several CPU generations, so bench.json and bench.md also record
    /proc/cpuinfo's family and model, and the package versions; where nothing is reported, they say so."""
    import importlib.metadata
    import time

    from hf_whiflash import bench

    fields = {"model name": "AMD EPYC", "cpu family": "26", "model": "2"}
    monkeypatch.setattr(bench, "cpu_info", lambda field: fields.get(field, ""))
    meta = json.loads(json.dumps(bench.meta_for("whiflash bench", time.time(), torch.device("cpu"))))  # as bench.json stores it
    assert meta["cpu"] == {"model_name": "AMD EPYC", "family": "26", "model": "2"}
    assert meta["versions"]["hf_whiflash"] == importlib.metadata.version("hf-whiflash")
    assert f"CPU: AMD EPYC, family 26 model 2; hf_whiflash {meta['versions']['hf_whiflash']}, torch" in \
        bench.markdown({}, meta)
    monkeypatch.setattr(bench, "cpu_info", lambda field: "")  # e.g. macOS: no /proc/cpuinfo
    meta = bench.meta_for("whiflash bench", time.time(), torch.device("cpu"))
    assert meta["cpu"]["family"] is None and meta["cpu"]["model_name"]
    assert "family and model not reported" in bench.markdown({}, meta)
