"""Running a CV-VAE pass inside ComfyUI: the plan and its fallback, memory, progress bar, cancel,
clean-up, and what ComfyUI's version offers (intermediate dtype, free memory, device context)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch

import comfy.model_management as mm
import comfy.utils

from ..cvvae_core import tiling
from ..cvvae_core.errors import CancelledError, MemoryBudgetError, OutOfMemoryError
from ..cvvae_core.tiling import TilingOptions
from ..cvvae_core.tiling.planner import FREE_MEMORY_SHARE

log = logging.getLogger("CV-VAE")

TILING_MODES = ["auto", "seamless", "official", "none"]
DISK_FOLDER = "cvvae"  # inside ComfyUI's temp folder

TILING_TOOLTIP = (
    "How the clip is split to fit in memory. auto = seamless when its plan fits the GPU memory and RAM (checked "
    "before any work), otherwise official with a warning on the node saying what seamless would have needed "
    "(recommended). seamless = exact: every layer runs once over the whole clip, in pieces, with clip-wide "
    "normalisation statistics, so the result equals 'none' (no seams, no colour shifts). Layer outputs that do "
    "not fit the GPU wait in RAM (and are recomputed when RAM is short too): slower, same result. Measured on "
    "CPU: 0.93-0.98x the speed of official with 0.66-0.83x its memory. Chosen here, it stops with an error when "
    "no exact plan fits. official = the original CV-VAE tiling (overlapping tiles blended, each normalised on its "
    "own: seams and colour shifts); only to compare with the reference code. none = the whole clip at once "
    "(most memory).")
TILE_SIZE_TOOLTIP = ("Spatial piece size in pixels (multiple of 8). 0 = automatic (from free memory). Smaller = "
                     "less memory, slower; the result is the same.")
CHUNK_TOOLTIP = "Video frames per time piece. 0 = automatic. Smaller = less memory, slower; the result is the same."
DISK_SPILL_TOOLTIP = (
    "Let the exact engine keep layer outputs that fit neither the GPU nor RAM in memory-mapped files in ComfyUI's "
    "temp folder (removed when the pass ends). Slower (disk speed), same result; lets auto and seamless stay exact "
    "on machines with little RAM. Needs free disk space about the size the fallback warning names.")


# What this ComfyUI offers --------------------------------------------------------------------------
def output_dtype() -> torch.dtype:
    """The dtype ComfyUI keeps images and latents in between nodes: ``intermediate_dtype()`` (float16
    with --fp16-intermediates) where ComfyUI has it (0.3x and newer), else float32."""
    intermediate = getattr(mm, "intermediate_dtype", None)
    return torch.float32 if intermediate is None else intermediate()


def free_memory(patcher, device) -> int:
    """Device bytes free for a pass once the model is loaded. Newer ComfyUI (0.3x) asks the patcher,
    which also counts memory its dynamic VRAM can reclaim; older ComfyUI only has the global figure."""
    ask = getattr(patcher, "get_free_memory", None)
    return int(ask(device) if ask is not None else mm.get_free_memory(device))


def device_context(device):
    """Make ``device`` CUDA's current device during a pass (a VAE on a second GPU), as ComfyUI's own VAE
    calls do where it has ``cuda_device_context`` (0.3x and newer)."""
    enter = getattr(mm, "cuda_device_context", None)
    return contextlib.nullcontext() if enter is None else enter(torch.device(device))


def is_out_of_memory(err: BaseException) -> bool:
    """ComfyUI's own test where it has one (0.3x: ``is_oom``, which also knows accelerator errors)."""
    test = getattr(mm, "is_oom", None)
    return test(err) if test is not None else isinstance(err, mm.OOM_EXCEPTION)


def temp_folder() -> str:
    """The disk tier's folder in ComfyUI's temp folder (made when first asked for: disk_spill is on)."""
    import folder_paths

    folder = os.path.join(folder_paths.get_temp_directory(), DISK_FOLDER)
    os.makedirs(folder, exist_ok=True)
    return folder


def notify(text: str):
    """One log line and the same text on the executing node in the browser (ComfyUI's progress text;
    only the log where this ComfyUI or this call has no executing node)."""
    log.warning(text)
    show_progress_text(text)


