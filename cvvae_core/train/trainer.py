"""The trainer: one optimisation step at a time over (micro-)batches, validation, checkpoints.

:class:`TrainStep` is the differentiable part of a step as one module (what DDP wraps);
:class:`Trainer` holds the model, the frozen image VAE, the optimiser, the schedule and the EMA
copy, and saves and resumes them. The loop around it is :mod:`cvvae_core.train.run`.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..data.clips import TrainData, build_data, collate, seed_of
from ..distributed import Ranks
from ..errors import TrainConfigError
from ..io.checkpoint import load_model, save_model
from ..io.image_vae_file import load_image_vae, save_image_vae
from ..metrics import psnr, ssim
from ..model.cvvae import CVVAE, sample_posterior
from ..model.image_vae import ImageVAE, ImageVAEConfig, MidBlock2D, ResnetBlock2D
from ..model.layers import ResnetBlock, SpaceTimeAttention
from .compatibility import compat_report
from .config import TrainConfig
from .inflate import inflate, video_config
from .losses import VAELoss, frames_of, regularization_targets


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
    kinds = (ResnetBlock, SpaceTimeAttention, ResnetBlock2D, MidBlock2D)
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
                mean, logvar = self.model.split_moments(self.model.encoder_output(x))
                x_hat = self.model.decoder_output(self._sample(mean, logvar, seeds, "posterior"))
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
        return sample_posterior(mean, logvar, noise=sample_noise(mean.shape[1:], seeds, salt))


class Trainer:
    """One training run (one rank of it). ``step(batch)`` does one optimisation step on a batch
    (or a list of micro-batches, accumulated) and returns the logged values, averaged over ranks."""

    def __init__(self, cfg: TrainConfig, device=None, data: TrainData | None = None, ranks: Ranks | None = None):
        self.cfg = cfg
        self.ranks = ranks or Ranks(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.rank, self.world, self.device = self.ranks.rank, self.ranks.world, self.ranks.device
        self.step_count = 0
        self.data = data
        self._build_models()
        # The EMA copy lives on rank 0 (the rank that saves); copied before any forward is wrapped.
        self.ema = (copy.deepcopy(self.model).requires_grad_(False).eval()
                    if cfg.ema_decay and self.rank == 0 else None)
        if cfg.activation_checkpointing:
            checkpoint_blocks(self.model)
        self.runner = TrainStep(cfg, self.model, self.loss, self.image_vae)
        self.ddp = self._data_parallel() if self.world > 1 else None
        params = list(self.model.parameters()) + [p for p in (self.loss.logvar, self.loss.logvar_2d) if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                     eps=cfg.adam_eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.disc_opt = (torch.optim.AdamW(self.loss.discriminator.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
                         if self.loss.discriminator is not None else None)

    def _build_models(self):
        """The model to train, the frozen image VAE (CV-VAE runs) and the loss module. Weights that
        initialisation leaves random (e.g. the temporal attention after inflation, the
        discriminator) come from the run's seed, not from wherever the global generator was left."""
        cfg = self.cfg
        self.image_vae: ImageVAE | None = None
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

    def _data_parallel(self) -> DistributedDataParallel:
        """DDP around the step: it averages what every step's backward reaches. Not: the
        discriminator (its own optimiser and backward, averaged by hand) and an unused
        image-decoder log-variance."""
        cfg = self.cfg
        ignore = [f"loss.discriminator.{k}" for k in self.loss.discriminator.state_dict()] \
            if self.loss.discriminator is not None else []
        if cfg.model == "image_vae" or not cfg.loss.rec2d_weight:
            ignore.append("loss.logvar_2d")
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.runner, ignore)
        return DistributedDataParallel(self.runner, device_ids=[self.device.index]
                                       if self.device.type == "cuda" else None)

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
            self.ranks.average_gradients(self.loss.discriminator.parameters())
        if self.cfg.grad_clip:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        with _signals_after():  # the update is whole or not at all: an interrupt leaves a state to save
            self.opt.step()
            self.sched.step()
            if disc_on:
                self.disc_opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    ema, live = list(self.ema.parameters()), list(self.model.parameters())
                    torch._foreach_lerp_(ema, live, 1 - self.cfg.ema_decay)
            self.step_count += 1
        logs = self.ranks.mean(totals)  # the global batch's values: the losses are per-clip means
        logs["lr"] = self.sched.get_last_lr()[0]
        return logs

    # Validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, clips: list[torch.Tensor]) -> dict:
        """Mean over the held-out clips: video reconstruction PSNR/SSIM and, for a CV-VAE with its
        image VAE, the compatibility measure (:func:`cvvae_core.train.compatibility.compat_report`)."""
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
                 "config": self.cfg.to_dict()}
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


@contextmanager
def _signals_after():
    """SIGINT and SIGTERM that arrive inside the block are handled (by the handlers in place) when
    it ends, so that weights, optimizer, schedule, EMA and step count change together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    handled = {s: h for s, h in before.items() if callable(h)}
    for s in handled:
        signal.signal(s, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for s, h in handled.items():
            signal.signal(s, h)
        for signum, frame in caught[:1]:
            handled[signum](signum, frame)
