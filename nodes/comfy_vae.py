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
"""
from __future__ import annotations

import logging
import math
import os
import threading
import weakref

import torch
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

from ..cvvae_core import load_model, tiling
from ..cvvae_core.errors import FrameCountError

log = logging.getLogger("CV-VAE")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WORKING_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

def pixel_frames(latent_frames: int) -> int:
    return max(0, latent_frames * 4 - 3)


def latent_frames(frames: int) -> int:
    return max(0, math.floor((frames + 3) / 4))


class CVVAEFirstStage(nn.Module):
    """The ``first_stage_model`` ComfyUI calls: plain tensors in and out, deterministic (posterior mean).

    Newer ComfyUI (0.3x, comfy/sd.py) reads ``comfy_has_chunked_io``: when it is true, ``VAE.decode``
    preallocates the whole output once (shape from :meth:`decode_output_shape`) and has
    :meth:`decode` fill slices of it, and ``VAE.encode`` hands over the pixels on the CPU with the
    compute device. Older ComfyUI (0.8.0) never reads the flag and calls ``decode(z)`` / ``encode(x)``.
    """

    @property
    def comfy_has_chunked_io(self) -> bool:
        """True when decoding on another device than ComfyUI's output (a GPU, output in CPU RAM): the
        decoded clip then goes from the GPU straight into ComfyUI's buffer, instead of into a CPU copy
        that ComfyUI copies again into its output (one full-size copy less in RAM). On one device the
        preallocated buffer would only sit next to the decoder's own output and activations: measured
        in ComfyUI 0.33 on CPU, core VAE Decode of 25 frames at 576x1024 peaked 128 MiB higher with it."""
        return self.cvvae.device != torch.device(mm.intermediate_device())

    def __init__(self, cvvae):
        super().__init__()
        self.cvvae = cvvae

    def encode(self, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1] (``T`` = 1+4k) -> latent ``[B, C, 1+k, h, w]``.
        ``device`` (chunked-io callers) needs no handling: the model moves its input to the device
        ComfyUI loaded it on."""
        if x.dim() == 4:
            x = x.unsqueeze(2)
        frames = x.shape[2]
        if (frames - 1) % 4:
            raise FrameCountError(
                f"CV-VAE got {frames} frames in one clip; it needs 1+4k frames (1, 5, 9, 13, 17, ...). "
                "Use the 'CV-VAE Video Encode' node with frame_policy 'pad' or 'trim'.")
        return self.cvvae.encode(x.clamp(-1.0, 1.0))

    def decode_output_shape(self, latent_shape) -> tuple[int, ...]:
        """Pixels ``[B, 3, 4t-3, 8h, 8w]`` that :meth:`decode` writes for a latent ``[B, C, t, h, w]``."""
        b, _, t, h, w = latent_shape
        cfg = self.cvvae.config
        return (b, cfg.in_channels, cfg.video_frames(t), h * cfg.spatial_compression, w * cfg.spatial_compression)

    def decode(self, z: torch.Tensor, output_buffer: torch.Tensor | None = None, **_vae_options) -> torch.Tensor:
        """Latent ``[B, C, t, h, w]`` -> pixels ``[B, 3, 4t-3, H, W]`` (about [-1, 1]), written into
        ``output_buffer`` when ComfyUI gives one (and returned)."""
        if z.dim() == 4:  # one image per latent (CVVAEComfyVAE passes 5-D; kept for direct callers)
            return self.decode(z.unsqueeze(2))[:, :, 0]
        video = self.cvvae.decode(z)
        if output_buffer is None:
            return video
        output_buffer.copy_(video)
        return output_buffer


class _DropNoWeightsWarning(logging.Filter):
    def filter(self, record):
        return "No VAE weights detected" not in record.getMessage()


