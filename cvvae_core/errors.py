"""Typed errors. Every message says what was found and what to do about it."""
import torch


class CVVAEError(Exception):
    """Base class of every error raised by cvvae_core."""


class CheckpointError(CVVAEError):
    """A checkpoint could not be used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist or holds no recognisable checkpoint."""


class CheckpointCorruptError(CheckpointError):
    """The file is truncated, corrupt or not in the format its name claims."""


class PickleRefusedError(CheckpointError):
    """A pickle-based checkpoint (.ckpt/.pt/.bin/.pth) was given without allow_pickle=True."""


class ForeignCheckpointError(CheckpointError):
    """The file is a valid checkpoint of some other model (an image VAE, a UNet, ...)."""


class CheckpointKeyError(CheckpointError):
    """Missing, unexpected or mis-shaped keys for the detected CV-VAE variant."""


class UnknownImageFamilyError(CheckpointError, ValueError):
    """An image VAE whose latent space (channels, scale/shift) is none of the known SD families,
    or a ``family`` that does not fit the file."""


class InputError(CVVAEError, ValueError):
    """A video or latent tensor that the model cannot take as it is."""


class VideoFileError(InputError):
    """A video file that cannot be read or written: not a video, no video stream, truncated."""


class VideoNotFoundError(VideoFileError, FileNotFoundError):
    """The video file does not exist."""


class FrameCountError(InputError):
    """Frame count not of the form 1+4k, or height/width not a multiple of 8."""


class ChannelMismatchError(InputError):
    """A latent with the wrong number of channels for this model (4 = SD, 16 = SD3)."""


class OutOfMemoryError(CVVAEError, torch.OutOfMemoryError):
    """The device ran out of memory even at the smallest tile/chunk size. A ``torch.OutOfMemoryError``
    (``torch.cuda.OutOfMemoryError``), so host applications that recognise PyTorch's out-of-memory
    error (ComfyUI's fallbacks) recognise this one too."""


class MemoryBudgetError(CVVAEError, RuntimeError):
    """No exact plan fits ``memory_budget`` / ``host_memory_budget`` (and the disk tier, when one is
    named): raised before any work. ``device_needed`` / ``host_needed`` are the smallest peaks
    (bytes) the engine found, next to the budgets it was given."""

    def __init__(self, message: str, *, device_needed: int = 0, host_needed: int = 0,
                 device_budget: int | None = None, host_budget: int | None = None):
        super().__init__(message)
        self.device_needed, self.host_needed = device_needed, host_needed
        self.device_budget, self.host_budget = device_budget, host_budget


class CancelledError(CVVAEError):
    """The caller's cancellation check asked to stop."""


class DatasetRunMismatchError(CVVAEError):
    """An encode-dataset output folder was started with other settings than this run's."""


class LatentShardError(InputError):
    """A shard of an encoded dataset that is missing, truncated or not the one its index names;
    running encode-dataset again into the same folder re-encodes its clips."""


class InjectedFaultError(CVVAEError, RuntimeError):
    """A deliberate failure from the fault-injection hook (tests of resume after a crash)."""


class DistributedRunError(CVVAEError, RuntimeError):
    """A rank of a ``--distributed`` (tiles across ranks) run failed; every rank stops with this."""


class UnsupportedLayerError(CVVAEError, TypeError):
    """A model layer the streaming engine has no handler for (raised when its program is built)."""


class TrainingDataError(InputError):
    """Training data that cannot be used: a missing folder or manifest, no usable video in it, or a
    data source that fails clip after clip."""


class TrainConfigError(CVVAEError, ValueError):
    """A training configuration that cannot be run as written."""


class OutputPathError(CVVAEError, ValueError):
    """An output path that would replace an input or an existing file not meant to be replaced,
    or that names the wrong kind of file (a suffix the command does not write)."""
