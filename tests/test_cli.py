"""The command line: info and reconstruct, and clear errors with exit status 2."""
import json

import pytest
import torch

import cvvae_core
from cvvae_core.cli.args import legacy_size_pairs, size_rule
from cvvae_core.cli.main import build_parser, main
from cvvae_core.errors import OutOfMemoryError
from cvvae_core.io.video import read_video, write_video


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
    assert "cropped  2 trailing frames (" in text and "PSNR" in text and "SSIM" in text
    decoded, _ = read_video(out)
    assert decoded.shape == (5, 32, 48, 3)
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Bad arguments are refused while parsing, saying what is allowed (exit status 2, no traceback)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,allowed", [
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--frames", "0"], "--frames: must be 1+4k (1, 5, 9, 13, 17, "
                                                                       "...), got 0; nearest: 1\n"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--frames", "-3"], "got -3; nearest: 1\n"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--frames", "16"], "--frames: must be 1+4k (1, 5, 9, 13, 17, "
                                                                        "...), got 16; nearest: 13 or 17"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--size", "63x65"], "--size: must be HxW in multiples of 8, "
                                                                         "got 63x65; nearest: 56x64 or 64x72"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--size", "4x64"], "nearest: 8x64\n"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--size", "64"], "--size: must be HxW in multiples of 8"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--height", "0"], "--height: must be a multiple of 8, at least 8"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--height", "63"], "got 63; nearest: 56 or 64"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--width", "-64"], "--width: must be a multiple of 8"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--tile-size", "100"], "--tile-size: must be a multiple of 8"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--tile-size", "-8"], "--tile-size: must be a multiple of 8"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--chunk-frames", "0"], "--chunk-frames: must be an integer >= 1"),
    (["reconstruct", "builtin", "in.mp4", "out.mp4", "--device", "gpu"], "--device: must be auto, cpu, cuda"),
    (["train", "cfg.json", "--steps", "0"], "--steps: must be an integer >= 1"),
    (["compat", "builtin", "builtin", "synthetic:1", "--frames", "4"], "--frames: must be 1+4k of at least 5"),
    (["compat", "builtin", "builtin", "synthetic:1", "--frames", "1"], "got 1; nearest: 5\n"),
    (["compat", "builtin", "builtin", "synthetic:1", "--size", "64", "-8"], "--size: must be HxW in multiples of 8"),
    (["compat", "builtin", "builtin", "synthetic:1", "--size", "64x60"], "got 64x60; nearest: 64x56 or 64x64"),
    (["encode-dataset", "builtin", "--videos", "v", "--out", "o", "--size", "63x65"], "nearest: 56x64 or 64x72"),
    (["encode-dataset", "builtin", "--videos", "v", "--out", "o", "--size", "64x64", "--frames", "8"],
     "--frames: must be 1+4k (1, 5, 9, 13, 17, ...), got 8; nearest: 5 or 9"),
    (["compat", "builtin", "builtin", "synthetic:x"], "synthetic:SEED with an integer SEED"),
    (["demo", "--frames", "0"], "--frames: must be 1+4k of at least 5 (1, 5, 9, 13, 17, ...), got 0; nearest: 5\n"),
    (["demo", "--size", "60", "64"], "--size: must be HxW in multiples of 8, got 60x64; nearest: 56x64 or 64x64"),
    (["demo", "--seed", "-1"], "--seed: must be an integer >= 0"),
])
def test_bad_numbers_are_refused_at_parsing(argv, allowed, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert allowed in capsys.readouterr().err


def test_reconstruct_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys):
    assert main(["reconstruct", "builtin", str(tmp_path / "missing.mp4"), str(tmp_path / "out.txt")]) == 2
    assert "must end in .mp4" in capsys.readouterr().err


