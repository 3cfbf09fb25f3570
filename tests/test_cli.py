"""The command line: info and reconstruct, and clear errors with exit status 2."""
import json

import torch

import cvvae_core
from cvvae_core.cli import main
from cvvae_core.video_io import read_video, write_video


def test_info_reports_variant_and_parameters(tiny_model, tmp_path, capsys):
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == tiny_model.variant
    assert info["latent_channels"] == tiny_model.latent_channels
    assert info["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert info["file_dtype"] == ["float16"]


def test_info_on_a_foreign_file_fails_cleanly(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"<html>404</html>")
    assert main(["info", str(bad)]) == 2
    assert "HTML" in capsys.readouterr().err


def test_reconstruct_writes_video_strip_and_metrics(tiny_model, tmp_path, capsys):
    ckpt = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    frames = (torch.rand(7, 40, 56, 3) * 255).to(torch.uint8)
    write_video(tmp_path / "in.mp4", frames, fps=8)
    out = tmp_path / "out.mp4"
    assert main(["reconstruct", str(ckpt), str(tmp_path / "in.mp4"), str(out), "--height", "32", "--width", "48"]) == 0
    text = capsys.readouterr().out
    assert "trimmed  2 trailing frames" in text and "PSNR" in text and "SSIM" in text
    decoded, _ = read_video(out)
    assert decoded.shape == (5, 32, 48, 3)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
