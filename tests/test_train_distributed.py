"""Data-parallel training (gloo, 2 CPU processes, as torchrun starts them): 2 ranks x batch 1 is
1 rank x batch 2, step for step; a run resumes on another number of ranks; gradient accumulation
is a bigger batch; activation checkpointing changes no gradient; EMA."""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cvvae_core
from cvvae_core.io.image_vae_file import save_image_vae
from cvvae_core.model.image_vae import ImageVAE, ImageVAEConfig
from cvvae_core.train.config import TrainConfig
from cvvae_core.train.run import train
from cvvae_core.train.trainer import Trainer, checkpoint_blocks
from test_train_data import make_video

ROOT = Path(__file__).resolve().parents[1]
#: Attention key biases (spatial k, temporal k_t): see assert_same_run.
KEY_BIAS = re.compile(r"\.k(_t)?\.bias$")
IMAGE_CFG = dict(base_channels=8, channel_mult=(1, 2, 2, 2), blocks_per_level=1, norm_groups=4, norm_eps=1e-5,
                 quant_conv=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    ivae = str(save_image_vae(ImageVAE(ImageVAEConfig(**IMAGE_CFG)), root / "image_vae.safetensors"))
    make_video(root / "videos" / "a.mp4", frames=30)
    make_video(root / "videos" / "b.mp4", frames=20, height=32, width=32)
    return root, ivae


def config(setup, out, workers=0, **kw) -> dict:
    """A tiny run on the test videos (``workers`` decoding processes; the clips do not depend on it)."""
    root, ivae = setup
    base = dict(model="cvvae", out_dir=str(out), image_vae=ivae, steps=2, batch_size=2, frames=5, height=16,
                width=16, lr=1e-3, warmup_steps=1, log_every=1, save_every=100, seed=3, ema_decay=0.5,
                data={"videos": str(root / "videos"), "frame_stride": 2, "workers": workers})
    return {**base, **kw}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_ranks(cfg: dict, path: Path, world: int = 2, timeout: float = 240):
    """``python -m cvvae_core train CFG`` in ``world`` processes with torchrun's environment."""
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ranks = [subprocess.Popen([sys.executable, "-m", "cvvae_core", "train", str(path), "--device", "cpu"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting in a collective must not outlive the test
            p.kill()
    assert [p.returncode for p in ranks] == [0] * world, logs
    return logs


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def state(out: Path) -> dict:
    return torch.load(out / "training_state.pt", weights_only=True)


def assert_same_run(a: Path, b: Path, steps: int):
    sa, sb = state(a), state(b)
    assert sa["step"] == sb["step"] == steps
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == steps and la == pytest.approx(lb, rel=1e-4)
    for part in ("model", "ema", "loss"):   # the loss holds the learned log-variances
        assert_same_weights(sa[part], sb[part])


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, w in a.items():
        if KEY_BIAS.search(k):
            # An attention key bias adds the same logit to every key of a query: softmax ignores it,
            # its gradient is 0 up to rounding, and Adam turns that rounding into lr-sized steps.
            continue
        torch.testing.assert_close(w, b[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_two_ranks_equal_one_process_and_resume_on_one_rank(setup, tmp_path):
    root, _ = setup
    logs = torchrun_ranks(config(setup, tmp_path / "ddp", workers=1, batch_size=1), tmp_path / "ddp.json")
    assert "global batch 1 x 2 ranks x 1 accumulation = 2 clips" in logs[0]
    assert not (tmp_path / "ddp_rank1").exists() and "saved to" not in logs[1]   # rank 0 alone writes
    train(TrainConfig(**config(setup, tmp_path / "one")), device="cpu")
    assert_same_run(tmp_path / "ddp", tmp_path / "one", 2)
    # The weights did move (the comparison above is not of two untouched models).
    init = Trainer(TrainConfig(**config(setup, tmp_path / "x")), device="cpu").model.state_dict()
    assert max((init[k] - w).abs().max() for k, w in state(tmp_path / "one")["model"].items()) > 1e-3

    # Gradient accumulation: 1 rank x batch 1 x 2 micro-batches is the same step.
    train(TrainConfig(**config(setup, tmp_path / "accum", batch_size=1, grad_accum=2)), device="cpu")
    assert_same_run(tmp_path / "accum", tmp_path / "one", 2)

    # Resume the 2-rank run on 1 rank (batch 2: the same global batch) and go on to step 3: the
    # same as the 1-rank run going on.
    train(TrainConfig(**config(setup, tmp_path / "ddp", steps=3)), device="cpu")
    train(TrainConfig(**config(setup, tmp_path / "one", steps=3)), device="cpu")
    assert_same_run(tmp_path / "ddp", tmp_path / "one", 3)
    model = cvvae_core.load_model(tmp_path / "ddp" / "checkpoint_ema")
    torch.testing.assert_close(model.state_dict()["encoder.conv_in.weight"],
                               state(tmp_path / "ddp")["ema"]["encoder.conv_in.weight"])


def test_image_vae_with_adversarial_loss_and_accumulation_on_two_ranks(setup, tmp_path):
    """2 ranks x batch 1 x 2 accumulation steps (DDP's no_sync on the first) is 1 rank x batch 4,
    with the parameters DDP must leave alone: the discriminator (own optimiser, gradients
    averaged by hand) and the log-variance an image VAE run never uses."""
    cfg = dict(model="image_vae", image_vae=None, frames=2, batch_size=1, grad_accum=2, ema_decay=0.0,
               image_vae_config=IMAGE_CFG, data={"synthetic": True},
               loss={"adversarial_weight": 0.1, "kl_weight": 1e-6})
    logs = torchrun_ranks(config(setup, tmp_path / "ddp", **cfg), tmp_path / "ddp.json")
    assert "global batch 1 x 2 ranks x 2 accumulation = 4 clips" in logs[0]
    train(TrainConfig(**config(setup, tmp_path / "one", **{**cfg, "batch_size": 4, "grad_accum": 1})), device="cpu")
    a, b = state(tmp_path / "ddp"), state(tmp_path / "one")
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    for part in ("model", "loss"):   # the loss holds the discriminator
        assert_same_weights(a[part], b[part])
    assert any(k.startswith("discriminator.") for k in a["loss"])


def test_activation_checkpointing_changes_no_gradient(setup, tmp_path):
    cfg = TrainConfig(**config(setup, tmp_path / "run", data={"synthetic": True}, ema_decay=0.0))
    plain = Trainer(cfg, device="cpu")
    ckpt = Trainer(TrainConfig(**{**config(setup, tmp_path / "run", data={"synthetic": True}, ema_decay=0.0),
                                  "activation_checkpointing": True}), device="cpu")
    assert checkpoint_blocks(torch.nn.Sequential()) == 0
    wrapped = [m for m in ckpt.model.modules() if "forward" in vars(m)]
    assert len(wrapped) >= 8   # every resnet and mid block of encoder and decoder
    batch = plain.batch(0)
    losses = [t.compute_loss(batch)[0] for t in (plain, ckpt)]
    torch.testing.assert_close(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (k, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")
