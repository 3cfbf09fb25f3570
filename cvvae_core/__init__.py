"""cvvae_core: CV-VAE (arXiv 2405.20279) in plain PyTorch.

    import cvvae_core
    vae = cvvae_core.load_model("vae3d_v1-1")            # release folder, .safetensors, or "builtin"
    z = vae.encode(video)                                # [B,3,1+4k,H,W] in [-1,1] -> [B,4,1+k,H/8,W/8]
    video = vae.decode(z)
"""
import importlib

from ._version import __version__

# The public names, imported on first use: ``import cvvae_core`` stays light (the ``cvvae`` command
# starts, and takes Ctrl-C, before torch is imported), and ``cvvae_core.load_model`` works as ever.
_PUBLIC = {
    ".data.latent_dataset": ["LatentDataset"],
    ".errors": ["CancelledError", "ChannelMismatchError", "CheckpointCorruptError", "CheckpointError",
                "CheckpointKeyError", "CheckpointNotFoundError", "CVVAEError", "DatasetRunMismatchError",
                "ForeignCheckpointError", "FrameCountError", "InputError", "LatentShardError", "MemoryBudgetError",
                "OutOfMemoryError", "PickleRefusedError"],
    ".io.checkpoint": ["load_model", "read_state_dict", "save_model"],
    ".model.cvvae": ["CVVAE"],
    ".model.frames": ["FrameAdjustment", "FramedLatent"],
    ".spec": ["PRESETS", "SD", "SD3", "CVVAEConfig"],
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [
    "__version__", "load_model", "save_model", "read_state_dict", "CVVAE", "CVVAEConfig", "PRESETS", "SD", "SD3",
    "FrameAdjustment", "FramedLatent", "LatentDataset", "CVVAEError", "CheckpointError", "CheckpointNotFoundError",
    "CheckpointCorruptError", "PickleRefusedError", "ForeignCheckpointError", "CheckpointKeyError", "InputError",
    "FrameCountError", "ChannelMismatchError", "OutOfMemoryError", "MemoryBudgetError", "CancelledError", "DatasetRunMismatchError",
    "LatentShardError",
]


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name], __name__), name)
    else:
        try:  # a subpackage used as an attribute (cvvae_core.io.checkpoint after a bare import cvvae_core)
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the subpackage exists; something it imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
