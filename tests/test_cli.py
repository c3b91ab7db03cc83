"""`whiflash` CLI on a tiny configuration: arguments, errors, outputs written."""

import json

import pytest

from hf_whiflash.cli import main

def test_help_explains_every_flag(capsys):
    for argv in (["--help"], ["generate", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--max-new-tokens", "--mode", "--drafters", "--sample", "--quick", "--systems", "--modes", "--out"):
        assert flag in text


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "hi", "--mode", "tree"], "invalid choice: 'tree'"),
    (["bench", "--modes", "beam"], "invalid choice: 'beam'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


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
    assert main(command) == 0 and len(ran) == 8  # a finished bench run again is measured again
    assert "measuring again replaces it" in capsys.readouterr().err


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
    meta = json.loads(json.dumps(bench.meta_for("whiflash bench", time.time())))  # as bench.json stores it
    assert meta["cpu"] == {"model_name": "AMD EPYC", "family": "26", "model": "2"}
    assert meta["versions"]["hf_whiflash"] == importlib.metadata.version("hf-whiflash")
    assert f"CPU: AMD EPYC, family 26 model 2; hf_whiflash {meta['versions']['hf_whiflash']}, torch" in \
        bench.markdown({}, meta)
    monkeypatch.setattr(bench, "cpu_info", lambda field: "")  # e.g. macOS: no /proc/cpuinfo
    meta = bench.meta_for("whiflash bench", time.time())
    assert meta["cpu"]["family"] is None and meta["cpu"]["model_name"]
    assert "family and model not reported" in bench.markdown({}, meta)
