"""An SD-family image VAE (``AutoencoderKL``): SD1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, or the built-in one.

This is the 2-D model whose latent space a CV-VAE shares: its frozen decoder is the target of
the latent regularization (:mod:`cvvae_core.train.losses`) and its weights initialise the video VAE
(:mod:`cvvae_core.train.inflate`). Module names are the LDM/ComfyUI ones (``encoder.down.{i}.block.{j}``,
``decoder.up.{i}...``, ``quant_conv``); files in either layout are read by
:mod:`cvvae_core.io.image_vae_file`. SD3/FLUX VAEs, and the small built-in one, have no
``quant_conv``/``post_quant_conv``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import IMAGE_FAMILIES, LevelledVAEConfig
from .cvvae import LOGVAR_RANGE, sample_posterior


@dataclass(frozen=True)
class ImageVAEConfig(LevelledVAEConfig):
    latent_channels: int = 4
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 2          # encoder; the decoder has one more per level, as in LDM
    norm_groups: int = 32
    norm_eps: float = 1e-6             # LDM's Normalize
    quant_conv: bool = True            # SD1.x/SDXL have quant_conv/post_quant_conv; SD3/Flux do not
    scaling_factor: float = IMAGE_FAMILIES["sd1"].scaling_factor
    shift_factor: float = 0.0

    def __post_init__(self):
        self._check_levels()


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: ImageVAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, cout, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock2D(nn.Module):
    """Single-head self-attention over H*W (head dim = C), 1x1-conv projections, residual."""

    def __init__(self, channels: int, cfg: ImageVAEConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample2D(nn.Module):
    """SD's downsample: zero-pad right/bottom by one, stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, cfg: ImageVAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock2D(channels, channels, cfg)
        self.attn_1 = AttnBlock2D(channels, cfg)
        self.block_2 = ResnetBlock2D(channels, channels, cfg)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder2D(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        cin = chans[0]
        for level, ch in enumerate(chans):
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock2D(cin if j == 0 else ch, ch, cfg)
                                        for j in range(cfg.blocks_per_level))
            if level != cfg.num_levels - 1:
                stage.downsample = Downsample2D(ch)
            self.down.append(stage)
            cin = ch
        self.mid = MidBlock2D(cin, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder2D(nn.Module):
    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        self.mid = MidBlock2D(cin, cfg)
        stages = []
        for level in reversed(range(cfg.num_levels)):
            ch = chans[level]
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock2D(cin if j == 0 else ch, ch, cfg)
                                        for j in range(cfg.blocks_per_level + 1))
            if level != 0:
                stage.upsample = Upsample2D(ch)
            stages.insert(0, stage)
            cin = ch
        self.up = nn.ModuleList(stages)  # indexed by level, run from the top, as in LDM
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageVAE(nn.Module):
    """Images ``[B, 3, H, W]`` in [-1, 1] <-> raw latents ``[B, C, H/8, W/8]`` (unscaled, as CV-VAE's).

    ``decode_video``/``encode_video`` apply the model frame by frame to ``[B, C, T, H, W]``
    tensors: that is how the latent regularization and the compatibility measure use it.
    """

    def __init__(self, config: ImageVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder2D(config)
        self.decoder = Decoder2D(config)
        if config.quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.config.num_levels - 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.config.quant_conv else h

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.moments(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.config.quant_conv else z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean."""
        return self.encode_distribution(x)[0]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction, mean, logvar) with a sampled latent."""
        mean, logvar = self.encode_distribution(x)
        return self.decode(sample_posterior(mean, logvar, generator)), mean, logvar

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = video.shape
        z = self.encode(video.transpose(1, 2).flatten(0, 1))
        return z.unflatten(0, (b, t)).transpose(1, 2)

    def decode_video(self, latent: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = latent.shape
        x = self.decode(latent.transpose(1, 2).flatten(0, 1))
        return x.unflatten(0, (b, t)).transpose(1, 2)
