"""Training on real video: sources (folder, manifests), clip sampling, skips and typed errors, the
run's log (validation, skips, TensorBoard when installed), the curves PNG, LPIPS."""
import json
import struct
import sys
import types
import zlib

import numpy as np
import pytest
import torch

from cvvae_core.cli.main import main
from cvvae_core.errors import CheckpointKeyError, TrainingDataError
from cvvae_core.io.image_vae_file import save_image_vae
from cvvae_core.model.image_vae import ImageVAE, ImageVAEConfig
from cvvae_core.train.lpips import LPIPS, load_lpips
from cvvae_core.train.plot import COLOURS, PANEL_H, plot_run
from cvvae_core.data.clips import DataConfig, RandomClips, Video, build_data, probe
from cvvae_core.data.manifest import Source, list_sources
from cvvae_core.errors import TrainConfigError
from cvvae_core.train.config import LossConfig, TrainConfig
from cvvae_core.train.run import train
from cvvae_core.train.trainer import Trainer
from cvvae_core.io.video import write_video

IMAGE_CFG = dict(base_channels=8, channel_mult=(1, 2, 2, 2), blocks_per_level=1, norm_groups=4, norm_eps=1e-5,
                 quant_conv=False)
LEVEL, STEP = 20, 6   # frame i of a test video is flat grey LEVEL + STEP * i (survives H.264)


def make_video(path, frames=30, height=40, width=56):
    """A tiny H.264 video whose frame i is flat grey LEVEL + STEP * i, so a clip tells its frames."""
    levels = LEVEL + STEP * torch.arange(frames)
    write_video(path, levels.view(-1, 1, 1, 1).expand(frames, height, width, 3).to(torch.uint8).contiguous(), crf=0)
    return path


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """Source frame numbers of a [3, T, H, W] clip of make_video's frames."""
    grey = (clip.mean((0, 2, 3)) + 1) * 127.5
    return [round(float((g - LEVEL) / STEP)) for g in grey]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_video(root / "a.mp4", frames=30)
    make_video(root / "sub" / "b.mp4", frames=24, height=24, width=32)   # smaller than a 32x32 crop
    return root


@pytest.fixture(scope="module")
def image_vae_file(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_image_vae(ImageVAE(ImageVAEConfig(**IMAGE_CFG)),
                              tmp_path_factory.mktemp("ivae") / "image_vae.safetensors"))


def run_config(image_vae_file, out, data, **kw):
    base = dict(model="cvvae", out_dir=str(out), image_vae=image_vae_file, steps=2, batch_size=1, frames=5,
                height=16, width=16, lr=1e-3, warmup_steps=1, log_every=1, save_every=100, data=data)
    return TrainConfig(**{**base, **kw})


def test_sources_from_a_folder_and_each_manifest_kind(videos, tmp_path):
    srcs, problems = list_sources(str(videos))
    assert [s.name for s in srcs] == ["a.mp4", "sub/b.mp4"] and problems == []
    (tmp_path / "list.txt").write_text(f"# comment\n{videos}/a.mp4 0.5 1.0\nno where 2.mp4\n\n")
    srcs, problems = list_sources(str(tmp_path / "list.txt"))
    assert [(s.start, s.end) for s in srcs] == [(0.5, 1.0)]
    assert problems[0]["path"] == "no where 2.mp4"   # spaces in a path; not "start, end"
    assert "line 3" in problems[0]["reason"] and "does not exist" in problems[0]["reason"]
    (tmp_path / "list.csv").write_text(f"path,start_frame,end_frame\n{videos}/a.mp4,4,20\n")
    (src,), _ = list_sources(str(tmp_path / "list.csv"))
    assert (src.start_frame, src.end_frame) == (4, 20)
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "../" + videos.name + "/a.mp4", "end": 0.5}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.jsonl").write_text(json.dumps({"path": str(videos / "a.mp4"), "end": 0.5}) + "\n")
    (src,), _ = list_sources(str(tmp_path / "sub" / "list.jsonl"))
    assert src.end == 0.5
    v = probe(src, 5, DataConfig(videos="x"))
    assert (v.first, v.stop, v.fps) == (0, 12, 24.0)   # 0.5 s at 24 fps


