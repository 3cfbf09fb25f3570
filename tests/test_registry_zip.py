"""What the Comfy Registry gets: `comfy node pack` zips git-tracked files minus `.comfyignore`
matches, and `comfy node validate` warns about multiple statements on one line (E702)."""
import fnmatch
import io
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e}): the registry zip is made from git-tracked files")
    return out.splitlines()


def ignored(path: str, patterns: list[str]) -> bool:
    """The .comfyignore forms used here: ``folder/`` (everything under it) and file globs."""
    return any(path.startswith(p) if p.endswith("/") else fnmatch.fnmatch(path, p) for p in patterns)


def test_registry_zip_holds_what_users_run_and_no_tests_benches_or_images():
    patterns = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    files = tracked()
    shipped = [f for f in files if not ignored(f, patterns)]
    assert not [f for f in shipped if f.startswith(("tests/", "bench/")) or f.endswith((".png", ".jpg", ".gif"))]
    for needed in ("__init__.py", "nodes/nodes.py", "nodes/runtime.py", "cvvae_core/weights/builtin_cvvae.safetensors",
                   "requirements.txt", "pyproject.toml", "README.md", "LICENSE"):
        assert needed in shipped, needed
    code = [f for f in files if f.startswith(("nodes/", "cvvae_core/")) or f == "__init__.py"]
    assert set(code) <= set(shipped), "every module the nodes may import ships"
    workflows = [f for f in files if f.startswith("example_workflows/")]
    assert workflows and set(workflows) <= set(shipped)
    assert len(shipped) < len(files) * 0.7


def test_no_python_file_has_two_statements_on_one_line():
    """The registry validator's E702 ("will be an error soon"), for every tracked Python file."""
    found = []
    for name in (f for f in tracked() if f.endswith(".py")):
        tokens = list(tokenize.generate_tokens(io.StringIO((ROOT / name).read_text()).readline))
        for tok, nxt in zip(tokens, tokens[1:]):
            if tok.type == tokenize.OP and tok.string == ";" and nxt.type not in (tokenize.NEWLINE, tokenize.COMMENT):
                found.append(f"{name}:{tok.start[0]}")
    assert not found, found
