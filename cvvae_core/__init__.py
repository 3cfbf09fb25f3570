"""cvvae_core: CV-VAE (arXiv 2405.20279) in plain PyTorch.

    import cvvae_core
    vae = cvvae_core.load_model("vae3d_v1-1")            # release folder, .safetensors, or "builtin"
    z = vae.encode(video)                                # [B,3,1+4k,H,W] in [-1,1] -> [B,4,1+k,H/8,W/8]
    video = vae.decode(z)
"""
from ._version import __version__
from .data.latent_dataset import LatentDataset
from .errors import (CancelledError, ChannelMismatchError, CheckpointCorruptError, CheckpointError, CheckpointKeyError,
                     CheckpointNotFoundError, CVVAEError, DatasetRunMismatchError, ForeignCheckpointError,
                     FrameCountError, InputError, LatentShardError, MemoryBudgetError, OutOfMemoryError,
                     PickleRefusedError)
from .io.checkpoint import load_model, read_state_dict, save_model
from .model.cvvae import CVVAE
from .model.frames import FrameAdjustment, FramedLatent
from .spec import PRESETS, SD, SD3, CVVAEConfig

__all__ = [
    "__version__", "load_model", "save_model", "read_state_dict", "CVVAE", "CVVAEConfig", "PRESETS", "SD", "SD3",
    "FrameAdjustment", "FramedLatent", "LatentDataset", "CVVAEError", "CheckpointError", "CheckpointNotFoundError",
    "CheckpointCorruptError", "PickleRefusedError", "ForeignCheckpointError", "CheckpointKeyError", "InputError",
    "FrameCountError", "ChannelMismatchError", "OutOfMemoryError", "MemoryBudgetError", "CancelledError", "DatasetRunMismatchError",
    "LatentShardError",
]