def test_missing_and_empty_data_are_typed_errors_that_say_what_to_do(tmp_path):
    with pytest.raises(TrainingDataError, match="does not exist; give a folder of videos or a manifest"):
        list_sources(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingDataError, match="holds no video files"):
        list_sources(str(tmp_path / "empty"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(TrainingDataError, match="manifest ends in"):
        list_sources(str(tmp_path / "x.json"))


def test_clips_are_keyed_strided_and_cropped(videos):
    cfg = DataConfig(videos=str(videos), frame_stride=3, workers=0)
    data = build_data(cfg, seed=5, frames=5, height=16, width=16, log=lambda r: pytest.fail(str(r)))
    a, b = data.train[(3, 1)], data.train[(3, 1)]
    assert torch.equal(a["video"], b["video"]) and a["seed"] == b["seed"]   # a pure function of the key
    assert a["video"].shape == (3, 5, 16, 16)
    starts = set()
    for i in range(12):
        nums = frame_numbers(data.train[(0, i)]["video"])
        assert [n - nums[0] for n in nums] == [0, 3, 6, 9, 12], nums      # every 3rd source frame
        starts.add(nums[0])
    assert len(starts) > 3                                                 # random positions
    other = build_data(cfg, seed=6, frames=5, height=16, width=16, log=print)
    assert not torch.equal(other.train[(3, 1)]["video"], a["video"])
    # A video smaller than the crop is upscaled to cover it (the normal case, not an error).
    small = Video(Source(str(videos / "sub" / "b.mp4"), "b"), 24.0, 0, 24, 1, 32, 24)
    clip = RandomClips([small], 0, 5, 32, 32, None)[(0, 0)]["video"]
    assert clip.shape == (3, 5, 32, 32)


def test_crop_larger_than_the_resized_frame_is_a_config_error():
    with pytest.raises(TrainConfigError, match="resize 24 .* smaller than the 32x32 crop"):
        TrainConfig(model="cvvae", image_vae="x", height=32, width=32, data={"videos": "v", "resize": 24})
    with pytest.raises(TrainConfigError, match="valid keys"):
        TrainConfig(model="cvvae", image_vae="x", data={"video": "v"})
    with pytest.raises(TrainConfigError, match="val_every needs held-out clips"):
        TrainConfig(model="cvvae", image_vae="x", val_every=5, data={"videos": "v"})


def test_unusable_videos_are_skipped_and_all_unusable_is_an_error(videos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    make_video(bad / "short.mp4", frames=3)
    (bad / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    (bad / "notes.mkv").write_text("not a video")
    skipped = []
    with pytest.raises(TrainingDataError, match="none of the 3 videos .* can be used"):
        build_data(DataConfig(videos=str(bad)), 0, 5, 16, 16, skipped.append)
    reasons = {r["path"]: r["reason"] for r in skipped}
    assert "too short: 3 usable frames" in reasons["short.mp4"]
    assert "truncated or corrupt" in reasons["corrupt.mp4"] and "not a video file" in reasons["notes.mkv"]
    # A video whose header promises more frames than it has: the sample is drawn again, the skip kept.
    liar = Video(Source(str(videos / "a.mp4"), "liar"), 24.0, 100, 130, 1, 56, 40)   # frames 100-129 claimed
    good = Video(Source(str(videos / "a.mp4"), "a"), 24.0, 0, 30, 1, 56, 40)
    ds = RandomClips([liar, good], 0, 5, 16, 16, None)
    items = [ds[(0, i)] for i in range(8)]
    assert all(it["video"].shape == (3, 5, 16, 16) for it in items)
    skipped = [s for it in items for s in it["skipped"]]
    assert skipped and all(s["path"] == "liar" and "ended early" in s["reason"] for s in skipped)
    with pytest.raises(TrainingDataError, match="16 clips in a row"):
        RandomClips([liar], 0, 5, 16, 16, None)[(0, 0)]


def test_a_run_on_real_clips_logs_skips_validation_and_curves(videos, image_vae_file, tmp_path, capsys, monkeypatch):
    (tmp_path / "list.txt").write_text(f"{videos}/a.mp4\n{videos}/sub/b.mp4\nmissing.mp4\n")
    short = make_video(tmp_path / "short.mp4", frames=3)
    (tmp_path / "list.txt").write_text((tmp_path / "list.txt").read_text() + f"{short}\n")
    written = []

    class Writer:  # a stand-in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    data = {"videos": str(tmp_path / "list.txt"), "val": str(videos / "a.mp4").replace("a.mp4", ""),
            "val_clips": 2, "workers": 1}
    cfg = run_config(image_vae_file, tmp_path / "run", data, val_every=2, ema_decay=0.5)
    train(cfg, device="cpu")
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skips = {r["path"]: r["reason"] for r in lines if r.get("event") == "skip"}
    assert "missing.mp4" in skips and "does not exist" in skips["missing.mp4"]
    assert "too short" in skips[str(short)]
    err = capsys.readouterr().err
    assert "skipped missing.mp4" in err and "2 videos" in err
    val = [r for r in lines if "val/image_decoder_psnr" in r]
    assert [r["step"] for r in val] == [2] and 5 < val[0]["val/video_recon_psnr"] < 100
    assert ("train/loss", 1) in written and ("val/image_decoder_psnr", 2) in written
    assert (tmp_path / "run" / "checkpoint_ema" / "config.json").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()


def test_tensorboard_missing_breaks_nothing(image_vae_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import raises ImportError
    train(run_config(image_vae_file, tmp_path / "run", {"synthetic": True}, steps=1), device="cpu")
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["step"] == 1


def test_bad_data_through_the_command_line(image_vae_file, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "cvvae", "image_vae": image_vae_file, "frames": 5, "height": 16,
                               "width": 16, "steps": 1, "out_dir": str(tmp_path / "run"),
                               "data": {"videos": str(tmp_path / "no_such_folder")}}))
    assert main(["train", str(cfg)]) == 2
    assert "no_such_folder does not exist; give a folder of videos" in capsys.readouterr().err


# The curves PNG ------------------------------------------------------------------------------

def read_png(path) -> np.ndarray:
    """Decode an 8-bit RGB, filter-0 PNG (what write_png writes), checking every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (n,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_plot_draws_the_curves(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 1000.0 / s, "rec_l1": 0.3 - 0.01 * s} for s in range(1, 21)]
    lines += [{"step": s, "val/video_recon_psnr": 15 + s / 4, "val/video_recon_ssim": 0.5} for s in (5, 10, 20)]
    lines.insert(3, {"event": "skip", "path": "x.mp4", "reason": "r"})
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert main(["plot", str(run)]) == 0 and "curves.png" in capsys.readouterr().out
    img = read_png(run / "curves.png")
    assert img.shape[0] == 4 * PANEL_H   # loss, L1, val PSNR, val SSIM
    loss_panel = img[:PANEL_H]
    ys, xs = np.nonzero((loss_panel == COLOURS[0]).all(-1)[30:])   # below the title
    assert len(xs) > 300                                           # a line across the panel
    left, right = ys[xs < xs.min() + 20].mean(), ys[xs > xs.max() - 20].mean()
    assert left < right - 50                                       # falling loss: high on the left
    psnr_panel = img[2 * PANEL_H:3 * PANEL_H]
    ys, xs = np.nonzero((psnr_panel == COLOURS[0]).all(-1)[30:])
    assert ys[xs < xs.min() + 10].mean() > ys[xs > xs.max() - 10].mean() + 50   # rising PSNR
    with pytest.raises(Exception, match="log.jsonl does not exist"):
        plot_run(tmp_path / "nothing")


# LPIPS ---------------------------------------------------------------------------------------

def write_lpips_weights(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ref = LPIPS()
    vgg = {k[4:]: torch.randn(v.shape, generator=g) * 0.1 for k, v in ref.state_dict().items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)   # torchvision files also hold the classifier
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
           for i, c in enumerate((64, 128, 256, 512, 512))}
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save(lin, tmp_path / "lin.pth")
    return tmp_path / "vgg16.safetensors", tmp_path / "lin.pth"


def test_lpips_from_user_weights(tmp_path, image_vae_file):
    vgg, lin = write_lpips_weights(tmp_path)
    lp = load_lpips(vgg, lin)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32)).clamp(-1, 1)
    assert torch.allclose(lp(x, x), torch.zeros(2)) and lp(x, y).shape == (2,) and (lp(x, y) > 0).all()
    assert not any(p.requires_grad for p in lp.parameters())
    with pytest.raises(CheckpointKeyError, match="lin0.model.1.weight"):
        load_lpips(vgg, vgg)
    with pytest.raises(TrainConfigError, match="lpips_vgg"):
        LossConfig(perceptual="lpips") and TrainConfig(model="cvvae", image_vae="x", loss={"perceptual": "lpips"})
    cfg = run_config(image_vae_file, tmp_path / "run", {"synthetic": True},
                     loss=LossConfig(perceptual="lpips", lpips_vgg=str(vgg), lpips_lin=str(lin)))
    trainer = Trainer(cfg, device="cpu")
    logs = trainer.step(trainer.batch(0))
    assert np.isfinite(logs["loss"])
    assert not any(k.startswith("lpips") for k in trainer.loss.state_dict())   # not saved with the run
