"""The paper's compatibility measure: how well an *image* decoder reads a *video* latent.

A clip of 1+4k frames is encoded by the video VAE into 1+k latent frames. Each latent frame is
decoded on its own by the image VAE's decoder and compared with video frame 4i (latent frame 0
stands for frame 0 alone; latent frame i >= 1 for frames 4i-3 .. 4i, of which 4i is the last and
the one the causal encoder has fully seen). Next to it: the video VAE's own reconstruction of the
whole clip, and, as the reference for the image-decoder numbers, the image VAE's reconstruction
of the same frames 4i from its own latents (what the image decoder gives on the latents it was
trained on; the video VAE's own reconstruction can score above it).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.synthetic import SyntheticConfig, generate_clip
from ..errors import InputError
from ..io.video import read_video, to_model_range
from ..metrics import psnr, ssim
from ..model.cvvae import CVVAE
from ..model.frames import conform
from ..model.image_vae import ImageVAE
from ..spec import CVVAEConfig


def load_clip(spec: str, frames: int = 17, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``synthetic:SEED`` (a generated clip, 64x64 unless ``size``) or a video file path (scaled to
    cover ``size`` (H, W) and centre-cropped when given); :func:`compat_report` trims it to what the
    model takes."""
    if spec.startswith("synthetic"):
        seed = int(spec.partition(":")[2] or 0)
        h, w = size or (64, 64)
        return generate_clip(seed, SyntheticConfig(frames=frames, height=h, width=w)).unsqueeze(0)
    if not Path(spec).is_file():
        raise InputError(f"clip {spec!r} is neither a video file nor 'synthetic:SEED'")
    h, w = size or (None, None)
    return to_model_range(read_video(spec, max_frames=frames, height=h, width=w)[0])


def usable_frames(video: torch.Tensor, cfg: CVVAEConfig) -> torch.Tensor:
    """Trimmed to the frame count and size the model takes (1+4k frames, multiples of 8 for the
    released models), as the inference scripts of the paper do."""
    t = video.shape[2]
    if t < 1 + cfg.time_compression:
        raise InputError(f"the compatibility measure needs at least {1 + cfg.time_compression} frames "
                         f"(1+{cfg.time_compression}k, k>=1), got {t}")
    return conform(video, cfg, "trim")[0]


@torch.no_grad()
def compat_report(video_vae: CVVAE, image_vae: ImageVAE, clip: torch.Tensor) -> dict:
    """PSNR/SSIM of: the video VAE's reconstruction; the image decoder on the video latent
    (latent frame i vs video frame ``step * i``, ``step`` the model's time compression); the image
    VAE on those frames (the reference for the image decoder's numbers)."""
    clip = usable_frames(clip.float(), video_vae.config)
    step = video_vae.config.time_compression
    dev = video_vae.device
    latent = video_vae.encode(clip.to(dev))
    recon = video_vae.decode(latent).float().cpu()
    image_vae = image_vae.to(dev)
    img_dtype = next(image_vae.parameters()).dtype
    from_video_latent = image_vae.decode_video(latent.to(img_dtype)).float().cpu()
    targets = clip[:, :, ::step]
    image_only = image_vae.decode_video(image_vae.encode_video(targets.to(dev, img_dtype))).float().cpu()
    return {
        "frames": clip.shape[2], "latent_frames": latent.shape[2], "size": list(clip.shape[-2:]), "time_compression": step,
        "video_recon_psnr": psnr(recon, clip), "video_recon_ssim": ssim(recon, clip),
        "image_decoder_psnr": psnr(from_video_latent, targets), "image_decoder_ssim": ssim(from_video_latent, targets),
        "image_vae_psnr": psnr(image_only, targets), "image_vae_ssim": ssim(image_only, targets),
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"clip: {r['frames']} frames {r['size'][0]}x{r['size'][1]} -> {r['latent_frames']} latent frames",
        f"video VAE reconstruction           PSNR {r['video_recon_psnr']:6.2f} dB  SSIM {r['video_recon_ssim']:.4f}",
        f"image decoder on video latent      PSNR {r['image_decoder_psnr']:6.2f} dB  SSIM {r['image_decoder_ssim']:.4f}"
        f"  (latent frame i vs frame {r['time_compression']}i)",
        f"image VAE on the same frames       PSNR {r['image_vae_psnr']:6.2f} dB  SSIM {r['image_vae_ssim']:.4f}"
        "  (reference for the row above: the image decoder on its own latents)",
    ])
