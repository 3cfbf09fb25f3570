"""Compute devices and dtypes: the names users give them, and the defaults."""
from __future__ import annotations

import torch

from .errors import InputError

#: The dtype names of the command line and the ComfyUI nodes.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one) or a name torch.device understands; a CUDA device that this
    PyTorch cannot reach is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use 'cpu'")
    return device


def resolve_dtype(name: str) -> torch.dtype | None:
    """A name of :data:`DTYPES`, or ``auto`` (None: the loader's default for the device)."""
    return None if name == "auto" else DTYPES[name]


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on CUDA where supported, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
