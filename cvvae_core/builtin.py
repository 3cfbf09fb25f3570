"""The built-in model: a small CV-VAE and the small image VAE whose latent space it shares.

Both were trained by this project on procedurally generated videos (:mod:`cvvae_core.synthetic`)
with the configurations in ``cvvae_core/train_configs/``; they ship as fp16 safetensors so the
pack works with no download. They are demo/test models (64x64-scale content), not replacements
for the released CV-VAE.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_model
from .errors import CheckpointNotFoundError
from .image_vae import ImageVAE, load_image_vae
from .model import CVVAE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_NAME = "cvvae-builtin-tiny"


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


def load_builtin(device=None, dtype=None) -> CVVAE:
    """The built-in CV-VAE, with :func:`cvvae_core.load_model`'s device/dtype defaults."""
    return load_model(builtin_path(), device=device, dtype=dtype)


def load_builtin_image_vae(device=None, dtype=torch.float32) -> ImageVAE:
    return load_image_vae(builtin_image_vae_path(), device=device, dtype=dtype)
