"""Training: the small image VAE, and CV-VAE with the paper's latent regularization.

``python -m cvvae_core train CONFIG.json`` runs :func:`train`. Two kinds of run:

* ``"model": "image_vae"`` trains an SD-family image VAE on frames of procedural videos with the
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
  4i-3 .. 4i (one draw per step, shared by the batch). Setting ``rec2d_weight`` to 0 trains the
  same model without the regularization, for the compatibility comparison.

Perceptual loss: LPIPS needs ImageNet-pretrained VGG weights that cannot be fetched here, so the
perceptual term is ``1 - SSIM`` per frame (``perceptual: "ssim"``), added to every pixel of its
frame with ``perceptual_weight`` exactly where the official code adds LPIPS. SSIM needs no weights,
rewards the local structure/contrast that L1 under-weights (the role LPIPS plays), and is the
metric we report. ``perceptual: "none"`` turns it off.

Checkpoints: ``OUT/checkpoint/`` in the official release layout (CV-VAE) or
``OUT/image_vae.safetensors``, plus ``OUT/training_state.pt`` (model, optimizer, schedule, loss
parameters, step) from which a run resumes; ``OUT/log.jsonl`` has one line per logged step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model, save_model
from .errors import CVVAEError
from .image_vae import ImageVAE, ImageVAEConfig, load_image_vae, save_image_vae
from .inflate import inflate, video_config
from .model import CVVAE
from .progress import TextProgress
from .synthetic import SyntheticConfig, generate_batch

MODELS = ("image_vae", "cvvae")


class TrainConfigError(CVVAEError, ValueError):
    """A training configuration that cannot be run as written."""


@dataclass
class LossConfig:
    rec_loss: str = "l1"               # "l1" or "l2", for both reconstructions (official: l1)
    perceptual: str = "ssim"           # "ssim" or "none" (see module docstring)
    perceptual_weight: float = 0.5     # official: 0.5
    kl_weight: float = 1.0             # official CV-VAE: 1.0; LDM image VAE: 1e-6
    rec2d_weight: float = 1.0          # latent regularization weight (official: 1.0); 0 = off
    target_type: str = "random"        # frame of each group the image decoder must reproduce
    learn_logvar: bool = True          # official CV-VAE: True; LDM image VAE: False
    adversarial_weight: float = 0.0   # hinge GAN on a 3-D/2-D patch discriminator; 0 = off
    disc_start: int = 0


@dataclass
class TrainConfig:
    model: str = "cvvae"
    out_dir: str = "out/train"
    steps: int = 1000
    batch_size: int = 1                # clips per step
    frames: int = 9                    # frames per clip (1+4k); image VAE: frames per clip used as images
    height: int = 64
    width: int = 64
    seed: int = 0
    lr: float = 2e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.98)   # official optimizer settings
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    grad_clip: float = 0.0             # max gradient norm; 0 = off (the official run does not clip)
    image_vae: str | None = None       # cvvae: path of the frozen image VAE (.safetensors, LDM or diffusers layout)
    image_vae_family: str | None = None   # its family (sd1, sdxl, sd3, flux) where the file cannot tell
    init: str = "inflate"              # cvvae: "inflate" (from image_vae), "scratch", or a CV-VAE checkpoint
    image_vae_config: dict = field(default_factory=dict)   # image_vae: ImageVAEConfig fields
    loss: LossConfig = field(default_factory=LossConfig)
    log_every: int = 10
    save_every: int = 100
    snapshot_steps: tuple[int, ...] = ()   # also keep OUT/checkpoint-STEP at these steps (for comparisons)
    threads: int | None = None         # torch CPU threads; None = leave as is
    max_minutes: float | None = None   # stop (and save) after this much wall time

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.betas = tuple(self.betas)
        self.snapshot_steps = tuple(self.snapshot_steps)
        if self.model not in MODELS:
            raise TrainConfigError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "cvvae" and (self.frames - 1) % 4:
            raise TrainConfigError(f"frames must be 1+4k for a CV-VAE, got {self.frames}; use 9 or 17")
        if self.model == "cvvae" and self.image_vae is None and (self.init == "inflate" or self.loss.rec2d_weight):
            raise TrainConfigError("a CV-VAE run needs 'image_vae' (the frozen decoder and/or the inflation source)")
        if self.loss.target_type not in ("random", "slice"):
            raise TrainConfigError(f"loss.target_type must be 'random' or 'slice', got {self.loss.target_type!r}")

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainConfigError(f"cannot read training config {path}: {e}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"comment"})
        if unknown:
            raise TrainConfigError(f"unknown keys {unknown} in {path}; valid keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


# Losses ----------------------------------------------------------------------------------------

def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, I)) summed over every latent element, mean over the batch."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def ssim_map_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Differentiable ``1 - SSIM`` per image, inputs [N, C, H, W] in [-1, 1] -> [N]."""
    from .metrics import _gaussian_window

    c = x.shape[1]
    g = _gaussian_window(dtype=x.dtype, device=x.device)
    wh, wv = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wh, groups=c), wv, groups=c)

    x, y = (x.clamp(-1, 1) + 1) / 2, (y + 1) / 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return 1 - s.flatten(1).mean(1)