class CVVAEComfyVAE(comfy.sd.VAE):
    """``comfy.sd.VAE`` around a :class:`cvvae_core.CVVAE`. Build with :func:`load_comfy_vae`."""

    def __init__(self, cvvae, name: str = "CV-VAE", dtype: torch.dtype | None = None):
        root = logging.getLogger()
        quiet = _DropNoWeightsWarning()
        root.addFilter(quiet)
        try:
            super().__init__(sd={})  # fills every default attribute, then returns early (no weights)
        finally:
            root.removeFilter(quiet)
        self.name = name
        self.cvvae_model = cvvae
        self.first_stage_model = CVVAEFirstStage(cvvae).eval()
        self.latent_channels = cvvae.latent_channels
        self.latent_dim = 3
        self.output_channels = 3
        self.not_video = True  # core VAEEncode: an IMAGE batch is separate images (frame-wise)
        self.upscale_ratio = (pixel_frames, 8, 8)
        self.downscale_ratio = (latent_frames, 8, 8)
        self.upscale_index_formula = (4, 8, 8)
        self.downscale_index_formula = (4, 8, 8)
        # ComfyUI sizes its batches and makes room with these: the engine's estimate of an untiled pass.
        self.memory_used_encode = lambda shape, dtype: self.untiled_bytes(tiling.ENCODE, shape, dtype)
        self.memory_used_decode = lambda shape, dtype: self.untiled_bytes(tiling.DECODE, shape, dtype)
        self.working_dtypes = list(WORKING_DTYPES)
        # Plain torch layers cannot run partially offloaded (lowvram): always load the whole model.
        self.disable_offload = True
        self.device = mm.vae_device()
        self.vae_dtype = dtype if dtype is not None else mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device())
        self.size = None
        self.model_size()
        log.info("CV-VAE %s (%s, %d latent channels) load device: %s, dtype: %s", name, cvvae.variant,
                 self.latent_channels, self.device, self.vae_dtype)

    def untiled_bytes(self, direction, shape, dtype) -> int:
        """Device bytes of an untiled pass of one batch element of ``shape`` (4-D: one frame)."""
        shape = [1, *shape[1:]]
        if len(shape) == 4:
            shape.insert(2, 1)
        return tiling.estimate_memory(self.cvvae_model, direction, shape, tiling.Plan(), self.output_device,
                                      self.device, dtype).total

    # Core methods: 4D latents are frames-as-batch image latents ---------------------------------
    def encode(self, pixel_samples):
        return _squeeze_single_frame(super().encode(pixel_samples), self.not_video)

    def encode_tiled(self, pixel_samples, *args, **kwargs):
        return _squeeze_single_frame(super().encode_tiled(pixel_samples, *args, **kwargs), self.not_video)

    def decode(self, samples_in, vae_options={}):
        if samples_in.dim() == 4:
            return super().decode(samples_in.unsqueeze(2), vae_options)[:, 0]
        return super().decode(samples_in, vae_options)

    def decode_tiled(self, samples, *args, **kwargs):
        if samples.dim() == 4:
            return super().decode_tiled(samples.unsqueeze(2), *args, **kwargs)[:, 0]
        return super().decode_tiled(samples, *args, **kwargs)

    def __repr__(self):
        return f"CVVAEComfyVAE({self.name!r}, variant={self.cvvae_model.variant}, dtype={self.vae_dtype})"


def _squeeze_single_frame(latent: torch.Tensor, not_video: bool) -> torch.Tensor:
    if not_video and latent.dim() == 5 and latent.shape[2] == 1:
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


def resolve_dtype(choice: str) -> torch.dtype | None:
    """``auto`` -> None (ComfyUI's vae_dtype decides: fp32 on CPU, bf16/fp16 on GPUs)."""
    if choice == "auto":
        return None
    if choice not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {choice!r}")
    return DTYPES[choice]


def load_comfy_vae(path: str, dtype_choice: str = "auto", name: str | None = None) -> CVVAEComfyVAE:
    """Load (or reuse) the CV-VAE at ``path``. One object per (file, dtype, modification time) while
    anything in ComfyUI still holds it; ComfyUI's model management moves it between devices."""
    path = os.path.realpath(path)
    st = os.stat(path)
    dtype = resolve_dtype(dtype_choice)
    key = (path, dtype_choice, st.st_mtime_ns, st.st_size)
    with _cache_lock:
        vae = _cache.get(key)
        if vae is not None:
            return vae
        # Build on the offload device in fp32; the VAE object casts to its working dtype.
        # The user picked the file from ComfyUI's model list, which offers .ckpt/.pt too; like ComfyUI's
        # own loaders these are read with torch.load(weights_only=True), never fully unpickled.
        cvvae = load_model(path, device="cpu", dtype=torch.float32, allow_pickle=True)
        vae = CVVAEComfyVAE(cvvae, name=name or os.path.basename(path), dtype=dtype)
        _cache[key] = vae
        return vae
