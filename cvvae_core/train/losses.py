"""The training objectives: the losses of the two kinds of run, and the optional discriminator.

* ``"model": "image_vae"`` trains an SD-family image VAE on frames of the clips with the
  LDM recipe: L1 + perceptual, KL weight 1e-6, fixed log-variance.
* ``"model": "cvvae"`` trains the video VAE with the objective of the official
  ``LPIPSWithDiscriminatorAndDomainConstraint`` (configs/cvvae_sd3_constraint_training.yaml):

      L = sum|x - x̂| / e^s + s                     (+ perceptual, per frame)
        + w2d * (sum|x_sel - D2d(z)| / e^s2 + s2)  the latent regularization, w2d = 1.0
        + w_kl * KL(q(z|x) || N(0, I))              w_kl = 1.0
        (+ adversarial, off by default)

  with sums per sample, learned log-variances s, s2 (initialised at 0), and D2d the *frozen*
  image decoder applied frame by frame to the sampled video latent z. ``x_sel`` picks, per latent
  frame, the video frame it must reproduce (``target_type: "random"``, as in the official config):
  latent frame 0 -> frame 0, latent frame i >= 1 -> one frame drawn uniformly from its group
  4i-3 .. 4i (one draw per step, shared by the global batch). Setting ``rec2d_weight`` to 0 trains the
  same model without the regularization, for the compatibility comparison.

Perceptual loss: ``1 - SSIM`` per frame by default (``perceptual: "ssim"``), added to every pixel
of its frame with ``perceptual_weight`` exactly where the official code adds LPIPS. SSIM needs no
weights, rewards the local structure/contrast that L1 under-weights (the role LPIPS plays), and is
the metric we report. ``perceptual: "lpips"`` uses LPIPS (:mod:`cvvae_core.train.lpips`) from weights the
user gives (``lpips_vgg``, ``lpips_lin``); ``"none"`` turns it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import ssim_per_image
from .config import LossConfig
from .lpips import load_lpips


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, I)) summed over every latent element, mean over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def ssim_map_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable ``1 - SSIM`` per image, inputs [N, C, H, W] in [-1, 1] -> [N]."""
    return 1 - ssim_per_image((x.clamp(-1, 1) + 1) / 2, (y + 1) / 2)


def regularization_targets(video: torch.Tensor, target_type: str, generator: torch.Generator,
                           time_compression: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [B, 3, 1+k, H, W], indices [1+k]): the video frame each latent frame must decode to
    (``time_compression``: video frames per latent frame, the model config's)."""
    d = (video.shape[2] - 1) // time_compression
    if target_type == "random":
        offsets = torch.randint(1, time_compression + 1, (d,), generator=generator)
    else:  # "slice": the last frame of each group
        offsets = torch.full((d,), time_compression)
    idx = torch.cat([torch.zeros(1, dtype=torch.long), offsets + torch.arange(d) * time_compression])
    return video[:, :, idx.to(video.device)], idx


def frames_of(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(0, 1) if x.dim() == 5 else x


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (3-D for video, 2-D for images), for the optional adversarial loss."""

    def __init__(self, dims: int, channels: int = 32, in_channels: int = 3):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        stride = (1, 2, 2) if dims == 3 else 2
        self.net = nn.Sequential(
            conv(in_channels, channels, 3, stride=stride, padding=1), nn.LeakyReLU(0.2),
            conv(channels, 2 * channels, 3, stride=stride, padding=1), nn.GroupNorm(8, 2 * channels),
            nn.LeakyReLU(0.2), conv(2 * channels, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)


#: What each logged training value is, for the log's readers (printed when a run starts).
LOG_MEANINGS = {
    "loss": "the objective, summed over each clip's pixels and averaged over clips: large (1e4-1e5 at 64x64) "
            "and it may rise while the learned log-variances settle",
    "rec_l1": "mean |x - x_hat| per pixel value in [-1, 1]: the video reconstruction error; one batch's value, so "
              "it jumps from step to step: judge its trend over hundreds of steps, and the val/ values",
    "rec2d_l1": "the same for the frozen image decoder on the video latent (the latent regularization)",
    "kl": "KL(q(z|x) || N(0, I)) summed over each clip's latent values, averaged over clips",
}


class VAELoss(nn.Module):
    """The objective of the module docstring; holds the learned log-variances."""

    def __init__(self, cfg: LossConfig, video: bool):
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_logvar)
        self.logvar_2d = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_logvar)
        self.discriminator = PatchDiscriminator(3 if video else 2) if cfg.adversarial_weight > 0 else None
        # Frozen and large: kept out of the state dict (and of DDP) by not registering it.
        object.__setattr__(self, "lpips", load_lpips(cfg.lpips_vgg, cfg.lpips_lin)
                           if cfg.perceptual == "lpips" else None)

    def pixel_loss(self, x, x_hat):
        """Per-pixel reconstruction + per-frame perceptual term, summed per sample -> [B]."""
        err = (x - x_hat).abs() if self.cfg.rec_loss == "l1" else (x - x_hat).pow(2)
        per_sample = err.flatten(1).sum(1)
        if self.cfg.perceptual != "none" and self.cfg.perceptual_weight > 0:
            if self.lpips is not None:
                p = self.lpips.to(x.device)(frames_of(x_hat), frames_of(x))
            else:
                p = ssim_map_loss(frames_of(x_hat), frames_of(x))
            pixels_per_frame = x[:, :, 0].numel() // x.shape[0] if x.dim() == 5 else x[0].numel()
            per_sample = per_sample + self.cfg.perceptual_weight * pixels_per_frame * p.view(x.shape[0], -1).sum(1)
        return per_sample

    def nll(self, per_sample, logvar):
        return (per_sample / logvar.exp() + logvar).mean()

    def forward(self, x, x_hat, mean, logvar, target_2d=None, x_hat_2d=None, step: int = 0):
        logs = {}
        loss = self.nll(self.pixel_loss(x, x_hat), self.logvar)
        logs["rec_l1"] = float((x - x_hat).detach().abs().mean())
        if target_2d is not None:
            loss = loss + self.cfg.rec2d_weight * self.nll(self.pixel_loss(target_2d, x_hat_2d), self.logvar_2d)
            logs["rec2d_l1"] = float((target_2d - x_hat_2d).detach().abs().mean())
        kl = kl_per_sample(mean, logvar)
        loss = loss + self.cfg.kl_weight * kl
        logs["kl"] = float(kl.detach())
        if self.discriminator is not None and step >= self.cfg.disc_start:
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(x_hat).mean()
            self.discriminator.requires_grad_(True)
            # A fixed weight on a loss scaled like one pixel's error times the pixel count, so it
            # keeps its meaning next to the summed reconstruction terms.
            loss = loss + self.cfg.adversarial_weight * x[0].numel() * g_loss
            logs["g_loss"] = float(g_loss.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def discriminator_loss(self, x, x_hat):
        real, fake = self.discriminator(x.detach()), self.discriminator(x_hat.detach())
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
