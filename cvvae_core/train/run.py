"""A training run: :func:`train` in one process or as one rank of a torchrun group, its loop, its
log and its output folder.

``python -m cvvae_core train CONFIG.json`` runs :func:`train`. Under ``torchrun`` (``WORLD_SIZE``
> 1) every rank joins the group (:mod:`cvvae_core.distributed`: nccl on CUDA, gloo on CPU),
trains a DistributedDataParallel copy on its own share of each global batch, and rank 0 alone
validates and writes logs and checkpoints. One optimiser step sees a *global batch* of
``batch_size x world_size x grad_accum`` clips; the losses are per-clip means, so DDP's gradient
average over ranks, and the ``1/grad_accum`` scaling over accumulation steps, give exactly the
gradient of the mean over the global batch. The state (step, weights, optimiser, EMA) does not
depend on the number of ranks: a run resumes on any number.

Data (:mod:`cvvae_core.data.clips`): ``"data": {"videos": ...}`` for real video, procedural clips
otherwise. Every sample is keyed by (step, position in the global batch) and seeds its own clip,
posterior noise and so on, so the run is the same on 1 or N ranks.

Output folder: ``OUT/checkpoint/`` in the official release layout (CV-VAE) or
``OUT/image_vae.safetensors`` (and ``OUT/checkpoint_ema/`` / ``OUT/image_vae_ema.safetensors``
with ``ema_decay``), plus ``OUT/training_state.pt`` (model, optimizer, schedule, loss
parameters, EMA, step) from which a run resumes; ``OUT/log.jsonl`` has one line per logged step,
per validation (``val/...`` keys) and per skipped video (``"event": "skip"``);
``python -m cvvae_core plot OUT`` draws it (:mod:`cvvae_core.train.plot`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ..data.clips import TrainData, build_data
from ..distributed import Ranks, ranks_of
from ..errors import CVVAEError, TrainingDataError
from ..progress import TextProgress
from .config import TrainConfig
from .losses import LOG_MEANINGS
from .plot import plot_run
from .trainer import Trainer


class RunLog:
    """Rank 0 writes OUT/log.jsonl (and TensorBoard when installed); every rank prints skips to stderr."""

    def __init__(self, out_dir: Path, rank: int, tensorboard: bool):
        self.rank = rank
        self.file = open(out_dir / "log.jsonl", "a") if rank == 0 else None
        self.tb = None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may not be installed
            except ImportError:
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


def _shared_data(cfg: TrainConfig, ranks: Ranks, log: RunLog) -> TrainData:
    """Rank 0 lists and probes the videos; the other ranks receive the result (or its error)."""
    if ranks.world == 1:
        return build_data(cfg.data, cfg.seed, cfg.frames, cfg.height, cfg.width, log.skip)
    payload = None
    if ranks.rank == 0:
        try:
            data = build_data(cfg.data, cfg.seed, cfg.frames, cfg.height, cfg.width, log.skip)
            payload = ("ok", dataclasses.replace(data, val=[]))
        except CVVAEError as e:
            ranks.from_rank0(("error", f"{type(e).__name__}: {e}"))
            raise
    status, value = ranks.from_rank0(payload)
    if status == "error":
        raise TrainingDataError(f"rank 0 could not set up the data: {value}")
    return data if ranks.rank == 0 else value


def train(cfg: TrainConfig, device=None, resume: bool = True) -> Path:
    """Run (or resume) a training run; returns the output folder. Under torchrun every rank calls
    this (joining the process group here); rank 0 alone writes. The config was checked when it
    was made, so nothing is written for a config that cannot run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    with ranks_of(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))) as ranks:
        if ranks.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(out_dir, ranks.rank, cfg.tensorboard)
        try:
            data = _shared_data(cfg, ranks, log)
            trainer = Trainer(cfg, data=data, ranks=ranks)
            if resume and trainer.resume(out_dir) and ranks.rank == 0:
                print(f"resumed from {out_dir / 'training_state.pt'} at step {trainer.step_count}", file=sys.stderr)
            _Loop(cfg, trainer, data, log, out_dir).run()
        finally:
            log.close()
    return out_dir


