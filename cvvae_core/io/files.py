"""Weight files: what a file is (sniffed from its first bytes), and reading and writing the tensors
in it: safetensors always, pickle-based PyTorch files only when the caller allows it (and then
weights-only)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointCorruptError, PickleRefusedError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def sniff(path: Path) -> str:
    """``safetensors``, ``pickle``, ``html``, ``empty`` or ``unknown``, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):  # zip or raw pickle
        return "pickle"
    if head.lstrip()[:1] == b"<":
        return "html"
    return "unknown"


def write_safetensors(sd: dict, path: Path, metadata: dict) -> None:
    """``safetensors.torch.save_file`` with the permissions any other new file gets.

    safetensors writes through a private temporary file (mode 0600) and renames it; give the
    result the usual ``0666 & ~umask`` (0644 under the default umask) so others can read it."""
    save_file(sd, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata); a file that is not readable safetensors raises CheckpointCorruptError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        size = path.stat().st_size
        raise CheckpointCorruptError(
            f"{path.name} ({size:,} bytes) is not a readable safetensors file: {e}. The file is "
            "probably truncated or corrupt (an interrupted download?); download it again.") from None


def read_pickle(path: Path) -> dict:
    """A flat state dict from a PyTorch file, read with ``torch.load(weights_only=True)``."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; the message is what matters
        raise CheckpointCorruptError(
            f"{path.name} could not be read as a weights-only PyTorch checkpoint: {str(e).splitlines()[0]}. "
            "Files that need full unpickling are not supported; convert to .safetensors.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointCorruptError(f"{path.name} does not hold a flat state dict of tensors.")
    return obj


def read_weights(file: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors or (with ``allow_pickle``) PyTorch file."""
    kind = sniff(file)
    suffix = file.suffix.lower()
    if kind == "empty":
        raise CheckpointCorruptError(f"{file} is empty (0 bytes); download it again.")
    if kind == "html":
        raise CheckpointCorruptError(f"{file.name} is an HTML page, not weights: the download saved an error "
                                     "or login page. Download the file itself again.")
    if suffix in PICKLE_SUFFIXES or kind == "pickle":
        if not allow_pickle:
            raise PickleRefusedError(
                f"{file.name} is a pickle-based checkpoint, which can run code when loaded. Use the "
                ".safetensors release, or pass allow_pickle=True (loaded with torch.load(weights_only=True)).")
        sd, metadata = read_pickle(file), {}
    elif kind == "safetensors" or suffix in SAFETENSORS_SUFFIXES:
        sd, metadata = read_safetensors(file)
    else:
        raise CheckpointCorruptError(f"{file.name} is neither a safetensors nor a PyTorch checkpoint.")
    if not sd:
        raise CheckpointCorruptError(f"{file.name} holds no tensors.")
    return sd, metadata
