"""Stand-in for comfy.sd.VAE: default attributes and the encode/decode call sites core nodes reach
(see the integration facts, section 2). ComfyUI's own tilers are not reproduced: the stand-in's
``decode_tiled_3d`` / ``encode_tiled_3d`` run untiled (only shapes matter for image VAEs here).

``GENERATION`` picks which ComfyUI's comfy/sd.py the call sites follow (read from each version's source):
* ``"0.8"`` (0.8.0): ``decode(z)`` / ``encode(x)`` only; out of memory (``except OOM_EXCEPTION``) ->
  ``decode_tiled_3d`` / ``encode_tiled_3d`` (256-pixel tiles); ``decode_tiled`` / ``encode_tiled`` ->
  the same ``*_3d``; outputs float32; free memory from ``model_management.get_free_memory``.
* ``"0.33"`` (0.33.0): a first stage with ``comfy_has_chunked_io`` gets a preallocated output
  (``decode_output_shape``) to fill through ``decode(z, output_buffer=...)``, post-processed in place,
  and ``encode(x, device=...)`` the pixels still on the CPU; a VAE with ``handles_tiling`` is tiled
  through the first stage's ``decode_tiled`` / ``encode_tiled`` (``_decode_tiled_owned``), also after
  out of memory, with the memory request of one tile first. Outputs in ``vae_output_dtype()``
  (``intermediate_dtype()``); free memory from ``patcher.get_free_memory``; passes run inside
  ``cuda_device_context(self.device)``; any exception of a pass goes through ``raise_non_oom`` (only
  out-of-memory errors reach the fallback); ``format_encoded`` (None unless the first stage sets
  ``comfy_format_encoded``) formats what ``encode`` / ``encode_tiled`` return.
* ``"0.38"`` (the newest read, 0.38.1): as 0.33, plus: a first stage with
  ``comfy_decode_estimate_is_reliable`` whose estimate exceeds free memory skips the untiled attempt;
  the decode fallback raises its 256-pixel tile to ``preferred_decode_tile(free_memory, dtype)``;
  ``encode`` / ``encode_tiled`` take ``not_video``.
"""
import contextlib
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
        self.pad_channel_value = None
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
        if since("0.33"):
            self.format_encoded = None
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
        missing = self.output_channels - pixels.shape[-1]
        if missing > 0 and self.pad_channel_value is not None:
            if isinstance(self.pad_channel_value, str):
                return torch.nn.functional.pad(pixels, (0, missing), mode=self.pad_channel_value)
            return torch.nn.functional.pad(pixels, (0, missing), value=self.pad_channel_value)
        return pixels[..., :self.output_channels]

    def vae_output_dtype(self):
        return model_management.intermediate_dtype() if since("0.33") else torch.float32

    def _device_context(self):
        if since("0.33"):
            return model_management.cuda_device_context(self.device)
        return contextlib.nullcontext()

    @staticmethod
    def _raise_unless_oom(e):
        """0.33 and newer: ``raise_non_oom(e)``; 0.8.0 caught only ``OOM_EXCEPTION``."""
        if since("0.33"):
            model_management.raise_non_oom(e)
        elif not isinstance(e, model_management.OOM_EXCEPTION):
            raise e

    def _formatted(self, samples):
        formatted = getattr(self, "format_encoded", None)
        return samples if formatted is None else formatted(samples)

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
        return self.process_output(out.to(device=self.output_device, dtype=self.vae_output_dtype(), copy=True))

    def _encode_tiled_owned(self, pixel_samples, **kwargs):
        x = self.process_input(pixel_samples).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode_tiled(x, **kwargs).to(device=self.output_device,
                                                                    dtype=self.vae_output_dtype())

    def encode(self, pixel_samples, not_video=None):
        self.throw_exception_if_invalid()
        if not_video is not None and not since("0.38"):
            raise TypeError("encode() got an unexpected keyword argument 'not_video'")
        pixel_samples = self._to_model_layout(pixel_samples, not_video)
        do_tile = False
        with self._device_context():
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
                    outs.append(out.to(self.output_device).to(self.vae_output_dtype()))
                samples = torch.cat(outs)
            except Exception as e:
                self._raise_unless_oom(e)
                logging.warning("Warning: Ran out of memory when regular VAE encoding, retrying with tiled VAE encoding.")
                do_tile = True
            if do_tile:
                tile = 256
                if since("0.33") and self.handles_tiling:
                    samples = self._encode_tiled_owned(pixel_samples, tile_x=tile, tile_y=tile, overlap=tile // 4)
                else:
                    samples = self.encode_tiled_3d(pixel_samples, tile_x=tile, tile_y=tile,
                                                   overlap=(1, tile // 4, tile // 4))
        return self._formatted(samples)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None,
                     not_video=None):
        if not_video is not None and not since("0.38"):
            raise TypeError("encode_tiled() got an unexpected keyword argument 'not_video'")
        pixel_samples = self._to_model_layout(pixel_samples, not_video)
        model_management.load_models_gpu([self.patcher], memory_required=self.memory_used_encode(
            pixel_samples.shape, self.vae_dtype), force_full_load=self.disable_offload)
        with self._device_context():
            if since("0.33") and self.handles_tiling:
                args = {k: v for k, v in dict(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t,
                                              overlap_t=overlap_t).items() if v is not None}
                samples = self._encode_tiled_owned(pixel_samples, **args)
            else:
                samples = self.encode_tiled_3d(pixel_samples, tile_t=tile_t, tile_x=tile_x, tile_y=tile_y,
                                               overlap=overlap)
        return self._formatted(samples)

    def encode_tiled_3d(self, samples, tile_t=9999, tile_x=512, tile_y=512, overlap=(1, 64, 64)):
        out = self.first_stage_model.encode(self.process_input(samples).to(self.vae_dtype))
        return out.to(self.output_device).to(self.vae_output_dtype())

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        if self.latent_dim == 2 and samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        pixel_samples = None
        do_tile = False
        with self._device_context():
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
                                                device=self.output_device, dtype=self.vae_output_dtype())
                for x in range(0, samples_in.shape[0], batch):
                    samples = samples_in[x:x + batch].to(self.vae_dtype).to(self.device)
                    if chunked:
                        self.first_stage_model.decode(samples, output_buffer=pixel_samples[x:x + batch], **vae_options)
                    else:
                        out = self.first_stage_model.decode(samples, **vae_options).to(
                            self.output_device, dtype=self.vae_output_dtype(), copy=True)
                        if pixel_samples is None:
                            pixel_samples = torch.empty((samples_in.shape[0],) + tuple(out.shape[1:]),
                                                        device=self.output_device, dtype=self.vae_output_dtype())
                        pixel_samples[x:x + batch] = out
                    self.process_output(pixel_samples[x:x + batch])
            except Exception as e:
                self._raise_unless_oom(e)
                logging.warning("Warning: Ran out of memory when regular VAE decoding, retrying with tiled VAE decoding.")
                do_tile = True
            if do_tile:
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
                    pixel_samples = self.decode_tiled_3d(samples_in, tile_x=tile, tile_y=tile,
                                                         overlap=(1, overlap, overlap))
        return pixel_samples.to(self.output_device).movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        memory_used = self.memory_used_decode(self._tile_bounded_shape(samples.shape, tile_x, tile_y, tile_t),
                                              self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                         force_full_load=self.disable_offload)
        with self._device_context():
            if since("0.33") and self.handles_tiling:
                args = {k: v for k, v in dict(tile_x=tile_x, tile_y=tile_y, overlap=overlap, tile_t=tile_t,
                                              overlap_t=overlap_t).items() if v is not None}
                output = self._decode_tiled_owned(samples, **args)
            else:
                output = self.decode_tiled_3d(samples, tile_t=tile_t, tile_x=tile_x, tile_y=tile_y, overlap=overlap)
        return output.movedim(1, -1)

    def decode_tiled_3d(self, samples, tile_t=999, tile_x=32, tile_y=32, overlap=(1, 8, 8)):
        out = self.first_stage_model.decode(samples.to(self.vae_dtype).to(self.device))
        return self.process_output(out.to(self.output_device).to(self.vae_output_dtype()))