def regularization_targets(video: torch.Tensor, target_type: str, generator: torch.Generator,
                           time_compression: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [B, 3, 1+k, H, W], indices [1+k]): the video frame each latent frame must decode to."""
    d = (video.shape[2] - 1) // time_compression
    if target_type == "random":
        offsets = torch.randint(1, time_compression + 1, (d,), generator=generator)
    else:  # "slice": the last frame of each group, frame 4i
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


class VAELoss(nn.Module):
    """The objective of the module docstring; holds the learned log-variances."""

    def __init__(self, cfg: LossConfig, video: bool):
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_logvar)
        self.logvar_2d = nn.Parameter(torch.zeros(()), requires_grad=cfg.learn_logvar)
        self.discriminator = PatchDiscriminator(3 if video else 2) if cfg.adversarial_weight > 0 else None

    def pixel_loss(self, x, x_hat):
        """Per-pixel reconstruction + per-frame perceptual term, summed per sample -> [B]."""
        err = (x - x_hat).abs() if self.cfg.rec_loss == "l1" else (x - x_hat).pow(2)
        per_sample = err.flatten(1).sum(1)
        if self.cfg.perceptual == "ssim" and self.cfg.perceptual_weight > 0:
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


# Trainer ---------------------------------------------------------------------------------------

class Trainer:
    """One training run. ``step(batch)`` does one optimisation step and returns the logged values."""

    def __init__(self, cfg: TrainConfig, device=None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.step_count = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.image_vae: ImageVAE | None = None
        # Weights that initialisation leaves random (e.g. the temporal attention after inflation)
        # come from the run's seed, not from whatever the global generator was left at.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.model == "image_vae":
                self.model = ImageVAE(ImageVAEConfig.from_dict(cfg.image_vae_config))
            else:
                if cfg.image_vae is not None:
                    self.image_vae = load_image_vae(cfg.image_vae, family=cfg.image_vae_family)
                self.model = self._init_cvvae()
            if self.image_vae is not None:
                self.image_vae = self.image_vae.to(self.device).requires_grad_(False).eval()
        self.model = self.model.float().to(self.device).train().requires_grad_(True)
        self.loss = VAELoss(cfg.loss, video=cfg.model == "cvvae").to(self.device)
        params = list(self.model.parameters()) + [p for p in (self.loss.logvar, self.loss.logvar_2d) if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     eps=cfg.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.disc_opt = (torch.optim.AdamW(self.loss.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
                         if self.loss.discriminator is not None else None)

    def _init_cvvae(self) -> CVVAE:
        init = self.cfg.init
        if init == "inflate":
            return inflate(self.image_vae)
        if init == "scratch":
            if self.image_vae is None:
                raise TrainConfigError("init 'scratch' still needs image_vae to size the model")
            return CVVAE(video_config(self.image_vae.config))
        return load_model(init, dtype=torch.float32)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to ``min_lr_ratio`` (the official schedule's shape)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # Data: a pure function of (seed, step), so a resumed run sees the batches it would have seen.
    def batch(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        clips = generate_batch(cfg.seed * 10_000_019 + step, cfg.batch_size,
                               SyntheticConfig(frames=cfg.frames, height=cfg.height, width=cfg.width))
        return (frames_of(clips) if cfg.model == "image_vae" else clips).to(self.device)

    def compute_loss(self, x: torch.Tensor, generator: torch.Generator | None = None):
        gen = generator or self.gen
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            x_hat, mean, logvar = self.model(x, generator=gen)
            target_2d = x_hat_2d = None
            if self.cfg.model == "cvvae" and self.cfg.loss.rec2d_weight > 0:
                target_2d, _ = regularization_targets(x, self.cfg.loss.target_type, gen,
                                                      self.model.config.time_compression)
                z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean.device)
                x_hat_2d = self.image_vae.decode_video(z)
        x_hat = x_hat.float()
        x_hat_2d = x_hat_2d.float() if x_hat_2d is not None else None
        loss, logs = self.loss(x, x_hat, mean.float(), logvar.float(), target_2d, x_hat_2d, self.step_count)
        return loss, logs, x_hat

    def step(self, x: torch.Tensor) -> dict:
        self.model.train()
        loss, logs, x_hat = self.compute_loss(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        if self.disc_opt is not None and self.step_count >= self.cfg.loss.disc_start:
            d_loss = self.loss.discriminator_loss(x, x_hat)
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            logs["d_loss"] = float(d_loss.detach())
        self.step_count += 1
        logs["lr"] = self.sched.get_last_lr()[0]
        return logs

    # Checkpoints -----------------------------------------------------------------------------
    def save(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.save_snapshot(out_dir / ("checkpoint" if self.cfg.model == "cvvae" else "image_vae"))
        state = {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "loss": self.loss.state_dict(),
                 "generator": self.gen.get_state(), "config": dataclasses.asdict(self.cfg)}
        if self.disc_opt is not None:
            state["disc_optimizer"] = self.disc_opt.state_dict()
        tmp = out_dir / "training_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out_dir / "training_state.pt")  # never leave a half-written state behind

    def save_snapshot(self, path: Path):
        """The model alone, in the same format as ``save``."""
        model = self.model.eval()
        if self.cfg.model == "cvvae":
            save_model(model, path)
        else:
            save_image_vae(model, path.with_suffix(".safetensors"))
        model.train()

    def resume(self, out_dir: Path) -> bool:
        path = out_dir / "training_state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["loss"])
        self.gen.set_state(state["generator"])
        if self.disc_opt is not None and "disc_optimizer" in state:
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        self.step_count = state["step"]
        return True


def train(cfg: TrainConfig, device=None, resume: bool = True) -> Path:
    """Run (or resume) a training run; returns the output folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    trainer = Trainer(cfg, device)
    if resume and trainer.resume(out_dir):
        print(f"resumed from {out_dir / 'training_state.pt'} at step {trainer.step_count}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    bar, first_step = TextProgress("train"), trainer.step_count
    t0 = time.time()
    with open(out_dir / "log.jsonl", "a") as log:
        while trainer.step_count < cfg.steps:
            logs = trainer.step(trainer.batch(trainer.step_count))
            step = trainer.step_count
            if step % cfg.log_every == 0 or step == cfg.steps:
                logs.update(step=step, seconds=round(time.time() - t0, 1))
                log.write(json.dumps(logs) + "\n")
                log.flush()
                rate = (step - first_step) / max(1e-9, time.time() - t0)
                eta = (cfg.steps - step) / rate / 60 if rate > 0 else float("inf")
                values = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "rec_l1", "rec2d_l1", "kl") if k in logs)
                bar(step, cfg.steps, f"{values} {rate:.2f} it/s eta {eta:.1f} min")
            if step % cfg.save_every == 0:
                trainer.save(out_dir)
            if step in cfg.snapshot_steps:
                trainer.save_snapshot(out_dir / f"checkpoint-{step}")
            if cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes:
                bar.close()
                print(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached", file=sys.stderr)
                break
    bar.close()
    trainer.save(out_dir)
    return out_dir
