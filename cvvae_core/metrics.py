"""PSNR and SSIM for videos and images.

Inputs are in the model's range, [-1, 1] by default (pass ``value_range=(0, 1)`` for [0, 1]);
both tensors are clamped to that range (the official scripts clamp decoded video before saving)
and rescaled to [0, 1]. Layouts: ``[B, C, T, H, W]`` video or ``[B, C, H, W]`` images.

Both metrics are computed per frame and averaged over frames and batch, the usual convention for
video autoencoders (a clip-level MSE would let one bad frame hide among good ones). PSNR of a frame
that is reproduced exactly is capped at :data:`PSNR_CAP` dB so averages stay finite.
SSIM is Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel,
"valid" windows only (no padding), as in ``pytorch_msssim`` and the reference MATLAB code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError

PSNR_CAP = 100.0


def _frames01(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[B, C, T, H, W] or [B, C, H, W] -> [N, C, H, W] float64 frames in [0, 1]."""
    if x.dim() == 5:
        x = x.transpose(1, 2).flatten(0, 1)
    elif x.dim() != 4:
        raise InputError(f"expected a [B, C, T, H, W] video or [B, C, H, W] images, got shape {list(x.shape)}")
    lo, hi = value_range
    return ((x.detach().double().clamp(lo, hi) - lo) / (hi - lo))


def _pair(a: torch.Tensor, b: torch.Tensor, value_range) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise InputError(f"cannot compare tensors of shapes {list(a.shape)} and {list(b.shape)}; "
                         "crop or pad them to the same frame count and size first")
    return _frames01(a, value_range), _frames01(b.to(a.device), value_range)


def psnr(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean per-frame PSNR in dB between two videos (or image batches)."""
    x, y = _pair(a, b, value_range)
    mse = (x - y).pow(2).flatten(1).mean(1)
    per_frame = (10 * torch.log10(1.0 / mse)).clamp(max=PSNR_CAP)
    return float(per_frame.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_per_image(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (11x11 Gaussian window, sigma 1.5, valid positions only) of each image pair: [N, C, H, W]
    in [0, 1] -> [N], in the inputs' dtype and differentiable (the training loss uses it too)."""
    c = x.shape[1]
    g = _gaussian_window(dtype=x.dtype, device=x.device)
    # Separable Gaussian: filter rows, then columns, one group per channel.
    wh, wv = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean per-frame SSIM between two videos (or image batches); frames must be at least 11x11."""
    x, y = _pair(a, b, value_range)
    if min(x.shape[-2:]) < 11:
        raise InputError(f"SSIM needs frames of at least 11x11 pixels, got {list(x.shape[-2:])}")
    return float(ssim_per_image(x, y).mean())
