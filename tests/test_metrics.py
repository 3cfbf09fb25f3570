"""PSNR and SSIM: float32 a chunk of frames at a time, equal to a float64 reference computed the
textbook way (a 2-D Gaussian convolution over the whole clip at once)."""
import math

import pytest
import torch
import torch.nn.functional as F

from cvvae_core import metrics
from cvvae_core.errors import InputError


def reference_psnr(a, b):
    x, y = ((t.double().clamp(-1, 1) + 1) / 2 for t in (a, b))
    mse = (x - y).pow(2).transpose(1, 2).flatten(2).mean(2).flatten()
    return float((10 * torch.log10(1 / mse)).mean())


def reference_ssim(a, b):
    x, y = ((t.double().clamp(-1, 1) + 1) / 2 for t in (a, b))
    x, y = x.transpose(1, 2).flatten(0, 1), y.transpose(1, 2).flatten(0, 1)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(s.flatten(1).mean(1).mean())


@pytest.fixture
def pair():
    """Two clips longer than one chunk of frames, of a size that is no multiple of anything."""
    gen = torch.Generator().manual_seed(0)
    frames = metrics.CHUNK_FRAMES * 2 + 1
    a = torch.rand(2, 3, frames, 37, 53, generator=gen) * 2 - 1
    b = a + 0.2 * torch.randn(a.shape, generator=gen)  # some values outside [-1, 1]: clamped
    return a, b


def test_psnr_and_ssim_match_a_float64_reference(pair):
    a, b = pair
    assert metrics.psnr(a, b) == pytest.approx(reference_psnr(a, b), abs=1e-6)
    assert metrics.ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=1e-6)


def test_images_and_videos_are_measured_per_frame(pair):
    a, b = pair
    first = a[:, :, 0], b[:, :, 0]  # [B, C, H, W] images
    assert metrics.ssim(*first) == pytest.approx(reference_ssim(a[:, :, :1], b[:, :, :1]), abs=1e-6)
    assert metrics.psnr(*first) == pytest.approx(reference_psnr(a[:, :, :1], b[:, :, :1]), abs=1e-6)


def test_identical_clips_score_the_cap_and_one(pair):
    a, _ = pair
    assert metrics.psnr(a, a.clone()) == metrics.PSNR_CAP
    assert metrics.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-6)


def test_ssim_per_image_is_differentiable():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    loss = 1 - metrics.ssim_per_image(x, torch.rand(2, 3, 16, 16)).mean()
    loss.backward()
    assert x.grad is not None and math.isfinite(float(x.grad.abs().sum())) and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("a,b,message", [
    (torch.zeros(1, 3, 5, 16, 16), torch.zeros(1, 3, 5, 16, 8), "cannot compare tensors of shapes"),
    (torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), "expected a [B, C, T, H, W] video"),
    (torch.zeros(1, 3, 5, 8, 16), torch.zeros(1, 3, 5, 8, 16), "at least 11x11"),
])
def test_bad_inputs_are_refused(a, b, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        metrics.ssim(a, b)
