"""Names and defaults every part of hf_whiflash agrees on. The bottom floor: imports nothing from the package."""

import re
from importlib import metadata

DEFAULT_TARGET = "SmolLM2-135M-Instruct"  # a packaged target (targets.py), with drafters shipped in the package

EAGLE, DFLASH, LOOKUP = "eagle3", "dflash", "lookup"  # the drafting routes, also their subfolders in a WhiFlash folder
ROUTES = (EAGLE, DFLASH, LOOKUP)
# Each system of `whiflash generate` / `whiflash bench` that drafts with WhiFlash drafters, and the routes it takes.
MODE_ROUTES = {"whiflash": ROUTES, EAGLE: (EAGLE,), DFLASH: (DFLASH,), LOOKUP: (LOOKUP,)}
NEURAL_ROUTES = (EAGLE, DFLASH)  # the drafters with weights, which read the target's hidden states
TARGET = "target"  # a round without drafts: the length budget left no room for any
POLICY_FOLDER = "policy"  # a trained router inside a WhiFlash folder
SETTINGS_FILE = "whiflash_config.json"  # draft lengths and routing policy of a WhiFlash folder
ACCEPTANCE_FILE = "acceptance.json"  # in a drafter folder: its mean tokens per round by mode and draft length
CONFIDENCE_BINS = 10  # acceptance.json's acceptance by confidence: equal bins of the drafter's confidence in [0, 1]

# Decoding modes. Sampling accepts fewer drafts than greedy and pays per candidate for the target's processors
# (transformers processes every verified row), so draft lengths are profiled and chosen per mode.
GREEDY, SAMPLED = "greedy", "sampling"

# Sampling mode of the command line, the benchmark and the demo.
SAMPLING = {"temperature": 0.7, "top_p": 0.9}


def read_bins(bins: list[float], values: list[float]) -> list[float]:
    """Each value in [0, 1] -> the entry of `bins` (a profile over equal bins of [0, 1]) that holds it."""
    return [bins[min(int(value * len(bins)), len(bins) - 1)] for value in values]


def package_version() -> str:
    """This release's version ('unknown' when hf_whiflash runs from a copied folder without package metadata)."""
    try:
        return metadata.version("hf-whiflash")
    except metadata.PackageNotFoundError:
        return "unknown"


def tested_transformers() -> str:
    """The transformers range this release is tested with, as pyproject.toml declares it (e.g. '>=5.23.0,<5.25');
    'unknown' when hf_whiflash runs from a copied folder without package metadata (a Space)."""
    try:
        requirements = metadata.requires("hf-whiflash") or []
    except metadata.PackageNotFoundError:
        return "unknown"
    for requirement in requirements:
        match = re.fullmatch(r"transformers\s*([^;]*)", requirement.strip())
        if match:
            return match.group(1).replace(" ", "")
    return "unknown"
