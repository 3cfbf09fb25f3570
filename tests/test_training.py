"""Training: the latent-regularization objective, one optimisation step, resuming."""
import json
import re
from pathlib import Path

import pytest
import torch

from cvvae_core.io.image_vae_file import save_image_vae
from cvvae_core.model.image_vae import ImageVAE, ImageVAEConfig
from cvvae_core.errors import TrainConfigError
from cvvae_core.train.config import LossConfig, TrainConfig
from cvvae_core.train.losses import regularization_targets
from cvvae_core.train.trainer import Trainer

IMAGE_CFG = dict(base_channels=8, channel_mult=(1, 2, 2, 2), blocks_per_level=1, norm_groups=4, norm_eps=1e-5,
                 quant_conv=False)


@pytest.fixture(scope="module")
def image_vae_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ImageVAE(ImageVAEConfig(**IMAGE_CFG))
    return str(save_image_vae(model, tmp_path_factory.mktemp("ivae") / "image_vae.safetensors"))


def cvvae_config(image_vae_file, tmp_path, lr=1e-3, **loss):
    return TrainConfig(model="cvvae", out_dir=str(tmp_path / "run"), image_vae=image_vae_file, steps=2, batch_size=1,
                       frames=5, height=16, width=16, lr=lr, warmup_steps=1, loss=LossConfig(**loss))


def test_random_targets_follow_the_official_rule():
    """Latent frame 0 -> frame 0; latent frame i -> a uniformly drawn frame of 4i-3 .. 4i."""
    video = torch.arange(17.0).view(1, 1, 17, 1, 1)
    g = torch.Generator().manual_seed(0)
    seen = {i: set() for i in range(1, 5)}
    for _ in range(200):
        frames, idx = regularization_targets(video, "random", g, 4)
        assert idx[0] == 0 and torch.equal(frames.flatten(), idx.float())
        for i in range(1, 5):
            assert 4 * i - 3 <= idx[i] <= 4 * i
            seen[i].add(int(idx[i]))
    assert all(len(s) == 4 for s in seen.values())
    _, idx = regularization_targets(video, "slice", g, 4)
    assert idx.tolist() == [0, 4, 8, 12, 16]


