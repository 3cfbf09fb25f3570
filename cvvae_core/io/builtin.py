"""Where the built-in models live: a small CV-VAE and the small image VAE whose latent space it shares.

Both were trained by this project on procedurally generated videos (:mod:`cvvae_core.data.synthetic`)
with the configurations in ``cvvae_core/train_configs/``; they ship as fp16 safetensors so the
pack works with no download. They are demo/test models (64x64-scale content), not replacements
for the released CV-VAE. Loaders take the name ``builtin`` for them (``load_model("builtin")``,
``load_image_vae("builtin")``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "train_configs"
#: The name every loader and command takes for a built-in model (a folder of that name in the
#: working directory is reached as ``./builtin``).
BUILTIN = "builtin"


def is_builtin(path) -> bool:
    return os.fspath(path) == BUILTIN


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointNotFoundError(f"built-in weights {path} are missing; reinstall the package "
                                      "(the file ships in cvvae_core/weights/)")
    return path


def builtin_path() -> Path:
    """The built-in CV-VAE (one safetensors file in the official SD-variant layout)."""
    return _existing(WEIGHTS_DIR / "builtin_cvvae.safetensors")


def builtin_image_vae_path() -> Path:
    """The built-in image VAE (LDM layout) whose frozen decoder the built-in CV-VAE was trained against."""
    return _existing(WEIGHTS_DIR / "builtin_image_vae.safetensors")
