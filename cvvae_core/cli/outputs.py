"""Output paths of the commands, checked before any work: an output never replaces one of the
command's inputs, and replaces an existing file only with ``--overwrite``."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputPathError

OVERWRITE_HELP = "replace existing output files (an output is never allowed to be one of the inputs)"


def same_path(a, b) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder (links and relative paths resolved)."""
    a, b = Path(os.fspath(a)).expanduser(), Path(os.fspath(b)).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(outputs: dict[str, Path], inputs: dict[str, str], overwrite: bool):
    """Refuse, naming the argument, an output (argument name -> path) that is one of ``inputs``
    (argument name -> path; 'builtin' and synthetic clips are no files), that two outputs share, or
    that exists already (unless ``overwrite``)."""
    named = list(outputs.items())
    for i, (name, path) in enumerate(named):
        for in_name, in_path in inputs.items():
            if in_path and in_path != "builtin" and not in_path.startswith("synthetic") and same_path(path, in_path):
                raise OutputPathError(f"argument {name}: {path} is the {in_name} argument; writing it would replace "
                                      "that input, so give another output path")
        for other, other_path in named[:i]:
            if same_path(path, other_path):
                raise OutputPathError(f"argument {name}: {path} is also the {other} output; give two different paths")
        if path.is_dir():
            raise OutputPathError(f"argument {name}: {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise OutputPathError(f"argument {name}: {path} exists; give another path, or pass --overwrite to "
                                  "replace it")


def check_output_folder(name: str, folder: Path, files: list[str], overwrite: bool):
    """A folder the command writes ``files`` into: not a file, and none of them there already
    (unless ``overwrite``)."""
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"argument {name}: {folder} is a file; give a folder (it is created if missing)")
    there = [f for f in files if (folder / f).exists()]
    if there and not overwrite:
        raise OutputPathError(f"argument {name}: {folder} already holds {', '.join(there)}; give another folder, or "
                              "pass --overwrite to replace them")
