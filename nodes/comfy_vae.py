"""A CV-VAE dressed as ComfyUI's own ``comfy.sd.VAE``.

ComfyUI has no hook to detect a new VAE architecture from a state dict, so ``comfy.sd.VAE(sd=...)``
cannot build a CV-VAE. Core nodes only call the VAE's attributes and methods (links are checked by
the type name "VAE"), so a subclass that fills them in works with VAEEncode, VAEDecode,
VAEEncodeTiled, VAEDecodeTiled, SVD_img2vid_Conditioning and the rest.

Semantics towards core nodes (the pack's VideoEncode/VideoDecode nodes do the video work):

* an IMAGE batch given to core VAEEncode is a batch of separate images ("frame-wise"), and comes
  back as the 4D image-latent batch ``[N, C, h, w]`` that SD/SVD sampling uses;
* a 4D latent ``[T, C, h, w]`` given to core VAEDecode is decoded frame by frame (each latent
  frame as a 1-frame video, i.e. CV-VAE's image mode) -> IMAGE ``[T, H, W, 3]``;
* a 5D latent ``[B, C, 1+k, h, w]`` given to core VAEDecode is decoded as video -> ``1+4k`` frames.

Every pass, tiled or not, runs the pack's exact engine (:mod:`cvvae_core.tiling`, mode seamless):
ComfyUI's own tiler would normalise each tile on its own and blend them (colour shifts, seams).
How each ComfyUI generation reaches it:

* core VAEDecode / VAEEncode call the first stage's ``decode`` / ``encode``: the engine, with a
  plan sized from what ComfyUI reports free once it has loaded the model, as in the pack's nodes with
  tiling ``auto`` (official tiling, with one warning, when no exact plan fits); ComfyUI sizes its
  batches and makes room with ``memory_used_*``, the engine's estimate of that plan;
* core VAEDecodeTiled / VAEEncodeTiled call this class's ``decode_tiled`` / ``encode_tiled``: the
  engine with ComfyUI's tile and temporal sizes as its piece sizes;
* ComfyUI's fallback after an out-of-memory error: 0.3x and newer see ``handles_tiling`` and call
  the first stage's ``decode_tiled`` / ``encode_tiled``; the newest also skips the untiled attempt
  when the (reliable) estimate exceeds free memory and asks ``preferred_decode_tile``; 0.8.0 calls
  ``decode_tiled_3d`` / ``encode_tiled_3d``, overridden here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import threading
import weakref

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

from ..cvvae_core import load_model, tiling
from ..cvvae_core.devices import DTYPES
from ..cvvae_core.errors import FrameCountError, MemoryBudgetError
from ..cvvae_core.model.frames import check_latent
from ..cvvae_core.tiling.planner import FREE_MEMORY_SHARE, MIN_TILE
from . import runtime

log = logging.getLogger("CV-VAE")

WORKING_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@dataclasses.dataclass
class CoreCall:
    """One call of a core VAE method, as the first stage sees it: the patcher ComfyUI loaded the model
    with (it sizes the plan), the latent being decoded (for ``preferred_decode_tile``), and the tiling
    choice (``auto``: one fallback warning per call however many batches ComfyUI makes)."""

    patcher: object = None
    shape: tuple | None = None
    tiling: runtime.Tiling = dataclasses.field(default_factory=runtime.Tiling)


def core_tiling(direction) -> runtime.Tiling:
    if direction is tiling.ENCODE:
        return runtime.Tiling(node="CV-VAE (VAE Encode)",
                              exact_hint="encode with 'CV-VAE Video Encode' and disk_spill on")
    return runtime.Tiling(node="CV-VAE (VAE Decode)", exact_hint="decode with 'CV-VAE Video Decode' and disk_spill on")


class CVVAEFirstStage(nn.Module):
    """The ``first_stage_model`` ComfyUI calls: plain tensors in and out, deterministic (posterior mean).

    Newer ComfyUI (0.3x, comfy/sd.py) reads ``comfy_has_chunked_io``: when it is true, ``VAE.decode``
    preallocates the whole output once (shape from :meth:`decode_output_shape`) and has
    :meth:`decode` fill slices of it, and ``VAE.encode`` hands over the pixels on the CPU with the
    compute device. Older ComfyUI (0.8.0) never reads the flag and calls ``decode(z)`` / ``encode(x)``.
    """

    #: ``memory_used_decode`` is the estimate the engine plans by, for the plan :meth:`decode` then
    #: runs (it counts every layer output and piece the engine holds), so when even that exceeds free
    #: memory the newest ComfyUI tiles straight away.
    comfy_decode_estimate_is_reliable = True

    @property
    def comfy_has_chunked_io(self) -> bool:
        """True when decoding on another device than ComfyUI's output (a GPU, output in CPU RAM): the
        engine writes the decoded clip into CPU RAM piece by piece, and it is then copied once into
        ComfyUI's preallocated output, where ComfyUI would otherwise copy it twice (into a fresh tensor,
        then into its output). On one device the preallocated buffer would only sit next to the
        decoder's own output and raise the peak (docs/comfyui.md, "Preallocated output")."""
        return self.cvvae.device != torch.device(mm.intermediate_device())

    def __init__(self, cvvae, output_device):
        super().__init__()
        self.cvvae = cvvae
        self.output_device = output_device  # where ComfyUI wants results: the engine writes them there
        self.call: CoreCall | None = None  # set by CVVAEComfyVAE around each core call (see serving)

    @property
    def config(self):
        return self.cvvae.config

    def encode(self, x: torch.Tensor, device: torch.device | None = None, **_unused) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] (``T`` = 1+4k) -> latent ``[B, C, 1+k, h, w]``, float32
        on ComfyUI's output device. ``device`` (chunked-io callers) needs no handling: the model moves
        its input to the device ComfyUI loaded it on."""
        return self.run(tiling.ENCODE, x, self.options(tiling.ENCODE))

    def encode_tiled(self, x: torch.Tensor, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None,
                     **_unused) -> torch.Tensor:
        """:meth:`encode` in pieces of ``tile_x`` x ``tile_y`` pixels and ``tile_t`` frames."""
        return self.run(tiling.ENCODE, x, self.options(tiling.ENCODE, tile_x, tile_y, tile_t, overlap, overlap_t))

    def decode_output_shape(self, latent_shape) -> tuple[int, ...]:
        """Pixels ``[B, 3, 4t-3, 8h, 8w]`` that :meth:`decode` writes for a latent ``[B, C, t, h, w]``."""
        b, _, t, h, w = latent_shape
        s = self.config.spatial_compression
        return (b, self.config.in_channels, self.config.video_frames(t), h * s, w * s)

    def decode(self, z: torch.Tensor, output_buffer: torch.Tensor | None = None, **_vae_options) -> torch.Tensor:
        """Latent ``[B, C, t, h, w]`` -> pixels ``[B, 3, 4t-3, H, W]`` (about [-1, 1]), written into
        ``output_buffer`` when ComfyUI gives one (and returned)."""
        video = self.run(tiling.DECODE, z, self.options(tiling.DECODE))
        if output_buffer is None:
            return video
        output_buffer.copy_(video)
        return output_buffer

    def decode_tiled(self, z: torch.Tensor, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None,
                     **_unused) -> torch.Tensor:
        """:meth:`decode` in pieces of ``tile_x`` x ``tile_y`` latent pixels and ``tile_t`` latent frames."""
        return self.run(tiling.DECODE, z, self.options(tiling.DECODE, tile_x, tile_y, tile_t, overlap, overlap_t))

    def run(self, direction, x: torch.Tensor, opts) -> torch.Tensor:
        """One engine pass on the model ComfyUI has loaded: the plan settled first (see
        runtime.settle), then cancel and out-of-memory become what ComfyUI expects."""
        call = self.call or CoreCall(tiling=core_tiling(direction))
        device = self.cvvae.device
        opts = runtime.settle(self.cvvae, direction, x.shape, opts, call.patcher, device, call.tiling)
        with runtime.device_context(device), runtime.comfy_errors(
                "encoding" if direction is tiling.ENCODE else "decoding"):
            return self.engine(direction, x, opts)

    def engine(self, direction, x: torch.Tensor, opts) -> torch.Tensor:
        if direction is tiling.ENCODE:
            self.check_frames(x.shape[2])
            return self.cvvae.encode(x.clamp(-1.0, 1.0), tiling=opts)
        return self.cvvae.decode(x, tiling=opts)

    def check_frames(self, frames: int):
        cfg = self.config
        if frames != cfg.video_frames(cfg.latent_frames(frames)):
            raise FrameCountError(
                f"CV-VAE got {frames} frames in one clip; it needs 1+{cfg.time_compression}k frames "
                f"({', '.join(str(cfg.video_frames(k)) for k in range(1, 6))}, ...). "
                "Use the 'CV-VAE Video Encode' node with frame_policy 'pad' or 'trim'.")

    def options(self, direction, tile_x=None, tile_y=None, tile_t=None, overlap=None, overlap_t=None):
        """Engine options from ComfyUI's sizes, in its units (decode: latent pixels and frames; encode:
        pixels and frames); None = sized from free memory. The square tile is the smaller side, rounded
        down to whole latent pixels; a chunk covers at least one latent frame. Overlaps are not needed."""
        cfg = self.config
        s, tc = cfg.spatial_compression, cfg.time_compression
        unit = (s, tc) if direction is tiling.DECODE else (1, 1)
        sides = [v * unit[0] for v in (tile_x, tile_y) if v]
        tile = max(s, min(sides) // s * s) if sides else None
        if tile is not None and tile != min(sides):
            log.info("CV-VAE: tile size %d px is not a multiple of %d px; using %d px.", min(sides), s, tile)
        chunk = max(tc, tile_t * unit[1]) if tile_t else None
        if overlap or overlap_t:
            _note_overlap_once()
        return runtime.engine_options(tile_size=tile, chunk_frames=chunk, output_device=self.output_device,
                                      pbar=runtime.progress_bar())

    def preferred_decode_tile(self, free_memory: int, dtype=None) -> int:
        """Newest ComfyUI's out-of-memory fallback asks this (latent pixels) for the clip ``VAE.decode``
        is working on: the largest square tile whose engine plan fits ``free_memory`` (``dtype`` is the
        model's own, which the estimate already uses)."""
        if self.call is None or self.call.shape is None:
            return 0  # not inside VAE.decode: ComfyUI keeps its own floor
        s = self.config.spatial_compression
        shape = (1, *self.call.shape[1:])
        budget = int(free_memory * FREE_MEMORY_SHARE)
        if budget <= 0:
            return 0
        tile = max(shape[3:]) * s
        while True:
            opts = runtime.engine_options(tile_size=tile, output_device=self.output_device, memory_budget=budget)
            try:
                tiling.plan_for(self.cvvae, tiling.DECODE, shape, opts, budget=budget)
                break
            except MemoryBudgetError:
                if tile <= MIN_TILE:
                    return 0  # no exact plan at any tile: the pass falls back to official tiling (runtime.settle)
            tile = max(MIN_TILE, tile // 2 // s * s)
        return tile // s

    @contextlib.contextmanager
    def serving(self, vae, direction, shape=None):
        """Around one core VAE call of ``vae``: the first stage's passes size their plans with its
        patcher and share one fallback warning; ``shape`` is the latent VAE.decode works on (asked by
        :meth:`preferred_decode_tile`, which ComfyUI calls without one)."""
        self.call = CoreCall(vae.patcher, None if shape is None else tuple(shape), core_tiling(direction))
        try:
            yield self.call
        finally:
            self.call = None


_overlap_noted = False


def _note_overlap_once():
    global _overlap_noted
    if not _overlap_noted:
        _overlap_noted = True
        log.info("CV-VAE: tiled VAE nodes run the exact engine (every layer once, clip-wide statistics); "
                 "overlap and temporal_overlap are not needed and are ignored.")


class _DropNoWeightsWarning(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


class CVVAEComfyVAE(comfy.sd.VAE):
    """``comfy.sd.VAE`` around a :class:`cvvae_core.CVVAE`. Build with :func:`load_comfy_vae`."""

    def __init__(self, cvvae, name: str = "CV-VAE"):
        root = logging.getLogger()
        quiet = _DropNoWeightsWarning()
        root.addFilter(quiet)
        try:
            super().__init__(sd={})  # fills every default attribute, then returns early (no weights)
        finally:
            root.removeFilter(quiet)
        cfg = cvvae.config
        self.name = name
        self.output_device = mm.intermediate_device()
        self.first_stage_model = CVVAEFirstStage(cvvae, self.output_device).eval()
        self.latent_channels = cvvae.latent_channels
        self.latent_dim = 3
        self.output_channels = cfg.in_channels
        self.not_video = True  # core VAEEncode: an IMAGE batch is separate images (frame-wise)
        s, tc = cfg.spatial_compression, cfg.time_compression
        self.upscale_ratio = (lambda k: cfg.video_frames(k) if k > 0 else 0, s, s)
        self.downscale_ratio = (lambda n: cfg.latent_frames(n) if n > 0 else 0, s, s)
        self.upscale_index_formula = (tc, s, s)
        self.downscale_index_formula = (tc, s, s)
        self.handles_tiling = True  # ComfyUI 0.3x+: its tiled fallback calls the first stage's *_tiled
        # ComfyUI passes vae_dtype, the model's own dtype, which the engine's estimate already uses.
        self.memory_used_encode = lambda shape, dtype: self.pass_bytes(tiling.ENCODE, shape)
        self.memory_used_decode = lambda shape, dtype: self.pass_bytes(tiling.DECODE, shape)
        self.working_dtypes = list(WORKING_DTYPES)
        # Plain torch layers cannot run partially offloaded (lowvram): always load the whole model.
        self.disable_offload = True
        self.device = mm.vae_device()
        self.vae_dtype = cvvae.dtype  # built in the dtype it runs in (load_comfy_vae): no cast, no second copy
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device())
        self.size = None
        self.model_size()
        log.info("CV-VAE %s (%s, %d latent channels) load device: %s, dtype: %s", name, cvvae.variant,
                 self.latent_channels, self.device, self.vae_dtype)

    @property
    def cvvae_model(self):
        """The :class:`cvvae_core.CVVAE` this VAE runs: the first stage's, which Select VAE Device
        replaces with a fresh copy on another GPU."""
        return self.first_stage_model.cvvae

    def pass_bytes(self, direction, shape) -> int:
        """Device bytes of the engine's plan for one batch element of ``shape`` (4-D: one frame), as
        ComfyUI sizes batches per element; the plan the first stage then runs (see runtime.request):
        official tiling's when no exact plan fits."""
        shape = [1, *shape[1:]]
        if len(shape) == 4:
            shape.insert(2, 1)
        opts = runtime.engine_options(output_device=self.output_device)
        try:
            return tiling.memory_request(self.cvvae_model, direction, shape, opts, device=self.device)
        except MemoryBudgetError:
            official = dataclasses.replace(opts, mode="official")
            return tiling.memory_request(self.cvvae_model, direction, shape, official, device=self.device)

    # Core methods: 4D latents are frames-as-batch image latents. Every method ComfyUI calls takes
    # unknown keyword arguments (newer ComfyUI passes more, e.g. not_video or a progress label).
    def encode(self, pixel_samples, **kwargs):
        framewise = kwargs.get("not_video", self.not_video)
        with self.first_stage_model.serving(self, tiling.ENCODE):
            latent = super().encode(pixel_samples, **_accepted(comfy.sd.VAE.encode, kwargs))
        return _squeeze_single_frame(latent, framewise)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None,
                     not_video=None, **_unused):
        """Core VAE Encode (Tiled): the exact engine with ComfyUI's sizes as piece sizes (pixels,
        frames); the same latents as VAE Encode."""
        framewise = self.not_video if not_video is None else not_video
        pixels = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)  # [N, 3, H, W]
        pixels = pixels.unsqueeze(2) if framewise else pixels.movedim(1, 0).unsqueeze(0)
        stage = self.first_stage_model
        opts = stage.options(tiling.ENCODE, tile_x, tile_y, tile_t, overlap, overlap_t)
        with stage.serving(self, tiling.ENCODE) as call, \
                runtime.comfy_pass(self, tiling.ENCODE, pixels.shape, call.tiling, opts) as opts:
            latent = stage.engine(tiling.ENCODE, self.process_input(pixels), opts)
        latent = _squeeze_single_frame(latent.to(self.output_device, runtime.output_dtype()), framewise)
        formatted = getattr(self, "format_encoded", None)  # ComfyUI 0.3x: as its own encode_tiled ends
        return latent if formatted is None else formatted(latent)

    def decode(self, samples_in, vae_options={}, **kwargs):
        latent = self._video_latent(samples_in)
        with self.first_stage_model.serving(self, tiling.DECODE, latent.shape):
            out = super().decode(latent, vae_options, **_accepted(comfy.sd.VAE.decode, kwargs))
        return out[:, 0] if samples_in.dim() == 4 else out

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None, **_unused):
        """Core VAE Decode (Tiled): the exact engine with ComfyUI's sizes as piece sizes (latent pixels,
        latent frames); the same frames as VAE Decode."""
        latent = self._video_latent(samples)
        stage = self.first_stage_model
        opts = stage.options(tiling.DECODE, tile_x, tile_y, tile_t, overlap, overlap_t)
        with stage.serving(self, tiling.DECODE) as call, \
                runtime.comfy_pass(self, tiling.DECODE, latent.shape, call.tiling, opts) as opts:
            video = stage.engine(tiling.DECODE, latent, opts)
        out = self.process_output(video.to(self.output_device, runtime.output_dtype())).movedim(1, -1)
        return out[:, 0] if samples.dim() == 4 else out

    # ComfyUI 0.8.0's out-of-memory fallback (newer ones go through handles_tiling) ------------------
    def decode_tiled_3d(self, samples, tile_t=None, tile_x=None, tile_y=None, overlap=None, **_unused):
        video = self.first_stage_model.decode_tiled(samples, tile_x, tile_y, None, tile_t)
        return self.process_output(video.to(self.output_device, runtime.output_dtype()))

    def encode_tiled_3d(self, samples, tile_t=None, tile_x=None, tile_y=None, overlap=None, **_unused):
        latent = self.first_stage_model.encode_tiled(self.process_input(samples), tile_x, tile_y, None, tile_t)
        return latent.to(self.output_device, runtime.output_dtype())

    @property
    def config(self):
        return self.cvvae_model.config

    def _video_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """A 5-D latent (4-D frames-as-batch: one latent frame each), its channels checked first so that
        a latent of another model family stops with a one-line error, not deep in a convolution."""
        latent = samples.unsqueeze(2) if samples.dim() == 4 else samples
        check_latent(latent, self.config)
        return latent

    def __repr__(self):
        return f"CVVAEComfyVAE({self.name!r}, variant={self.cvvae_model.variant}, dtype={self.vae_dtype})"