class _Loop:
    """The steps of a run: train, log (rank 0), validate, save, stop on time; every rank agrees
    on when to stop."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, data: TrainData, log: RunLog, out_dir: Path):
        self.cfg, self.trainer, self.data, self.log, self.out_dir = cfg, trainer, data, log, out_dir
        self.ranks = trainer.ranks
        self.bar, self.first_step, self.t0 = TextProgress("train"), trainer.step_count, time.time()
        self.pending: list[dict] = []   # videos skipped on this rank since the last log step
        self.seen_skips: set[str] = set()

    def run(self):
        cfg, trainer, ranks = self.cfg, self.trainer, self.ranks
        if ranks.rank == 0:
            (self.out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            print(f"data: {self.data.description}; global batch {cfg.batch_size} x {ranks.world} ranks x "
                  f"{cfg.grad_accum} accumulation = {cfg.batch_size * ranks.world * cfg.grad_accum} clips",
                  file=sys.stderr)
            for name, meaning in LOG_MEANINGS.items():
                print(f"  {name}: {meaning}", file=sys.stderr)
        loader = iter(self.data.loader(trainer.step_count, cfg.steps, cfg.batch_size, ranks.rank, ranks.world,
                                       cfg.grad_accum))
        self.saved_step = trainer.step_count  # what OUT holds (resumed from, or nothing new yet)
        try:
            self._steps(loader)
        except KeyboardInterrupt:
            # Ctrl-C / SIGTERM: keep the last finished step, resumable (an update is never cut in
            # half: Trainer.step applies it whole), unless OUT already holds it.
            self.bar.close()
            if ranks.rank == 0 and trainer.step_count > self.saved_step:
                trainer.save(self.out_dir)
            raise
        if ranks.rank == 0:
            trainer.save(self.out_dir)
            plot_run(self.out_dir)
        ranks.barrier()  # no rank leaves before rank 0 has written

    def _steps(self, loader):
        cfg, trainer, ranks = self.cfg, self.trainer, self.ranks
        while trainer.step_count < cfg.steps:
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            for mb in micro:
                self.pending += mb["skipped"]
            logs = trainer.step(micro)
            step = trainer.step_count
            stop = self._log_step(step, logs) if step % cfg.log_every == 0 or step == cfg.steps else False
            if ranks.rank == 0:
                self._after_step(step, stop)
            if stop:
                self.bar.close()
                if ranks.rank == 0:
                    print(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached", file=sys.stderr)
                break
        self.bar.close()

    def _log_step(self, step: int, logs: dict) -> bool:
        """Log the skipped videos and the step's values; whether the run must stop (max_minutes)."""
        cfg, log = self.cfg, self.log
        for r in [r for part in self.ranks.gather(self.pending) for r in part]:
            if r["path"] not in self.seen_skips:  # each video logged once per run, counted every time
                self.seen_skips.add(r["path"])
                log.skip(r)
            else:
                log.skips += 1
        self.pending = []
        stop = self.ranks.from_rank0(bool(cfg.max_minutes and time.time() - self.t0 > 60 * cfg.max_minutes))
        if self.ranks.rank == 0:
            logs.update(step=step, seconds=round(time.time() - self.t0, 1), data_skips=log.skips)
            if self.trainer.device.type == "cuda":
                logs["peak_gib"] = round(torch.cuda.max_memory_allocated(self.trainer.device) / 2 ** 30, 3)
            log.write(logs)
            rate = (step - self.first_step) / max(1e-9, time.time() - self.t0)
            eta = (cfg.steps - step) / rate / 60 if rate > 0 else float("inf")
            values = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "rec_l1", "rec2d_l1", "kl") if k in logs)
            self.bar(step, cfg.steps, f"{values} {rate:.2f} it/s eta {eta:.1f} min")
        return stop

    def _after_step(self, step: int, stop: bool):
        cfg, trainer = self.cfg, self.trainer
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.steps or stop):
            self.log.write({"step": step, **trainer.validate(self.data.val)})
        if step % cfg.save_every == 0:
            trainer.save(self.out_dir)
            self.saved_step = step
        if step in cfg.snapshot_steps:
            trainer.save_snapshot(self.out_dir / f"checkpoint-{step}")
