"""Stand-in for comfy.sd.VAE: default attributes and the encode/decode call sites core nodes reach
(see the integration facts, section 2). ComfyUI's own tilers are not reproduced: the stand-in's
``decode_tiled_3d`` / ``encode_tiled_3d`` run untiled (only shapes matter for image VAEs here).

``GENERATION`` picks which ComfyUI's comfy/sd.py the call sites follow (read from each version's source):
* ``"0.8"`` (0.8.0): ``decode(z)`` / ``encode(x)`` only; out of memory -> ``decode_tiled_3d`` /
  ``encode_tiled_3d`` (256-pixel tiles); ``decode_tiled`` / ``encode_tiled`` -> the same ``*_3d``.
* ``"0.33"`` (0.33.0): a first stage with ``comfy_has_chunked_io`` gets a preallocated output
  (``decode_output_shape``) to fill through ``decode(z, output_buffer=...)``, post-processed in place,
  and ``encode(x, device=...)`` the pixels still on the CPU; a VAE with ``handles_tiling`` is tiled
  through the first stage's ``decode_tiled`` / ``encode_tiled`` (``_decode_tiled_owned``), also after
  out of memory, with the memory request of one tile first.
* ``"0.38"`` (the newest read, 0.38.1): as 0.33, plus: a first stage with
  ``comfy_decode_estimate_is_reliable`` whose estimate exceeds free memory skips the untiled attempt;
  the decode fallback raises its 256-pixel tile to ``preferred_decode_tile(free_memory, dtype)``;
  ``encode`` / ``encode_tiled`` take ``not_video``.
"""
import logging

import torch

from . import model_management

GENERATIONS = ("0.8", "0.33", "0.38")
GENERATION = "0.38"


