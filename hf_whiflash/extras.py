"""Optional dependencies: `import hf_whiflash` and generate() need none of them. Each extra of pyproject.toml
installs the modules listed here (tests/test_packaging.py checks the two agree); code that uses them imports
them inside the functions that need them, after `require`."""

import importlib.util

EXTRAS = {
    "gguf": ("gguf", "accelerate"),  # the packaged targets (the default one too) are GGUF files; transformers
                                     # reads GGUF only with accelerate installed
    "cli": ("rich",),  # whiflash generate: tokens coloured by the drafter that proposed them
    "bench": ("matplotlib", "tqdm"),  # whiflash bench: plots and progress
    "train": ("yaml", "accelerate"),  # recipes/ (from a source checkout): configs, multi-GPU runs
    "demo": ("gradio",),  # demo/app.py
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(extra: str, purpose: str) -> None:
    """Raise MissingExtraError, naming the pip command, unless every module of `extra` is importable."""
    missing = [module for module in EXTRAS[extra] if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, which is not installed: "
                                f'pip install "hf-whiflash[{extra}]"')
