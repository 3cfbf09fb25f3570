"""Stand-in for comfy.model_base.SVD_img2vid: a tiny video UNet with SVD's interface.

What the pack relies on is kept: ``apply_model(x, t, c_concat=, c_crossattn=, **kwargs)`` scales the
input with ``model_sampling.calculate_input``, concatenates ``c_concat``, passes ``timestep(sigma)``,
``context``, ``y`` and ``num_video_frames`` to ``diffusion_model`` and returns
``calculate_denoised``; ``encode_adm(fps=, motion_bucket_id=, augmentation_level=)`` embeds fps - 1,
the motion bucket and the augmentation level; ``process_latent_in`` scales by SD's 0.18215;
``diffusion_model.input_blocks[0][0]`` is the input convolution and ``diffusion_model.out`` ends in a
3x3 convolution to 4 channels (``out.2``). The network in between is small and arbitrary.
"""
import math

import torch
from torch import nn

from . import model_sampling

SD_SCALE = 0.18215


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().reshape(-1, 1) * freqs.to(t.device)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyVideoUNet(nn.Module):
    def __init__(self, channels=32, adm_channels=48, context_dim=16, in_channels=8, out_channels=4):
        super().__init__()
        self.channels = channels
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(in_channels, channels, 3, padding=1)])])
        self.time_embed = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.label_emb = nn.Linear(adm_channels, channels)
        self.context_proj = nn.Linear(context_dim, channels)
        self.mid = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.temporal = nn.Conv1d(channels, channels, 3, padding=1)
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        frames = kwargs.get("num_video_frames", x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.channels).to(x.dtype)) + self.label_emb(y)
        if context is not None:
            emb = emb + self.context_proj(context.mean(1))
        h = self.input_blocks[0][0](x) + emb[:, :, None, None]
        h = h + self.mid(h)
        b, c, hh, ww = h.shape
        v = h.reshape(b // frames, frames, c, hh, ww).permute(0, 3, 4, 2, 1).reshape(-1, c, frames)
        v = self.temporal(v).reshape(b // frames, hh, ww, c, frames).permute(0, 4, 3, 1, 2).reshape(b, c, hh, ww)
        return self.out(h + v)


class SVD_img2vid(nn.Module):
    def __init__(self, adm_embed=16, **unet):
        super().__init__()
        self.adm_embed = adm_embed
        self.diffusion_model = TinyVideoUNet(adm_channels=3 * adm_embed, **unet)
        self.model_sampling = model_sampling.SVDSampling()

    def encode_adm(self, **kwargs):
        values = [kwargs.get("fps", 6) - 1, kwargs.get("motion_bucket_id", 127), kwargs.get("augmentation_level", 0)]
        return torch.cat([timestep_embedding(torch.tensor([float(v)]), self.adm_embed) for v in values], 1)

    def process_latent_in(self, latent):
        return latent * SD_SCALE

    def process_latent_out(self, latent):
        return latent / SD_SCALE

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat.to(xc.device, xc.dtype)], dim=1)
        t = self.model_sampling.timestep(t).float()
        extra = {k: v.to(xc.device, xc.dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out = self.diffusion_model(xc, t, context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **extra)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)