def test_reconstruct_names_a_file_that_is_not_a_video(tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    assert main(["reconstruct", "builtin", str(text), str(tmp_path / "out.mp4")]) == 2
    err = capsys.readouterr().err
    assert "notes.mp4 is not a video file PyAV can read" in err and "Errno" not in err


# ---------------------------------------------------------------------------------------------
# 'builtin' everywhere; info describes the latent space the model really shares
# ---------------------------------------------------------------------------------------------
def test_info_builtin_names_the_builtin_image_vae_latent_space(capsys):
    from cvvae_core.io.image_vae_file import load_image_vae

    assert main(["info", "builtin", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "built-in image VAE" in info["latent_space"] and "SD latent space" not in json.dumps(info)
    image_cfg = load_image_vae("builtin").config   # the value the description is recognised by is the file's
    assert info["latent_scaling"]["scale"] == image_cfg.scaling_factor == 0.36133


def test_info_on_a_release_config_names_the_sd_latent_space(tiny_model, tmp_path, capsys):
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    assert main(["info", str(path), "--json"]) == 0
    expected = {"sd": "SD latent space", "sd3": "SD3 latent space"}[tiny_model.variant]
    assert json.loads(capsys.readouterr().out)["latent_space"].startswith(expected)


def test_inflate_builtin_inflates_the_builtin_image_vae(tmp_path, capsys):
    out = tmp_path / "inflated.safetensors"
    assert main(["inflate", "builtin", str(out)]) == 0
    assert "single frame vs the image VAE" in capsys.readouterr().out
    model = cvvae_core.load_model(out)
    assert model.scaling_factor == 0.36133   # the built-in image VAE's latent space, carried over


def test_inflate_given_a_cvvae_says_so(tmp_path, capsys):
    from cvvae_core.io.builtin import builtin_path

    assert main(["inflate", str(builtin_path()), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is a CV-VAE" in err and "'builtin' for the built-in image VAE" in err and "norm_groups" not in err


# ---------------------------------------------------------------------------------------------
# Errors name the argument that was wrong, in the command line's words
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def pickle_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, path)
    return path


@pytest.mark.parametrize("command", [["info"], ["reconstruct"]])
def test_a_pickle_checkpoint_is_pointed_at_allow_pickle(command, pickle_file, tmp_path, capsys):
    extra = [str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4")] if command == ["reconstruct"] else []
    assert main([*command, str(pickle_file), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument checkpoint: {pickle_file} is a pickle-based checkpoint")
    assert "pass --allow-pickle" in err and "allow_pickle=True" not in err


def test_encode_dataset_says_it_reads_safetensors_only(pickle_file, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", torch.zeros(5, 32, 32, 3, dtype=torch.uint8), fps=8)
    assert main(["encode-dataset", str(pickle_file), "--videos", str(videos), "--out", str(tmp_path / "out"),
                 "--size", "32x32", "--frames", "5"]) == 2
    err = capsys.readouterr().err
    assert "argument checkpoint:" in err and "reads .safetensors only" in err and "allow" not in err


def test_a_video_given_as_the_checkpoint_says_which_argument_is_which(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video, torch.zeros(5, 16, 16, 3, dtype=torch.uint8), fps=8)
    assert main(["reconstruct", str(video), "builtin", str(tmp_path / "out.mp4")]) == 2
    assert capsys.readouterr().err == (f"error: argument checkpoint: {video} is a video, not a checkpoint (a release "
                                       "folder, a .safetensors file or 'builtin'); the first argument is the "
                                       "checkpoint, the input video comes second\n")


def test_a_missing_input_video_names_the_input_argument(tmp_path, capsys):
    assert main(["reconstruct", "builtin", str(tmp_path / "missing.mp4"), str(tmp_path / "out.mp4")]) == 2
    assert capsys.readouterr().err.startswith("error: argument input: video file ")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"cvvae_core {cvvae_core.__version__}\n"


def test_every_sized_command_takes_size_hxw_and_states_the_rule(capsys):
    for command in (["reconstruct", "builtin", "in.mp4", "out.mp4"], ["encode-dataset", "builtin", "--videos", "v",
                    "--out", "o"], ["compat", "builtin", "builtin", "synthetic:1"], ["demo"]):
        args = build_parser().parse_args([*command, "--size", "64x96"])
        assert tuple(args.size) == (64, 96)
        args = build_parser().parse_args(legacy_size_pairs([*command, "--size", "64", "96"]))  # the older spelling
        assert tuple(args.size) == (64, 96)
        with pytest.raises(SystemExit):
            main([command[0], "--help"])
        flags = "--size, --height, --width or --frames" if command[0] == "reconstruct" else "--size or --frames"
        assert " ".join(size_rule(flags).split()) in " ".join(capsys.readouterr().out.split())


def test_compat_says_what_it_cropped_from_a_video(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video, (torch.rand(7, 36, 44, 3) * 255).to(torch.uint8), fps=8)
    assert main(["compat", "builtin", "builtin", str(video), "--frames", "9"]) == 0
    out = capsys.readouterr().out
    assert "cropped  2 trailing frames, 4 bottom rows, 4 right columns" in out and "clip: 5 frames 32x40" in out


@pytest.mark.parametrize("tiling,advice", [("seamless", "give a smaller --size, use --dtype fp16 or bf16"),
                                           ("official", "use --tiling seamless, or lower --tile-size / --chunk-frames"),
                                           ("none", "use --tiling seamless")])
def test_out_of_memory_is_answered_with_flags(tiling, advice, tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.mp4"
    write_video(source, torch.zeros(5, 16, 16, 3, dtype=torch.uint8), fps=8)

    def out_of_memory(self, *args, **kwargs):
        raise OutOfMemoryError("out of device memory: lower tile_size/chunk_frames, or use mode='seamless'")

    monkeypatch.setattr(cvvae_core.CVVAE, "encode_framed", out_of_memory)
    assert main(["reconstruct", "builtin", str(source), str(tmp_path / "out.mp4"), "--tiling", tiling]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of device memory") and f"--tiling {tiling}" in err
    assert advice in err and "tile_size" not in err and "mode=" not in err
