"""Stand-in for comfy.sd.VAE: default attributes and the encode/decode semantics core nodes rely on
(see the integration facts, section 2). Tiled variants run untiled here: only shapes matter.

Two generations of the decode/encode loop, as in the real comfy/sd.py:
* ComfyUI 0.3x (``CHUNKED_IO = True``, the default): a first stage with ``comfy_has_chunked_io``
  gets a preallocated output (``decode_output_shape``) to fill slice by slice through
  ``decode(z, output_buffer=...)``, post-processed in place; ``encode(x, device=...)`` gets the pixels
  still on the CPU. Other first stages: each batch copied into one output tensor.
* ComfyUI 0.8.0 (``CHUNKED_IO = False``): no such flag is read; ``decode(z)`` / ``encode(x)`` only.
"""
import logging

import torch

from . import model_management

CHUNKED_IO = True


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

    def _to_model_layout(self, pixel_samples):
        pixel_samples = self.vae_encode_crop_pixels(pixel_samples).movedim(-1, 1)
        if self.latent_dim == 3 and pixel_samples.ndim < 5:
            if not self.not_video:
                pixel_samples = pixel_samples.movedim(1, 0).unsqueeze(0)
            else:
                pixel_samples = pixel_samples.unsqueeze(2)
        return pixel_samples

    def _chunked_io(self) -> bool:
        return CHUNKED_IO and getattr(self.first_stage_model, "comfy_has_chunked_io", False)

    def encode(self, pixel_samples):
        self.throw_exception_if_invalid()
        pixel_samples = self._to_model_layout(pixel_samples)
        memory_used = self.memory_used_encode(pixel_samples.shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                         force_full_load=self.disable_offload)
        batch = max(1, int(model_management.get_free_memory(self.device) / max(1, memory_used)))
        outs = []
        for x in range(0, pixel_samples.shape[0], batch):
            pixels_in = self.process_input(pixel_samples[x:x + batch]).to(self.vae_dtype)
            if self._chunked_io():
                out = self.first_stage_model.encode(pixels_in, device=self.device)
            else:
                out = self.first_stage_model.encode(pixels_in.to(self.device))
            outs.append(out.to(self.output_device).float())
        return torch.cat(outs)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.encode(pixel_samples)

    def decode(self, samples_in, vae_options={}):
        self.throw_exception_if_invalid()
        if self.latent_dim == 2 and samples_in.ndim == 5:
            samples_in = samples_in[:, :, 0]
        memory_used = self.memory_used_decode(samples_in.shape, self.vae_dtype)
        model_management.load_models_gpu([self.patcher], memory_required=memory_used,
                                         force_full_load=self.disable_offload)
        batch = max(1, int(model_management.get_free_memory(self.device) / max(1, memory_used)))
        chunked = self._chunked_io()
        pixel_samples = None
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
                    pixel_samples = torch.empty((samples_in.shape[0],) + tuple(out.shape[1:]), device=self.output_device)
                pixel_samples[x:x + batch] = out
            self.process_output(pixel_samples[x:x + batch])
        return pixel_samples.movedim(1, -1)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return self.decode(samples)
