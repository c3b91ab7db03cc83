"""Prompt sources shared by the data recipe and the dev set, so both see prompts in the same format.

Allowed sources for the shipped drafters' data (see ../shared/BRIEF.md): self-synthesis by the target, code
prompts built from packaged sources, and BFCL `live_*` files only. Never HumanEval, never other BFCL files.

Your own prompts, for a target of yours, come as rows of one of two shapes (a jsonl file, one row a line, or
a Hub dataset's rows):
  {"prompt": "..."}                                  one user turn
  {"messages": [{"role": ..., "content": ...}, ...]} a chat (roles system, user, assistant, tool) ending in a
                                                     user or tool turn; a last assistant turn is dropped, since
                                                     the target writes its own reply
with "messages" read first where a row has both, and an optional "category" (default "chat") that the data
keeps for per-category figures.
"""

import itertools
import json
from pathlib import Path

from hf_whiflash.targets import cache_root
from hf_whiflash.wheels import unpacked

ROLES = ("system", "user", "assistant", "tool")

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


def own_prompt(row, where: str, source: str) -> dict:
    """One row of your own prompts as {"source", "category", "messages"}, or an error naming `where` and the fix."""
    shapes = 'a JSON object {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]}'
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected {shapes}, got {type(row).__name__}")
    category = row.get("category", "chat")
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: category {category!r} should be a non-empty string (or left out: chat)")
    if "messages" in row:
        messages = chat_messages(row["messages"], where)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    elif "prompt" in row:
        raise ValueError(f"{where}: prompt {row['prompt']!r:.60} should be a non-empty string")
    else:
        raise ValueError(f"{where}: no \"prompt\" or \"messages\" (keys: {sorted(row)}); expected {shapes}")
    return {"source": source, "category": category, "messages": messages}


def chat_messages(messages, where: str) -> list[dict]:
    """A row's chat, checked, without a last assistant turn (the target writes its own reply)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages should be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: messages[{i}] = {m!r:.80} should be {{\"role\": one of {list(ROLES)}, "
                             "\"content\": a string}")
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if chat[-1]["role"] == "assistant":
        chat.pop()
    if not chat or chat[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"{where}: the chat should end in a user (or tool) turn, the one the target answers")
    return chat


def jsonl_prompts(path: str, count: int | None = None) -> list[dict]:
    """The first `count` prompts (None: all) of a jsonl file of your own (shapes: see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sources.jsonl: {path} is no file (relative paths start at the working directory)")
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from exc
            rows.append(own_prompt(row, where, "jsonl"))
            if len(rows) == count:
                break
    if not rows:
        raise ValueError(f"sources.jsonl: {path} holds no prompts")
    return rows


def hub_prompts(name: str, count: int, split: str = "train", config: str | None = None) -> list[dict]:
    """The first `count` rows of a Hub dataset's split as prompts (streamed: nothing else is downloaded)."""
    try:  # a name import: the repository's own datasets/ folder would pass for the package in a plain import
        from datasets import load_dataset
    except ImportError as exc:
        raise ImportError("sources.datasets reads Hub datasets with the `datasets` package: pip install datasets "
                          "(or put your prompts in a jsonl file: sources.jsonl)") from exc
    stream = load_dataset(name, config, split=split, streaming=True)
    return [own_prompt(row, f"{name} ({split}), row {number}", "datasets")
            for number, row in enumerate(itertools.islice(stream, count), start=1)]