def since(version: str) -> bool:
    return GENERATIONS.index(GENERATION) >= GENERATIONS.index(version)


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        self.memory_used_encode = lambda shape, dtype: 1767 * shape[2] * shape[3] * model_management.dtype_size(dtype)
        self.memory_used_decode = lambda shape, dtype: 2178 * shape[2] * shape[3] * 64 * model_management.dtype_size(dtype)
        self.downscale_ratio = 8
        self.upscale_ratio = 8
        self.latent_channels = 4
        self.latent_dim = 2
        self.output_channels = 3
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)  # in place, as in 0.3x
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.disable_offload = False
        self.not_video = False
        self.size = None
        self.downscale_index_formula = None
        self.upscale_index_formula = None
        self.crop_input = True
        self.handles_tiling = False
        if not sd:
            logging.warning("WARNING: No VAE weights detected, VAE not initalized.")
            self.first_stage_model = None
            return
        raise NotImplementedError("the stand-in builds no architectures")

    def model_size(self):
        if self.size is None:
            self.size = model_management.module_size(self.first_stage_model)
        return self.size

    def throw_exception_if_invalid(self):
        if self.first_stage_model is None:
            raise RuntimeError("ERROR: VAE is invalid: None")

    def spacial_compression_decode(self):
        try:
            return self.upscale_ratio[-1]
        except TypeError:
            return self.upscale_ratio

    def spacial_compression_encode(self):
        try:
            return self.downscale_ratio[-1]
        except TypeError:
            return self.downscale_ratio

    def temporal_compression_decode(self):
        try:
            return round(self.upscale_ratio[0](8192) / 8192)
        except TypeError:
            return None

    def vae_encode_crop_pixels(self, pixels):
        r = self.spacial_compression_encode()
        for d, n in enumerate(pixels.shape[1:-1]):
            keep = (n // r) * r
            if keep != n:
                pixels = pixels.narrow(d + 1, (n % r) // 2, keep)
        return pixels[..., :self.output_channels]

    def _free_memory(self):
        if since("0.33"):
            return self.patcher.get_free_memory(self.device)
        return model_management.get_free_memory(self.device)

    def _to_model_layout(self, pixel_samples, not_video=None):
        pixel_samples = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)
        not_video = self.not_video if not_video is None else not_video
        if self.latent_dim == 3 and pixel_samples.ndim < 5:
            if not not_video:
                pixel_samples = pixel_samples.movedim(1, 0).unsqueeze(0)
            else:
                pixel_samples = pixel_samples.unsqueeze(2)
        return pixel_samples

    def _chunked_io(self) -> bool:
        return since("0.33") and getattr(self.first_stage_model, "comfy_has_chunked_io", False)

    def _tile_bounded_shape(self, shape, tile_x, tile_y, tile_t):
        s = list(shape)
        for i, tile in ((2, tile_t), (3, tile_y), (4, tile_x)):
            if tile is not None and len(s) == 5:
                s[i] = min(s[i], tile)
        return tuple(s)

    def _decode_tiled_owned(self, samples, **kwargs):
        out = self.first_stage_model.decode_tiled(samples.to(self.vae_dtype).to(self.device), **kwargs)
        return self.process_output(out.to(device=self.output_device, dtype=torch.float32, copy=True))

    def _encode_tiled_owned(self, pixel_samples, **kwargs):
        x = self.process_input(pixel_samples).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode_tiled(x, **kwargs).to(device=self.output_device, dtype=torch.float32)

    def encode(self, pixel_samples, **kwargs):
        self.throw_exception_if_invalid()
        if kwargs and not since("0.38"):
            raise TypeError(f"encode() got unexpected keyword arguments {sorted(kwargs)}")
        pixel_samples = self._to_model_layout(pixel_samples, kwargs.get("not_video"))
        try:
            memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)
            batch = max(1, int(self._free_memory() / max(1, memory_used)))
            outs = []
            for x in range(0, pixel_samples.shape[0], batch):
                pixels_in = self.process_input(pixel_samples[x:x + batch]).to(self.vae_dtype)
                if self._chunked_io():
                    out = self.first_stage_model.encode(pixels_in, device=self.device)
                else:
                    out = self.first_stage_model.encode(pixels_in.to(self.device))
                outs.append(out.to(self.output_device).float())
            return torch.cat(outs)
        except model_management.OOM_EXCEPTION:
            logging.warning("Warning: Ran out of memory when regular VAE encoding, retrying with tiled VAE encoding.")
        tile = 256
        if since("0.33") and self.handles_tiling:
            return self._encode_tiled_owned(pixel_samples, tile_x=tile, tile_y=tile, overlap=tile // 4)
        return self.encode_tiled_3d(pixel_samples, tile_x=tile, tile_y=tile, overlap=(1, tile // 4, tile // 4))

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        pixel_samples = self._to_model_layout(pixel_samples)
        model_management.load_models_gpu([self.patcher], memory_required=self.memory_used_encode(
            pixel_samples.shape, self.vae_dtype), force_full_load=self.disable_offload)
        if since("0.33") and self.handles_tiling:
            args = {k: v for k, v in dict(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t,
                                          overlap_t=overlap_t).items() if v is not None}
            return self._encode_tiled_owned(pixel_samples, **args)
        return self.encode_tiled_3d(pixel_samples, tile_t=tile_t, tile_x=tile_x, tile_y=tile_y, overlap=overlap)

    def encode_tiled_3d(self, samples, tile_t=9999, tile_x=512, tile_y=512, overlap=(1, 64, 64)):
        out = self.first_stage_model.encode(self.process_input(samples).to(self.vae_dtype))
        return out.to(self.output_device).float()

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        if self.latent_dim == 2 and samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        pixel_samples = None
        try:
            memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)
            free_memory = self._free_memory()
            batch = max(1, int(free_memory / memory_used))
            if since("0.38") and getattr(self.first_stage_model, "comfy_decode_estimate_is_reliable", False) \
                    and memory_used > free_memory:
                raise model_management.OOM_EXCEPTION("decode estimate exceeds free memory; going straight to tiled")
            chunked = self._chunked_io()
            if chunked:
                pixel_samples = torch.empty(self.first_stage_model.decode_output_shape(samples_in.shape),
                                            device=self.output_device, dtype=torch.float32)
            for x in range(0, samples_in.shape[0], batch):
                samples = samples_in[x:x + batch].to(self.vae_dtype).to(self.device)
                if chunked:
                    self.first_stage_model.decode(samples, output_buffer=pixel_samples[x:x + batch], **vae_options)
                else:
                    out = self.first_stage_model.decode(samples, **vae_options).to(self.output_device).float()
                    if pixel_samples is None:
                        pixel_samples = torch.empty((samples_in.shape[0],) + tuple(out.shape[1:]),
                                                    device=self.output_device)
                    pixel_samples[x:x + batch] = out
                self.process_output(pixel_samples[x:x + batch])
            return pixel_samples.movedim(1, -1)
        except model_management.OOM_EXCEPTION:
            logging.warning("Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
        tile = 256 // self.spacial_compression_decode()
        prefers_tile = getattr(self.first_stage_model, "preferred_decode_tile", None)
        if since("0.38") and prefers_tile is not None:
            tile = max(tile, prefers_tile(self._free_memory(), self.vae_dtype))
        overlap = tile // 4
        if since("0.33") and self.handles_tiling:
            memory_used = self.memory_used_decode(self._tile_bounded_shape(samples_in.shape, tile, tile, None),
                                                  self.vae_dtype)
            model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                             force_full_load=self.disable_offload)
            pixel_samples = self._decode_tiled_owned(samples_in, tile_x=tile, tile_y=tile, overlap=overlap)
        else:
            pixel_samples = self.decode_tiled_3d(samples_in, tile_x=tile, tile_y=tile, overlap=(1, overlap, overlap))
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        memory_used = self.memory_used_decode(self._tile_bounded_shape(samples.shape, tile_x, tile_y, tile_t),
                                              self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                         force_full_load=self.disable_offload)
        if since("0.33") and self.handles_tiling:
            args = {k: v for k, v in dict(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t,
                                          overlap_t=overlap_t).items() if v is not None}
            output = self._decode_tiled_owned(samples, **args)
        else:
            output = self.decode_tiled_3d(samples, tile_t=tile_t, tile_x=tile_x, tile_y=tile_y, overlap=overlap)
        return output.movedim(1, -1)

    def decode_tiled_3d(self, samples, tile_t=999, tile_x=32, tile_y=32, overlap=(1, 8, 8)):
        out = self.first_stage_model.decode(samples.to(self.vae_dtype).to(self.device)).to(self.output_device).float()
        return self.process_output(out)
