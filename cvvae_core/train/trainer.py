"""Training: the small image VAE, and CV-VAE with the paper's latent regularization.

``python -m cvvae_core train CONFIG.json`` runs :func:`train`, in one process or data-parallel
under ``torchrun`` (DDP, see below). Two kinds of run:

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
the metric we report. ``perceptual: "lpips"`` uses LPIPS (:mod:`cvvae_core.lpips`) from weights the
user gives (``lpips_vgg``, ``lpips_lin``); ``"none"`` turns it off.

Data (:mod:`cvvae_core.train_data`): ``"data": {"videos": ...}`` for real video, procedural clips
otherwise. Every sample is keyed by (step, position in the global batch) and seeds its own clip,
posterior noise and so on, so the run is the same on 1 or N ranks.

Scale: under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the group (nccl on CUDA, gloo on
CPU), trains a DistributedDataParallel copy on its own share of each global batch, and rank 0
alone validates and writes logs and checkpoints. One optimiser step sees a *global batch* of
``batch_size x world_size x grad_accum`` clips; the losses are per-clip means, so DDP's gradient
average over ranks, and the ``1/grad_accum`` scaling over accumulation steps, give exactly the
gradient of the mean over the global batch. The state (step, weights, optimiser, EMA) does not
depend on the number of ranks: a run resumes on any number.

Checkpoints: ``OUT/checkpoint/`` in the official release layout (CV-VAE) or
``OUT/image_vae.safetensors`` (and ``OUT/checkpoint_ema/`` / ``OUT/image_vae_ema.safetensors``
with ``ema_decay``), plus ``OUT/training_state.pt`` (model, optimizer, schedule, loss
parameters, EMA, step) from which a run resumes; ``OUT/log.jsonl`` has one line per logged step,
per validation (``val/...`` keys) and per skipped video (``"event": "skip"``);
``python -m cvvae_core plot OUT`` draws it (:mod:`cvvae_core.plot`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.checkpoint import load_model, save_model
from ..errors import CVVAEError, TrainConfigError, TrainingDataError
from ..io.image_vae_file import load_image_vae, save_image_vae
from ..model.image_vae import ImageVAE, ImageVAEConfig
from .inflate import inflate, video_config
from .lpips import load_lpips
from ..model.cvvae import CVVAE
from ..metrics import ssim_per_image
from ..progress import TextProgress
from ..data.clips import DataConfig, TrainData, build_data, collate, seed_of

MODELS = ("image_vae", "cvvae")


@dataclass
class LossConfig:
    rec_loss: str = "l1"               # "l1" or "l2", for both reconstructions (official: l1)
    perceptual: str = "ssim"           # "ssim", "lpips" or "none" (see module docstring)
    lpips_vgg: str | None = None       # perceptual "lpips": torchvision VGG16 weights (.safetensors/.pth)
    lpips_lin: str | None = None       # ... and the lpips package's linear layers (lin0..lin4)
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
    data: DataConfig = field(default_factory=DataConfig)   # see cvvae_core.train_data; default: procedural
    grad_accum: int = 1                # micro-batches per optimiser step (global batch: batch x ranks x this)
    activation_checkpointing: bool = False   # recompute block activations in backward: less memory, ~1/3 slower
    precision: str = "bf16"            # CUDA: "bf16" autocast or "fp32"; the CPU always trains in float32
    ema_decay: float = 0.0             # EMA of the weights (e.g. 0.999), exported next to the checkpoint; 0 = off
    val_every: int = 0                 # validate on the held-out clips every N steps (and at the end); 0 = off
    tensorboard: bool = True           # also write OUT/tensorboard when tensorboard is installed

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if isinstance(self.data, dict):
            try:
                self.data = DataConfig(**self.data)
            except TypeError as e:
                names = sorted(f.name for f in dataclasses.fields(DataConfig))
                raise TrainConfigError(f"data: {e}; valid keys: {names}") from None
        self.betas = tuple(self.betas)
        self.snapshot_steps = tuple(self.snapshot_steps)
        if self.model not in MODELS:
            raise TrainConfigError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.model == "cvvae" and (self.frames - 1) % 4:
            raise TrainConfigError(f"frames must be 1+4k for a CV-VAE, got {self.frames}; use 9 or 17")
        if self.model == "cvvae" and self.image_vae is None and (self.init == "inflate" or self.loss.rec2d_weight):
            raise TrainConfigError("a CV-VAE run needs 'image_vae' (the frozen decoder and/or the inflation source)")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainConfigError(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.height % 8 or self.width % 8 or min(self.height, self.width) < 8:
            raise TrainConfigError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        if not 0 <= self.ema_decay < 1:
            raise TrainConfigError(f"ema_decay must be in [0, 1), e.g. 0.999; got {self.ema_decay}")
        if self.precision not in ("bf16", "fp32"):
            raise TrainConfigError(f"precision must be 'bf16' (autocast on CUDA) or 'fp32', got {self.precision!r}")
        if self.loss.perceptual not in ("ssim", "lpips", "none"):
            raise TrainConfigError(f"loss.perceptual must be 'ssim', 'lpips' or 'none', got {self.loss.perceptual!r}")
        if self.loss.perceptual == "lpips" and not (self.loss.lpips_vgg and self.loss.lpips_lin):
            raise TrainConfigError("loss.perceptual 'lpips' needs loss.lpips_vgg (torchvision VGG16 weights) and "
                                   "loss.lpips_lin (the lpips package's vgg linear layers); nothing is downloaded")
        self.data.check_crop(self.height, self.width)
        if self.val_every and not (self.data.synthetic or self.data.val or self.data.val_split):
            raise TrainConfigError("val_every needs held-out clips: set data.val (a folder or manifest) or "
                                   "data.val_split (e.g. 0.05), or set val_every to 0")
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
    return 1 - ssim_per_image((x.clamp(-1, 1) + 1) / 2, (y + 1) / 2)


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


# Trainer ---------------------------------------------------------------------------------------

def sample_noise(shape, seeds: list[int], salt: str) -> torch.Tensor:
    """``[len(seeds), *shape]`` standard normal noise, each sample's from its own seed: the same
    draws whichever rank or micro-batch the sample lands in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_of(s, salt) % 2 ** 63))
                        for s in seeds])


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing: the resnet blocks, attention blocks and 2-D mid blocks of ``model``
    recompute their activations in the backward pass instead of keeping them (memory for compute).
    Wraps the blocks' forward from outside, so the model's code and state dict are untouched.
    Returns the count wrapped."""
    from torch.utils.checkpoint import checkpoint

    from ..model.image_vae import MidBlock2D, ResnetBlock2D
    from ..model.layers import ResnetBlock, SpatialAttention

    kinds = (ResnetBlock, SpatialAttention, ResnetBlock2D, MidBlock2D)
    wrapped = []
    for module in model.modules():
        if isinstance(module, kinds) and not any(module in set(w.modules()) for w in wrapped):
            wrapped.append(module)
    for module in wrapped:
        def run(*args, _forward=module.forward):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False)
            return _forward(*args)
        module.forward = run
    return len(wrapped)


class TrainStep(nn.Module):
    """The differentiable part of a step, as one module: DDP wraps it, so the model's weights and
    the learned log-variances are averaged over ranks together. ``forward(x, seeds, step)`` ->
    (loss, logs, reconstruction)."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, loss: VAELoss, image_vae: ImageVAE | None):
        super().__init__()
        self.cfg, self.model, self.loss, self.image_vae = cfg, model, loss, image_vae

    def forward(self, x: torch.Tensor, seeds: list[int], step: int):
        cfg = self.cfg
        bf16 = x.device.type == "cuda" and cfg.precision == "bf16"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            target_2d = x_hat_2d = None
            if cfg.model == "image_vae":
                t = x.shape[2]
                x = frames_of(x)
                seeds = [seed_of(s, f) for s in seeds for f in range(t)]  # frames_of's order: clip, then frame
                mean, logvar = self.model.encode_distribution(x)
                x_hat = self.model.decode(self._sample(mean, logvar, seeds, "posterior"))
            else:
                mean, logvar = self.model.split_moments(self.model.encode_moments(x))
                x_hat = self.model.decode_latent(self._sample(mean, logvar, seeds, "posterior"))
                if cfg.loss.rec2d_weight > 0:
                    # One target draw per step, shared by the global batch (the official rule).
                    gen = torch.Generator().manual_seed(seed_of(cfg.seed, step, "targets") % 2 ** 63)
                    target_2d, _ = regularization_targets(x, cfg.loss.target_type, gen,
                                                          self.model.config.time_compression)
                    x_hat_2d = self.image_vae.decode_video(self._sample(mean, logvar, seeds, "rec2d"))
        x_hat_2d = x_hat_2d.float() if x_hat_2d is not None else None
        loss, logs = self.loss(x, x_hat.float(), mean.float(), logvar.float(), target_2d, x_hat_2d, step)
        return loss, logs, x_hat

    @staticmethod
    def _sample(mean, logvar, seeds, salt):
        noise = sample_noise(mean.shape[1:], seeds, salt).to(mean.device, mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise


class Trainer:
    """One training run (one rank of it). ``step(batch)`` does one optimisation step on a batch
    (or a list of micro-batches, accumulated) and returns the logged values, averaged over ranks."""

    def __init__(self, cfg: TrainConfig, device=None, data: TrainData | None = None, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.step_count = 0
        self.image_vae: ImageVAE | None = None
        # Weights that initialisation leaves random (e.g. the temporal attention after inflation,
        # the discriminator) come from the run's seed, not from whatever the global generator was
        # left at.
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
            self.loss = VAELoss(cfg.loss, video=cfg.model == "cvvae").to(self.device)
        self.model = self.model.float().to(self.device).train().requires_grad_(True)
        # The EMA copy lives on rank 0 (the rank that saves); copied before any forward is wrapped.
        self.ema = (copy.deepcopy(self.model).requires_grad_(False).eval()
                    if cfg.ema_decay and rank == 0 else None)
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.runner = TrainStep(cfg, self.model, self.loss, self.image_vae)
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP averages what every step's backward reaches. Not: the discriminator (its own
            # optimiser and backward, averaged by hand) and an unused image-decoder log-variance.
            ignore = [f"loss.discriminator.{k}" for k in self.loss.discriminator.state_dict()] \
                if self.loss.discriminator is not None else []
            if cfg.model == "image_vae" or not cfg.loss.rec2d_weight:
                ignore.append("loss.logvar_2d")
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.runner, ignore)
            self.ddp = DistributedDataParallel(self.runner, device_ids=[self.device.index]
                                               if self.device.type == "cuda" else None)
        params = list(self.model.parameters()) + [p for p in (self.loss.logvar, self.loss.logvar_2d) if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     eps=cfg.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.disc_opt = (torch.optim.AdamW(self.loss.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
                         if self.loss.discriminator is not None else None)
        self.data = data

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

    def batch(self, step: int, accum: int = 0) -> dict:
        """This rank's micro-batch ``accum`` of ``step``, built in this process (no DataLoader)."""
        if self.data is None:
            self.data = build_data(self.cfg.data, self.cfg.seed, self.cfg.frames, self.cfg.height, self.cfg.width,
                                   log=lambda r: print(f"skipped {r['path']}: {r['reason']}", file=sys.stderr))
        base = (accum * self.world + self.rank) * self.cfg.batch_size
        return collate([self.data.train[(step, base + j)] for j in range(self.cfg.batch_size)])

    def compute_loss(self, batch: dict, step: int | None = None):
        """(loss, logs, reconstruction) of one micro-batch, without DDP (tests, evaluation)."""
        step = self.step_count if step is None else step
        return self.runner(batch["video"].to(self.device), batch["seed"], step)

    def step(self, batches) -> dict:
        """One optimiser step over micro-batches (a batch, or a list of ``grad_accum`` of them)."""
        micro = [batches] if isinstance(batches, dict) else list(batches)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        disc_on = self.disc_opt is not None and self.step_count >= self.cfg.loss.disc_start
        if disc_on:
            self.disc_opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        run = self.ddp or self.runner
        for a, mb in enumerate(micro):
            x = mb["video"].to(self.device)
            # DDP averages gradients over ranks in the backward pass; only the last micro-batch's.
            with nullcontext() if self.ddp is None or a == len(micro) - 1 else self.ddp.no_sync():
                loss, logs, x_hat = run(x, mb["seed"], self.step_count)
                (loss / len(micro)).backward()
            if disc_on:
                d_loss = self.loss.discriminator_loss(frames_of(x) if x_hat.dim() == 4 else x, x_hat)
                (d_loss / len(micro)).backward()
                logs["d_loss"] = float(d_loss.detach())
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v / len(micro)
        if disc_on:
            self._average_gradients(self.loss.discriminator.parameters())
        if self.cfg.grad_clip:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        if disc_on:
            self.disc_opt.step()
        if self.ema is not None:
            with torch.no_grad():
                ema, live = list(self.ema.parameters()), list(self.model.parameters())
                torch._foreach_lerp_(ema, live, 1 - self.cfg.ema_decay)
        self.step_count += 1
        logs = self._average_logs(totals)
        logs["lr"] = self.sched.get_last_lr()[0]
        return logs

    def _average_gradients(self, params):
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def _average_logs(self, logs: dict) -> dict:
        """Every rank's values averaged: the global batch's (the losses are per-clip means)."""
        if self.world == 1:
            return logs
        import torch.distributed as dist

        keys = sorted(logs)
        t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # Validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, clips: list[torch.Tensor]) -> dict:
        """Mean over the held-out clips: video reconstruction PSNR/SSIM and, for a CV-VAE with its
        image VAE, the compatibility measure (:func:`cvvae_core.compat.compat_report`)."""
        from .compatibility import compat_report
        from ..metrics import psnr, ssim

        self.model.eval()
        rows = []
        try:
            for clip in clips:
                x = clip.unsqueeze(0).to(self.device)
                if self.cfg.model == "image_vae":
                    frames = frames_of(x)
                    recon = self.model.decode(self.model.encode(frames))
                    rows.append({"recon_psnr": psnr(recon, frames), "recon_ssim": ssim(recon, frames)})
                elif self.image_vae is not None:
                    r = compat_report(self.model, self.image_vae, x)
                    rows.append({k: v for k, v in r.items() if k.endswith(("_psnr", "_ssim"))})
                else:
                    recon = self.model.decode(self.model.encode(x))
                    rows.append({"video_recon_psnr": psnr(recon, x), "video_recon_ssim": ssim(recon, x)})
        finally:
            self.model.train()
        return {f"val/{k}": sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}

    # Checkpoints -----------------------------------------------------------------------------
    def save(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "checkpoint" if self.cfg.model == "cvvae" else "image_vae"
        self.save_snapshot(out_dir / name)
        state = {"step": self.step_count, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scheduler": self.sched.state_dict(), "loss": self.loss.state_dict(),
                 "config": json.loads(json.dumps(dataclasses.asdict(self.cfg)))}
        if self.disc_opt is not None:
            state["disc_optimizer"] = self.disc_opt.state_dict()
        if self.ema is not None:
            self.save_snapshot(out_dir / f"{name}_ema", self.ema)
            state["ema"] = self.ema.state_dict()
        tmp = out_dir / "training_state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out_dir / "training_state.pt")  # never leave a half-written state behind

    def save_snapshot(self, path: Path, model: nn.Module | None = None):
        """The model (or ``model``, e.g. the EMA copy) alone, in the same format as ``save``."""
        model = model or self.model
        was_training = model.training
        model.eval()
        if self.cfg.model == "cvvae":
            save_model(model, path)
        else:
            save_image_vae(model, path.with_suffix(".safetensors"))
        model.train(was_training)

    def resume(self, out_dir: Path) -> bool:
        """Load ``OUT/training_state.pt`` if there is one (from a run on any number of ranks)."""
        path = out_dir / "training_state.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["loss"])
        if self.disc_opt is not None and "disc_optimizer" in state:
            self.disc_opt.load_state_dict(state["disc_optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema", state["model"]))  # EMA switched on mid-run: starts here
        self.step_count = state["step"]
        return True


# The run -----------------------------------------------------------------------------------------

class RunLog:
    """Rank 0 writes OUT/log.jsonl (and TensorBoard when installed); every rank prints skips to stderr."""

    def __init__(self, out_dir: Path, rank: int, tensorboard: bool):
        self.rank = rank
        self.file = open(out_dir / "log.jsonl", "a") if rank == 0 else None
        self.tb = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: tensorboard not installed
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        self.skips = 0

    def write(self, record: dict):
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k not in ("step", "seconds") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, record["step"])
            self.tb.flush()

    def skip(self, record: dict):
        """A video that could not be used: stderr now, the log (rank 0)."""
        self.skips += 1
        print(f"[rank {self.rank}] skipped {record['path']}: {record['reason']}", file=sys.stderr)
        self.write({"event": "skip", **record})

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _shared_data(cfg: TrainConfig, rank: int, world: int, log: RunLog) -> TrainData:
    """Rank 0 lists and probes the videos; the other ranks receive the result (or its error)."""
    if world == 1:
        return build_data(cfg.data, cfg.seed, cfg.frames, cfg.height, cfg.width, log.skip)
    import torch.distributed as dist

    payload = [None]
    if rank == 0:
        try:
            data = build_data(cfg.data, cfg.seed, cfg.frames, cfg.height, cfg.width, log.skip)
            payload = [("ok", dataclasses.replace(data, val=[]))]
        except CVVAEError as e:
            payload = [("error", f"{type(e).__name__}: {e}")]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise TrainingDataError(f"rank 0 could not set up the data: {value}")
    return data if rank == 0 else value


def train(cfg: TrainConfig, device=None, resume: bool = True) -> Path:
    """Run (or resume) a training run; returns the output folder. Under torchrun every rank calls
    this (joining the process group here); rank 0 alone writes."""
    from ..distributed import join_ranks

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ranks = join_ranks(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, world, device = ranks.rank, ranks.world, ranks.device
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, rank, cfg.tensorboard)
    try:
        data = _shared_data(cfg, rank, world, log)
        trainer = Trainer(cfg, device, data, rank, world)
        if resume and trainer.resume(out_dir) and rank == 0:
            print(f"resumed from {out_dir / 'training_state.pt'} at step {trainer.step_count}", file=sys.stderr)
        _run(cfg, trainer, data, log, out_dir)
    finally:
        log.close()
    return out_dir


def _run(cfg: TrainConfig, trainer: Trainer, data: TrainData, log: RunLog, out_dir: Path):
    rank, world = trainer.rank, trainer.world
    if rank == 0:
        (out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"data: {data.description}; global batch {cfg.batch_size} x {world} ranks x {cfg.grad_accum} "
              f"accumulation = {cfg.batch_size * world * cfg.grad_accum} clips", file=sys.stderr)
    bar, first_step = TextProgress("train"), trainer.step_count
    t0 = time.time()
    loader = iter(data.loader(trainer.step_count, cfg.steps, cfg.batch_size, rank, world, cfg.grad_accum))
    pending: list[dict] = []   # videos skipped on this rank since the last log step
    seen_skips: set[str] = set()
    while trainer.step_count < cfg.steps:
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        for mb in micro:
            pending += mb["skipped"]
        logs = trainer.step(micro)
        step = trainer.step_count
        stop = False
        if step % cfg.log_every == 0 or step == cfg.steps:
            skipped = _gather(pending, world)
            pending = []
            for r in skipped:  # each video logged once per run, counted every time
                if r["path"] not in seen_skips:
                    seen_skips.add(r["path"])
                    log.skip(r)
                else:
                    log.skips += 1
            stop = bool(cfg.max_minutes and time.time() - t0 > 60 * cfg.max_minutes)
            stop = _agree(stop, world)
            if rank == 0:
                logs.update(step=step, seconds=round(time.time() - t0, 1), data_skips=log.skips)
                if trainer.device.type == "cuda":
                    logs["peak_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30, 3)
                log.write(logs)
                rate = (step - first_step) / max(1e-9, time.time() - t0)
                eta = (cfg.steps - step) / rate / 60 if rate > 0 else float("inf")
                values = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "rec_l1", "rec2d_l1", "kl") if k in logs)
                bar(step, cfg.steps, f"{values} {rate:.2f} it/s eta {eta:.1f} min")
        if rank == 0:
            if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps or stop):
                log.write({"step": step, **trainer.validate(data.val)})
            if step % cfg.save_every == 0:
                trainer.save(out_dir)
            if step in cfg.snapshot_steps:
                trainer.save_snapshot(out_dir / f"checkpoint-{step}")
        if stop:
            bar.close()
            if rank == 0:
                print(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached", file=sys.stderr)
            break
    bar.close()
    if rank == 0:
        trainer.save(out_dir)
        from .plot import plot_run

        plot_run(out_dir)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank leaves before rank 0 has written


def _gather(records: list[dict], world: int) -> list[dict]:
    if world == 1:
        return records
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, records)
    return [r for part in parts for r in part]


def _agree(flag: bool, world: int) -> bool:
    """Rank 0's decision, on every rank (so all stop at the same step)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
