"""The jsonl files recipes append to batch by batch (data.py's samples.{rank}.jsonl).

Each batch goes out in one write, but a run killed inside that write can still leave a torn last line: the
only line without its newline. Readers drop it with a note; the appender cuts it off before appending.
"""

import json
from pathlib import Path


def read_rows(path: Path) -> list[dict]:
    """Every row; a torn last line is dropped (and reported), any other bad line is an error naming it."""
    rows = []
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                if not line.endswith(b"\n"):  # only the last line can lack its newline
                    print(f"{path}: dropped the torn last line {number} ({len(line)} bytes), left by a run killed "
                          "while appending; recipes/data.py regenerates its sample")
                    break
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc}). The file is corrupted there: delete "
                                 "that line and rerun recipes/data.py, which regenerates missing samples.") from exc
    return rows


def cut_torn_tail(path: Path) -> None:
    """Truncate after the last newline before appending: a new row glued to a torn line would corrupt both."""
    with Path(path).open("rb+") as f:
        data = f.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            print(f"{path}: cut off a torn last line ({len(data) - whole} bytes), left by a run killed while "
                  "appending; its sample is generated again")
            f.truncate(whole)