def test_one_step_lowers_the_loss_on_a_fixed_batch(image_vae_file, tmp_path):
    # Adam's first step moves every weight by about lr whatever its gradient; a small lr keeps
    # the step inside the region where the first-order decrease holds.
    trainer = Trainer(cvvae_config(image_vae_file, tmp_path, lr=1e-4), device="cpu")
    x = trainer.batch(0)
    frozen = {k: v.clone() for k, v in trainer.image_vae.state_dict().items()}

    def loss_now():
        # Same posterior noise and same random target frames before and after the step: both are
        # drawn from the clip's seed and the step number.
        with torch.no_grad():
            loss, logs, _ = trainer.compute_loss(x, step=0)
        return float(loss), logs

    before, logs = loss_now()
    assert {"rec_l1", "rec2d_l1", "kl"} <= logs.keys()
    trainer.step(x)
    after, _ = loss_now()
    assert after < before, (before, after)
    # The image decoder is the fixed target of the regularization: it must not move.
    assert all(torch.equal(v, trainer.image_vae.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in trainer.image_vae.parameters())


def test_regularization_term_reaches_the_encoder(image_vae_file, tmp_path):
    """With only the image-decoder term, the encoder still gets gradient: the video latent is what
    the regularization shapes. Without it (rec2d_weight 0) the term is absent from the loss."""
    trainer = Trainer(cvvae_config(image_vae_file, tmp_path, rec2d_weight=1.0), device="cpu")
    batch = trainer.batch(0)
    _, logs_on, _ = trainer.compute_loss(batch)
    off = Trainer(cvvae_config(image_vae_file, tmp_path, rec2d_weight=0.0), device="cpu")
    _, logs_off, _ = off.compute_loss(batch)
    x = batch["video"]
    assert "rec2d_l1" in logs_on and "rec2d_l1" not in logs_off
    trainer.model.zero_grad()
    gen = torch.Generator().manual_seed(1)
    mean, logvar = trainer.model.split_moments(trainer.model.encoder_output(x))
    target, _ = regularization_targets(x, "random", gen, trainer.model.config.time_compression)
    trainer.loss.nll(trainer.loss.pixel_loss(target, trainer.image_vae.decode_video(mean)), trainer.loss.logvar_2d).backward()
    assert trainer.model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert trainer.model.decoder.conv_in.weight.grad is None


def test_adversarial_option_runs(image_vae_file, tmp_path):
    trainer = Trainer(cvvae_config(image_vae_file, tmp_path, adversarial_weight=0.1), device="cpu")
    logs = trainer.step(trainer.batch(0))
    assert "g_loss" in logs and "d_loss" in logs


def test_save_and_resume(image_vae_file, tmp_path):
    import cvvae_core

    cfg = cvvae_config(image_vae_file, tmp_path)
    trainer = Trainer(cfg, device="cpu")
    trainer.step(trainer.batch(0))
    trainer.save(tmp_path / "run")
    resumed = Trainer(cfg, device="cpu")
    assert resumed.resume(tmp_path / "run") and resumed.step_count == 1
    for (k, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # The checkpoint is in the official release layout and loads with the public loader.
    model = cvvae_core.load_model(tmp_path / "run" / "checkpoint")
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file()
    assert model.config.norm_groups == 4


def test_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(TrainConfigError, match="1\\+4k"):
        TrainConfig(model="cvvae", frames=8, image_vae="x.safetensors")
    with pytest.raises(TrainConfigError, match="image_vae"):
        TrainConfig(model="cvvae", frames=9)
    with pytest.raises(TrainConfigError, match="'bf16' .*'fp32'"):
        TrainConfig(model="cvvae", frames=9, image_vae="x.safetensors", precision="fp16")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "cvvae", "stepz": 3}')
    with pytest.raises(TrainConfigError, match="stepz"):
        TrainConfig.from_json(bad)


@pytest.mark.parametrize("values, message", [
    ({"lr": "3e-4"}, 'lr: expected a number, got "3e-4" (in quotes'),
    ({"steps": "2"}, 'steps: expected a whole number, got "2"'),
    ({"batch_size": 2.5}, "batch_size: expected a whole number, got 2.5"),
    ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({"betas": [0.9]}, "betas: expected a list of 2 numbers"),
    ({"loss": {"rec2d_wieght": 2.0}}, "unknown key loss.rec2d_wieght; valid keys in loss: adversarial_weight, "),
    ({"loss": {"kl_weight": -1}}, "loss.kl_weight: must be >= 0"),
    ({"data": {"frame_strid": 2}}, "unknown key data.frame_strid; valid keys in data: "),
    ({"data": {"workers": "2"}}, 'data.workers: expected a whole number, got "2"'),
    ({"snapshot_steps": [5, "x"]}, 'snapshot_steps[1]: expected a whole number, got "x"'),
])
def test_every_key_at_every_level_is_checked_before_anything_is_written(tmp_path, capsys, values, message):
    from cvvae_core.cli.main import main

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"model": "cvvae", "image_vae": "builtin", "frames": 5, **values}))
    with pytest.raises(TrainConfigError, match=re.escape(message)):
        TrainConfig.from_json(config)
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_paths_in_a_config_file_are_relative_to_it_or_builtin(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"model": "cvvae", "image_vae": "vae.safetensors", "frames": 5,
                                                 "init": "builtin", "data": {"videos": "clips/"},
                                                 "out_dir": "runs/x"}))
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.from_json(Path("configs") / "run.json", {"image_vae": None})
    assert cfg.image_vae == str(folder / "vae.safetensors") and cfg.init == "builtin"
    assert cfg.data.videos == str(folder / "clips")
    assert cfg.out_dir == "runs/x"                                    # outputs: the working directory
    assert TrainConfig.from_json(folder / "run.json", {"image_vae": "mine.safetensors"}).image_vae == "mine.safetensors"
