"""`pip install <clone>` gives the library alone, complete: built as a wheel, installed into a
folder of its own and used from another directory, the way a user outside this repository uses it."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".ci", ".venv", "runs", "out", "build", "__pycache__", ".pytest_cache"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (building writes build/ and *.egg-info next to the sources)."""
    src = tmp_path_factory.mktemp("src") / "clone"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")])
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True)
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True)
    return target


def run_outside(installed: Path, tmp_path: Path, *args: str) -> str:
    """Run with only the installed copy importable: from an empty directory, the clone off the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    work = tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def version_in_source() -> str:
    text = (ROOT / "cvvae_core" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def test_wheel_holds_the_library_alone_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = f"cvvae_core-{version_in_source()}.dist-info"
    assert top == {"cvvae_core", dist_info}, top  # no nodes/, tests/, bench/, example_workflows/
    for needed in ("cvvae_core/weights/builtin_cvvae.safetensors", "cvvae_core/weights/builtin_image_vae.safetensors",
                   "cvvae_core/train_configs/builtin_cvvae.json", "cvvae_core/__main__.py"):
        assert needed in names, needed
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert re.search(r"^cvvae = cvvae_core\.cli\.main:main$", entry_points, re.M), entry_points


def test_installed_library_loads_the_builtin_model_from_any_directory(installed, tmp_path):
    code = ("import cvvae_core, torch; vae = cvvae_core.load_model('builtin'); "
            "z = vae.encode(torch.zeros(1, 3, 5, 16, 16)); "
            "print(cvvae_core.__file__, cvvae_core.__version__, tuple(z.shape))")
    where, version, shape = run_outside(installed, tmp_path, sys.executable, "-c", code).split(" ", 2)
    assert Path(where).is_relative_to(installed)
    assert version == version_in_source() and shape.strip() == "(1, 4, 2, 2, 2)"


def test_cvvae_command_is_python_m_cvvae_core(installed, tmp_path):
    command = installed / "bin" / "cvvae"
    assert command.is_file()
    assert "latent_channels" in run_outside(installed, tmp_path, sys.executable, str(command), "info", "builtin")
    as_command = run_outside(installed, tmp_path, sys.executable, str(command), "--help")
    as_module = run_outside(installed, tmp_path, sys.executable, "-m", "cvvae_core", "--help")
    assert as_command.startswith("usage: cvvae ") and as_module.startswith("usage: python -m cvvae_core ")
    assert as_command.split("\n\n", 1)[1] == as_module.split("\n\n", 1)[1]  # same commands after the usage line
    assert run_outside(installed, tmp_path, sys.executable, str(command), "--version") == \
        f"cvvae_core {version_in_source()}\n"


def test_readme_python_api_runs_as_written(installed, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run_outside(installed, tmp_path, sys.executable, "-c", code)
    assert (tmp_path / "elsewhere" / "out" / "vae3d" / "config.json").is_file()


def test_shipped_training_config_trains_from_the_installed_package(installed, tmp_path):
    """The shipped config as shipped: its image VAE is 'builtin', so it runs from any directory."""
    config = installed / "cvvae_core" / "train_configs" / "builtin_cvvae.json"
    command = installed / "bin" / "cvvae"
    run_outside(installed, tmp_path, sys.executable, str(command), "train", str(config), "--steps", "1",
                "--out", "run")
    assert (tmp_path / "elsewhere" / "run" / "checkpoint" / "config.json").is_file()
    assert not (installed / "cvvae_core" / "train_configs" / "runs").exists()
