"""Running a CV-VAE pass inside ComfyUI: memory, progress bar, cancel, clean-up."""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management as mm
import comfy.utils

from ..cvvae_core.errors import CancelledError, OutOfMemoryError
from ..cvvae_core import tiling
from ..cvvae_core.tiling import TilingOptions
from ..cvvae_core.tiling.planner import FREE_MEMORY_SHARE

TILING_MODES = ["auto", "seamless", "official", "none"]

TILING_TOOLTIP = (
    "How the clip is split to fit in memory. auto = seamless with piece sizes from free memory (recommended). "
    "seamless = exact: every layer runs once over the whole clip, in pieces, with clip-wide normalisation "
    "statistics, so the result equals 'none' (no seams, no colour shifts). Layer outputs that do not fit the "
    "GPU wait in RAM (and are recomputed when RAM is short too): slower, same result. Measured on CPU: "
    "0.93-0.98x the speed of official with 0.66-0.83x its memory. official = the original CV-VAE tiling "
    "(overlapping tiles blended, each "
    "normalised on its own: seams and colour shifts); only to compare with the reference code. none = the whole "
    "clip at once (most memory).")
TILE_SIZE_TOOLTIP = ("Spatial piece size in pixels (multiple of 8). 0 = automatic (from free memory). Smaller = "
                     "less memory, slower; the result is the same.")
CHUNK_TOOLTIP = "Video frames per time piece. 0 = automatic. Smaller = less memory, slower; the result is the same."


def engine_options(tile_size: int | None = None, chunk_frames: int | None = None, output_device="cpu", pbar=None,
                   mode: str = "seamless", **more) -> TilingOptions:
    """The engine's options inside ComfyUI: cancel from ComfyUI's interrupt flag, progress to ``pbar``."""
    progress = None if pbar is None else (lambda done, total: pbar.update_absolute(done, total))
    return TilingOptions(mode=mode, tile_size=tile_size, chunk_frames=chunk_frames, progress=progress,
                         cancel=mm.processing_interrupted, output_device=output_device, **more)


def tiling_options(mode: str, tile_size: int, chunk_frames: int, pbar, output_device) -> TilingOptions | None:
    if mode not in TILING_MODES:
        raise ValueError(f"tiling must be one of {TILING_MODES}, got {mode!r}")
    if mode == "none":
        return None
    return engine_options(tile_size or None, chunk_frames or None, output_device, pbar,
                          mode="seamless" if mode == "auto" else mode)


def memory_request(vae, what: str, shape, opts: TilingOptions | None) -> int:
    """Bytes to ask ComfyUI for before a pass on the VAE's load device: the engine's own estimate
    (cvvae_core.tiling.memory_request) of the plan it will run there."""
    model = vae.cvvae_model
    direction = tiling.ENCODE if what == "encode" else tiling.DECODE
    return tiling.memory_request(model, direction, shape, opts, device=vae.device)


@contextlib.contextmanager
def comfy_pass(vae, memory_required: float, what: str, opts: TilingOptions | None = None):
    """Make room and load the model, then run the pass under :func:`comfy_errors`. On a GPU, an
    automatic seamless plan (``opts`` without a budget) is sized from what ComfyUI reports free once
    the model is loaded: its own allocator cache counts as free there, not in CUDA's figure."""
    mm.load_models_gpu([vae.patcher], memory_required=memory_required, force_full_load=True)
    if (opts is not None and opts.mode == "seamless" and opts.memory_budget is None
            and torch.device(vae.device).type == "cuda"):
        opts.memory_budget = int(mm.get_free_memory(vae.device) * FREE_MEMORY_SHARE)
    with comfy_errors(what):
        yield


@contextlib.contextmanager
def comfy_errors(what: str):
    """Translate cancel/out-of-memory into what ComfyUI expects and leave no cached GPU memory behind."""
    outcome = None
    try:
        yield
    except CancelledError:
        outcome = "cancelled"
    except mm.OOM_EXCEPTION:
        outcome = "oom"
    finally:
        mm.soft_empty_cache()
    # Raised outside the except blocks so the failed pass's tensors are already released.
    if outcome == "cancelled":
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()
    if outcome == "oom":
        mm.soft_empty_cache(True)
        raise OutOfMemoryError(
            f"CV-VAE ran out of memory while {what}. Set tiling to 'auto' (or a smaller tile_size / "
            "chunk_frames), use dtype fp16/bf16 in 'Load CV-VAE', or lower the resolution / frame count.")


def progress_bar(total: int = 1):
    return comfy.utils.ProgressBar(total)


def images_to_video(images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[N, H, W, C]`` in 0..1 -> video ``[1, 3, N, H, W]`` in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected IMAGE frames [N, H, W, 3], got {shape}")
    if images.shape[-1] < 3:
        raise ValueError(f"IMAGE has {images.shape[-1]} channels; CV-VAE needs RGB (3). "
                         "Convert grayscale with an image-to-RGB node first.")
    return images[..., :3].movedim(-1, 0).unsqueeze(0).float() * 2.0 - 1.0


def video_to_images(video: torch.Tensor) -> torch.Tensor:
    """Video ``[B, 3, T, H, W]`` in about [-1, 1] -> IMAGE ``[B*T, H, W, 3]`` in 0..1."""
    frames = video.movedim(1, -1).reshape(-1, *video.shape[-2:], video.shape[1])
    return ((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0)
