"""Output paths: no command replaces one of its inputs, or an existing file without --overwrite,
and each refusal comes before any work, in one line naming the argument."""
from fractions import Fraction
from pathlib import Path

import av
import pytest

from cvvae_core.cli import model as cli_model
from cvvae_core.cli import tools as cli_tools
from cvvae_core.cli.main import main
from cvvae_core.data.synthetic import SyntheticConfig, generate_clip
from cvvae_core.io.video import read_video, to_uint8, write_video


@pytest.fixture
def clip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "clip.mp4"
    write_video(path, to_uint8(generate_clip(0, SyntheticConfig(frames=5, height=32, width=32))[None]), fps=8)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model fails the test: a refusal must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("work started before the output paths were checked")
    monkeypatch.setattr(cli_model, "load_model", fail)
    monkeypatch.setattr(cli_tools, "load_model", fail)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("output", ["clip.mp4", "./clip.mp4", "link.mp4"])
def test_reconstruct_never_writes_over_its_input(clip, capsys, no_work, output):
    (clip.parent / "link.mp4").symlink_to(clip)
    before = clip.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["reconstruct", "builtin", "clip.mp4", output, *extra]) == 2
        assert error_line(capsys) == (f"error: argument output: {Path(output)} is the input argument; writing it would "
                                      "replace that input, so give another output path")
    assert clip.read_bytes() == before


def test_reconstruct_refuses_an_existing_output_or_strip_before_work(clip, capsys, no_work):
    (clip.parent / "old.mp4").write_bytes(b"keep me")
    assert main(["reconstruct", "builtin", "clip.mp4", "old.mp4"]) == 2
    assert error_line(capsys) == ("error: argument output: old.mp4 exists; give another path, or pass --overwrite "
                                  "to replace it")
    assert main(["reconstruct", "builtin", "clip.mp4", "new.mp4", "--strip", "clip.mp4"]) == 2
    assert "argument --strip: clip.mp4 must end in .png" in error_line(capsys)
    assert main(["reconstruct", "builtin", "clip.mp4", "new.mp4", "--strip", "s.jpg"]) == 2
    assert error_line(capsys) == "error: argument --strip: s.jpg must end in .png (the strip is written as PNG)"
    (clip.parent / "new.png").write_bytes(b"keep me too")
    assert main(["reconstruct", "builtin", "clip.mp4", "new.mp4"]) == 2
    assert "argument --strip: new.png exists" in error_line(capsys)
    assert (clip.parent / "old.mp4").read_bytes() == b"keep me" and not (clip.parent / "new.mp4").exists()


def test_reconstruct_with_overwrite_replaces_the_output(clip, capsys):
    (clip.parent / "old.mp4").write_bytes(b"old")
    assert main(["reconstruct", "builtin", "clip.mp4", "old.mp4", "--overwrite", "--strip", "strip.png"]) == 0
    frames, _ = read_video(clip.parent / "old.mp4")
    assert frames.shape == (5, 32, 32, 3)
    assert (clip.parent / "strip.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_a_file_or_an_earlier_demo_as_out_before_work(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.mp4").write_bytes(b"notes")
    assert main(["demo", "--out", "notes.mp4"]) == 2
    assert error_line(capsys) == "error: argument --out: notes.mp4 is a file; give a folder (it is created if missing)"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text("{}")
    assert main(["demo", "--out", "d"]) == 2
    assert error_line(capsys).startswith("error: argument --out: d already holds metrics.json; give another folder, "
                                         "or pass --overwrite")


def test_inflate_checks_the_output_suffix_and_refuses_to_replace(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["inflate", "builtin", "out.txt"]) == 2
    assert error_line(capsys) == ("error: argument out: out.txt must end in .safetensors, or be a folder name "
                                  "without suffix (the release layout)")
    assert not (tmp_path / "out.txt").exists()
    (tmp_path / "model.safetensors").write_bytes(b"keep")
    assert main(["inflate", "builtin", "model.safetensors"]) == 2
    assert "argument out: model.safetensors exists" in error_line(capsys)
    assert (tmp_path / "model.safetensors").read_bytes() == b"keep"


def test_plot_writes_png_only_and_keeps_an_existing_out(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.jpg")]) == 2
    assert "must end in .png" in error_line(capsys)
    (tmp_path / "mine.png").write_bytes(b"mine")
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "mine.png")]) == 2
    assert "exists; give another path, or pass --overwrite" in error_line(capsys)


def test_a_29_97_fps_video_is_written_at_its_exact_rate(tmp_path):
    path = tmp_path / "ntsc.mp4"
    write_video(path, to_uint8(generate_clip(0, SyntheticConfig(frames=5, height=32, width=32))[None]),
                fps=30000 / 1001)
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == Fraction(30000, 1001)
    _, fps = read_video(path)
    assert f"{fps:.2f}" == "29.97"