def show_progress_text(text: str):
    """``text`` under the executing node in the browser (ComfyUI's progress text), where available."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        context, server = get_executing_context(), getattr(PromptServer, "instance", None)
        if context is not None and server is not None:
            server.send_progress_text(text, context.node_id)
    except (ImportError, AttributeError):
        pass


# Which tiling a pass runs -----------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "no limit"
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{max(1, round(n / 2 ** 20))} MiB"


def _needs(err: MemoryBudgetError) -> str:
    parts = []
    if err.device_budget is not None:
        parts.append(f"{_size(err.device_needed)} of GPU memory ({_size(err.device_budget)} free for it)")
    parts.append(f"{_size(err.host_needed)} of RAM ({_size(err.host_budget)} available to it)")
    return " and ".join(parts)


@dataclasses.dataclass
class Tiling:
    """The tiling a node asked for (core VAE nodes: ``auto``), turned into engine options per pass.

    ``auto`` takes the exact (seamless) plan when one fits the budgets and otherwise official tiling,
    with one warning per pass; ``seamless`` refuses instead. ``node`` names who the messages are from."""

    mode: str = "auto"
    tile_size: int = 0
    chunk_frames: int = 0
    disk_spill: bool = False
    node: str = "CV-VAE"
    exact_hint: str = "turn on disk_spill"  # what the user can do to stay exact
    fell_back: bool = False

    def __post_init__(self):
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling must be one of {TILING_MODES}, got {self.mode!r}")

    def options(self, output_device, pbar=None) -> TilingOptions | None:
        if self.mode == "none":
            return None
        return engine_options(self.tile_size or None, self.chunk_frames or None, output_device, pbar,
                              mode="official" if self.mode == "official" else "seamless",
                              disk_dir=temp_folder() if self.disk_spill else None)

    def without_exact_plan(self, opts: TilingOptions, err: MemoryBudgetError) -> TilingOptions:
        """Official-mode options after a budget error (``auto``), or the error at the node (``seamless``)."""
        what = "even with disk_spill " if self.disk_spill else ""
        hint = "" if self.disk_spill else f"{self.exact_hint}, or "
        if self.mode != "auto":
            refusal = MemoryBudgetError(
                f"{self.node}: tiling 'seamless' (exact) needs {_needs(err)} {what}for this clip and does not run "
                f"over budget. Choose tiling 'auto' (falls back to official tiling) or 'official', {hint}use fewer "
                "frames / a smaller size.",
                device_needed=err.device_needed, host_needed=err.host_needed,
                device_budget=err.device_budget, host_budget=err.host_budget)
            raise refusal from None
        if not self.fell_back:
            self.fell_back = True
            notify(f"{self.node}: the exact (seamless) plan needs {_needs(err)} {what}for this clip; running "
                   "official tiling instead (overlapping tiles blended: small seams or colour shifts are "
                   f"possible). For the exact result {hint}use fewer frames / a smaller size.")
        # Official tiling with the release's own tile and chunk sizes: piece sizes meant for the exact
        # engine (or ComfyUI's tiled nodes) need not suit its overlapping tiles.
        return dataclasses.replace(opts, mode="official", tile_size=None, chunk_frames=None, memory_budget=None,
                                   disk_dir=None)


def engine_options(tile_size: int | None = None, chunk_frames: int | None = None, output_device="cpu", pbar=None,
                   mode: str = "seamless", **more) -> TilingOptions:
    """The engine's options inside ComfyUI: cancel from ComfyUI's interrupt flag, progress to ``pbar``."""
    progress = None if pbar is None else (lambda done, total: pbar.update_absolute(done, total))
    return TilingOptions(mode=mode, tile_size=tile_size, chunk_frames=chunk_frames, progress=progress,
                         cancel=mm.processing_interrupted, output_device=output_device, **more)


def request(model, direction, shape, opts: TilingOptions | None, device, choice: Tiling):
    """``(bytes, opts)``: what to ask ComfyUI to free on ``device`` before the pass (the engine's own
    estimate, :func:`cvvae_core.tiling.memory_request`, of the plan it will run there with the whole
    device), and the options to run: official ones when no exact plan fits even then (see
    :meth:`Tiling.without_exact_plan`)."""
    try:
        return tiling.memory_request(model, direction, shape, opts, device=device), opts
    except MemoryBudgetError as err:
        opts = choice.without_exact_plan(opts, err)
        return tiling.memory_request(model, direction, shape, opts, device=device), opts


def settle(model, direction, shape, opts: TilingOptions | None, patcher, device, choice: Tiling):
    """The options a loaded model runs with. On a GPU an automatic seamless plan is sized from what
    ComfyUI reports free now (its allocator cache counts as free there, not in CUDA's figure); the
    plan is then made (no work yet) and, when none fits, :meth:`Tiling.without_exact_plan` decides."""
    if opts is None or opts.mode != "seamless":
        return opts
    if opts.memory_budget is None and torch.device(device).type == "cuda":
        opts.memory_budget = int(free_memory(patcher, device) * FREE_MEMORY_SHARE)
    try:
        tiling.plan_for(model, direction, shape, opts, device=torch.device(device))
    except MemoryBudgetError as err:
        return choice.without_exact_plan(opts, err)
    return opts


@contextlib.contextmanager
def comfy_pass(vae, direction, shape, choice: Tiling, opts: TilingOptions | None):
    """A pass that loads the model itself (the pack's nodes, core tiled nodes): ask ComfyUI for room and
    load, settle the plan, then run (yielding the options to run with) on the VAE's device under
    :func:`comfy_errors`."""
    model = vae.cvvae_model
    need, opts = request(model, direction, shape, opts, vae.device, choice)
    mm.load_models_gpu([vae.patcher], memory_required=need, force_full_load=True)
    opts = settle(model, direction, shape, opts, vae.patcher, vae.device, choice)
    with device_context(vae.device), comfy_errors("encoding" if direction is tiling.ENCODE else "decoding"):
        yield opts


@contextlib.contextmanager
def comfy_errors(what: str):
    """Translate cancel/out-of-memory into what ComfyUI expects and leave no cached GPU memory behind.
    Out of memory (after the engine's own smaller plans) is raised as the engine's
    :class:`~cvvae_core.errors.OutOfMemoryError`, a ``torch.OutOfMemoryError``: the type ComfyUI's
    VAE fallbacks and its executor recognise."""
    outcome = None
    try:
        yield
    except CancelledError:
        outcome = "cancelled"
    except Exception as err:
        if not is_out_of_memory(err):
            raise
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
    """Video ``[B, 3, T, H, W]`` in about [-1, 1] -> IMAGE ``[B*T, H, W, 3]`` in 0..1, in ComfyUI's
    intermediate dtype."""
    frames = video.movedim(1, -1).reshape(-1, *video.shape[-2:], video.shape[1])
    return ((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0).to(output_dtype())
