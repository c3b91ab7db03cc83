"""The README's quick start, its first ```python block: the test suite runs it (test_generate_features.py), and
`make wheel-check` runs this file with an installed wheel, from outside the checkout."""

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    return README.read_text().split("```python\n", 1)[1].split("```", 1)[0]


if __name__ == "__main__":
    exec(compile(quickstart(), "README.md", "exec"), {})  # noqa: S102 (our own documentation)
    used = Path(sys.modules["hf_whiflash"].__file__).resolve()
    if used.parent == README.parent / "hf_whiflash":
        sys.exit(f"the quick start imported hf_whiflash from the checkout ({used}), not from the installed package")
    print(f"README quick start ran with {used.parent}")
