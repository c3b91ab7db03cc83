"""Prompt sources shared by the data recipe and the dev set, so both see prompts in the same format.

Allowed sources (see ../shared/BRIEF.md): self-synthesis by the target, code prompts built from
packaged sources, and BFCL `live_*` files only. Never HumanEval, never other BFCL files.
"""

import json

from hf_whiflash.targets import cache_root
from hf_whiflash.wheels import unpacked

TOOL_SYSTEM = (
    "You are a function-calling assistant. These functions are available (JSON schema):\n{functions}\n"
    'Reply with the function call(s) only, as JSON: [{{"name": ..., "arguments": {{...}}}}].'
)
BFCL_LIVE_FILES = ("BFCL_v4_live_simple.json", "BFCL_v4_live_multiple.json",
                   "BFCL_v4_live_parallel.json", "BFCL_v4_live_parallel_multiple.json")


def bfcl_live_items() -> list[dict]:
    """BFCL `live_*` items (id, question, function), the only BFCL items training and tuning may use."""
    return bfcl_items(BFCL_LIVE_FILES)  # the other BFCL files are a held-out test set


def bfcl_items(files: tuple[str, ...]) -> list[dict]:
    """The items of these BFCL files (id, question, function) from the bfcl-eval package (its wheel's data,
    downloaded into the cache on first use)."""
    data = unpacked("bfcl-eval==2026.3.23", cache_root() / "packages") / "bfcl_eval" / "data"
    return [json.loads(line) for name in files for line in (data / name).open()]


def tool_messages(item: dict) -> list[dict]:
    """A BFCL item as chat messages: the functions in the system turn, the user's first question."""
    functions = json.dumps(item["function"], separators=(",", ":"))
    question = item["question"][0]
    return [{"role": "system", "content": TOOL_SYSTEM.format(functions=functions)}, *question]