def _accepted(method, kwargs: dict) -> dict:
    """The keyword arguments this ComfyUI's ``method`` takes; the others are for this pack's VAE only
    or from a newer ComfyUI, and are dropped."""
    params = inspect.signature(method).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _squeeze_single_frame(latent: torch.Tensor, framewise: bool) -> torch.Tensor:
    if framewise and latent.dim() == 5 and latent.shape[2] == 1:
        return latent[:, :, 0]
    return latent


def get_cvvae(vae, node: str):
    """The :class:`cvvae_core.CVVAE` inside a VAE from the CV-VAE loader, or a clear error."""
    model = getattr(vae, "cvvae_model", None)
    if model is None:
        raise ValueError(
            f"{node} needs the VAE output of the 'Load CV-VAE' node; it got {type(vae).__name__} "
            "(an image VAE from a checkpoint or VAELoader). Connect a 'Load CV-VAE' node, or use "
            "core VAEEncode/VAEDecode for image VAEs.")
    return model


# Loading with a per-file cache ---------------------------------------------------------------
_cache: "weakref.WeakValueDictionary[tuple, CVVAEComfyVAE]" = weakref.WeakValueDictionary()
_cache_lock = threading.Lock()


def resolve_dtype(choice: str) -> torch.dtype:
    """``auto`` -> ComfyUI's VAE dtype for its VAE device (fp32 on CPU, bf16/fp16 on GPUs, or what
    --fp16-vae/--bf16-vae/--fp32-vae say); else the named one."""
    if choice == "auto":
        return mm.vae_dtype(mm.vae_device(), WORKING_DTYPES)
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {choice!r}")
    return DTYPES[choice]


