"""The CV-VAE encoder, decoder and the public model class.

Module names follow the official SD-variant (``vae3d``) state dict, so its checkpoints load
key for key; the SD3 variant's names are translated by :mod:`cvvae_core.io.keymap`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import CVVAEConfig
from . import frames as frame_rules
from .layers import ResnetBlock, Upsample, causal_conv3d, decoder_conv3d, downsample_conv3d, group_norm_silu, mid_block

LOGVAR_RANGE = (-30.0, 20.0)


class _LayerStack(nn.Module):
    """A network whose ``layers()`` list is its forward pass."""

    def layers(self):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, layer in self.layers():
            x = layer(x)
        return x


def _mid_layers(mid: nn.Module):
    yield "mid.block_1", mid.block_1
    yield "mid.attn_1", mid.attn_1
    yield "mid.block_2", mid.block_2


class Encoder(_LayerStack):
    """Video [B, 3, 1+4k, H, W] -> posterior moments [B, 2*C, 1+k, H/8, W/8] (mean, logvar).

    :meth:`layers` is the network: the order in which ``forward`` and the streaming engine
    (:mod:`cvvae_core.tiling`) run the modules, named by their state-dict prefixes."""

    def __init__(self, cfg: CVVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        self.conv_in = causal_conv3d(cfg.in_channels, chans[0], 3, cfg)
        self.down = nn.ModuleList()
        cin = chans[0]
        for level, ch in enumerate(chans):
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(cin if j == 0 else ch, ch, causal=True, cfg=cfg) for j in range(cfg.blocks_per_level))
            if level != cfg.num_levels - 1:
                stage.downsample = nn.Module()
                stage.downsample.conv = downsample_conv3d(ch, cfg.time_resampled(level), cfg)
            self.down.append(stage)
            cin = ch
        self.mid = mid_block(cin, causal=True, cfg=cfg, temporal=False)
        self.norm_out = group_norm_silu(cin, cfg)
        self.conv_out = causal_conv3d(cin, 2 * cfg.latent_channels, 3, cfg)

    def layers(self):
        """(name, module) in execution order: stem, down path by level, mid-block, head."""
        yield "conv_in", self.conv_in
        for level, stage in enumerate(self.down):
            for j, block in enumerate(stage.block):
                yield f"down.{level}.block.{j}", block
            if hasattr(stage, "downsample"):
                yield f"down.{level}.downsample.conv", stage.downsample.conv
        yield from _mid_layers(self.mid)
        yield "norm_out", self.norm_out
        yield "conv_out", self.conv_out


class Decoder(_LayerStack):
    """Latent [B, C, 1+k, h, w] -> video [B, 3, 1+4k, 8h, 8w] (unclamped). See :meth:`layers`."""

    def __init__(self, cfg: CVVAEConfig):
        super().__init__()
        chans = cfg.level_channels
        cin = chans[-1]
        self.conv_in = decoder_conv3d(cfg.latent_channels, cin, 3, cfg)
        self.mid = mid_block(cin, causal=False, cfg=cfg, temporal=cfg.temporal_attention)
        stages = []
        for level in reversed(range(cfg.num_levels)):
            ch = chans[level]
            stage = nn.Module()
            stage.block = nn.ModuleList(
                ResnetBlock(cin if j == 0 else ch, ch, causal=False, cfg=cfg)
                for j in range(cfg.blocks_per_level + 1))
            if level != 0:
                stage.upsample = Upsample(ch, cfg.time_resampled(level - 1), cfg)
            stages.insert(0, stage)
            cin = ch
        # Indexed by level (0 = full resolution) as in the official state dict; run from the top.
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm_silu(cin, cfg)
        self.conv_out = decoder_conv3d(cin, cfg.in_channels, 3, cfg)

    def layers(self):
        """(name, module) in execution order: stem, mid-block, up path from the lowest level, head."""
        yield "conv_in", self.conv_in
        yield from _mid_layers(self.mid)
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for j, block in enumerate(stage.block):
                yield f"up.{level}.block.{j}", block
            if hasattr(stage, "upsample"):
                yield f"up.{level}.upsample", stage.upsample
        yield "norm_out", self.norm_out
        yield "conv_out", self.conv_out


class CVVAE(nn.Module):
    """A CV-VAE: 8x spatial, 4x temporal compression; latents share the image VAE's space.

    ``encode``/``decode`` take and return video in [-1, 1], layout ``[B, 3, T, H, W]``, and raw
    (unscaled) latents ``[B, C, 1+k, H/8, W/8]``: the space of the official ``latent_dist``.
    ``scaling_factor``/``shift_factor`` describe the image model's latent scaling; they are never
    applied here.
    """

    def __init__(self, config: CVVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # Metadata ---------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # Plain (untiled) passes: whole clip at once ------------------------------------------
    def encoder_output(self, video: torch.Tensor) -> torch.Tensor:
        """Raw encoder output [B, 2C, 1+k, h, w] (mean, logvar) for a validated video, untiled: in the
        model's dtype on its device (the tiling engine's ``encode_moments`` gives float32 on its
        output device)."""
        return self.encoder(video.to(self.device, self.dtype))

    def decoder_output(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw decoder output for a validated latent, untiled, in the model's dtype on its device."""
        return self.decoder(latent.to(self.device, self.dtype))

    @staticmethod
    def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    # Public API -------------------------------------------------------------------------
    def encode_distribution(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) of a [B, 3, 1+4k, H, W] video in [-1, 1]."""
        frame_rules.check_video(video, self.config)
        return self.split_moments(self.encoder_output(video))

    def _encode_moments(self, video: torch.Tensor, tiling) -> torch.Tensor:
        return self.encoder_output(video) if tiling is None else tiling.encode_moments(self, video)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tiling=None) -> torch.Tensor:
        """Encode a [B, 3, 1+4k, H, W] video in [-1, 1] (H, W multiples of 8; anything else raises
        :class:`FrameCountError`: see :meth:`encode_framed`).

        Returns the posterior mean [B, C, 1+k, H/8, W/8] (a sample when ``sample=True``).
        ``tiling=None`` runs the whole clip at once: result in the model's dtype on its device.
        A :class:`~cvvae_core.tiling.TilingOptions` runs the tiling engine (it sits above the model,
        so the options carry the entry points): result in float32 on ``tiling.output_device``.
        """
        frame_rules.check_video(video, self.config)
        mean, logvar = self.split_moments(self._encode_moments(video, tiling))
        return mean if not sample else sample_posterior(mean, logvar, generator)

    @torch.no_grad()
    def encode_framed(self, video: torch.Tensor, frame_policy: str = "pad", sample: bool = False,
                      generator: torch.Generator | None = None, tiling=None) -> frame_rules.FramedLatent:
        """Encode a video of any frame count and size: ``frame_policy`` ``"pad"`` replicates the
        last frame / edge pixels up to 1+4k frames and multiples of 8 (removed again by
        :meth:`decode`), ``"trim"`` drops trailing frames / edge pixels, ``"error"`` raises.
        Always returns a :class:`~cvvae_core.model.frames.FramedLatent` (latent + what was changed)."""
        video, adjust = frame_rules.conform(video, self.config, frame_policy)
        mean, logvar = self.split_moments(self._encode_moments(video, tiling))
        latent = mean if not sample else sample_posterior(mean, logvar, generator)
        return frame_rules.FramedLatent(latent, adjust)

    @torch.no_grad()
    def decode(self, latent, tiling=None) -> torch.Tensor:
        """Decode a [B, C, 1+k, h, w] latent to video [B, 3, 1+4k, 8h, 8w] (unclamped, ~[-1, 1]).
        A :class:`FramedLatent` from :meth:`encode_framed` has its padding removed. ``tiling`` as in
        :meth:`encode`."""
        latent, adjust = frame_rules.unwrap(latent)
        frame_rules.check_latent(latent, self.config)
        video = self.decoder_output(latent) if tiling is None else tiling.decode_latent(self, latent)
        return frame_rules.restore(video, adjust)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction, mean, logvar) with a sampled latent."""
        mean, logvar = self.split_moments(self.encoder_output(video))
        return self.decoder_output(sample_posterior(mean, logvar, generator)), mean, logvar


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """A draw of the diagonal Gaussian posterior: ``mean + e^(logvar / 2) * noise``, with standard
    normal ``noise`` given or drawn (from ``generator``, on its device)."""
    if noise is None:
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