def load_comfy_vae(path: str, dtype_choice: str = "auto", name: str | None = None) -> CVVAEComfyVAE:
    """Load (or reuse) the CV-VAE at ``path``. One object per (file, dtype, modification time) while
    anything in ComfyUI still holds it; ComfyUI's model management moves it between devices."""
    path = os.path.realpath(path)
    st = os.stat(path)
    key = (path, resolve_dtype(dtype_choice), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        vae = _cache.get(key)
        if vae is None:
            vae = _cache[key] = build_comfy_vae(path, dtype_choice, name)
        return vae


def build_comfy_vae(path: str, dtype_choice: str = "auto", name: str | None = None) -> CVVAEComfyVAE:
    """A new CV-VAE from ``path``, built on the offload device straight in the working dtype: one copy
    of the weights, never an fp32 copy that is then cast. The user picked the file from ComfyUI's model
    list, which offers .ckpt/.pt too; like ComfyUI's own loaders these are read with
    torch.load(weights_only=True), never fully unpickled."""
    cvvae = load_model(path, device=mm.vae_offload_device(), dtype=resolve_dtype(dtype_choice), allow_pickle=True)
    vae = CVVAEComfyVAE(cvvae, name=name or os.path.basename(path))
    # ComfyUI 0.3x builds another copy through this factory when a node moves the VAE to another GPU
    # (Select VAE Device: ModelPatcher.deepclone_multigpu).
    vae.patcher.cached_patcher_init = (load_cvvae_patcher, (path, dtype_choice, name))
    return vae


def load_cvvae_patcher(path: str, dtype_choice: str = "auto", name: str | None = None, disable_dynamic=False):
    """The patcher of a fresh CV-VAE from ``path`` (``cached_patcher_init``'s factory; the pack's
    patchers are never dynamic, so ``disable_dynamic`` changes nothing)."""
    return build_comfy_vae(path, dtype_choice, name).patcher
