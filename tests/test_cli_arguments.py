"""File and argument checks of the command line: one line naming the argument, exit status 2,
no usage block; training configs by shipped name from any folder."""
import json

import pytest
from cvvae_core.cli.main import main
from cvvae_core.model.cvvae import CVVAE
from cvvae_core.errors import MemoryBudgetError
from cvvae_core.train.config import TrainConfig, config_path, shipped_configs


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "usage:" not in err and "Traceback" not in err, err
    return err.strip()


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_argument_errors_are_one_line_and_name_what_is_missing(capsys):
    assert exit_code(["reconstruct", "clip.mp4", "out.mp4"]) == 2
    assert one_line(capsys) == ("cvvae reconstruct: error: missing the checkpoint: clip.mp4 is a video, and the "
                                "checkpoint (a release folder, a .safetensors file or 'builtin') comes first: "
                                "cvvae reconstruct CHECKPOINT INPUT OUTPUT")
    assert exit_code(["reconstruct", "builtin", "clip.mp4"]) == 2
    assert one_line(capsys) == ("cvvae reconstruct: error: missing the output argument: cvvae reconstruct CHECKPOINT "
                                "INPUT OUTPUT")
    assert exit_code(["encode-dataset", "builtin", "--size", "64x64"]) == 2
    assert "missing --videos and --out" in one_line(capsys)
    assert exit_code(["reconstruct", "builtin", "a.mp4", "b.mp4", "--size", "7x7"]) == 2
    assert one_line(capsys).endswith("argument --size: must be HxW in multiples of 8, got 7x7; nearest: 8x8")
    assert exit_code([]) == 2
    assert one_line(capsys).startswith("cvvae: error: missing the command: one of info, reconstruct")


@pytest.mark.parametrize("content", [b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80", b"\xff\xd8\xff\xe0JFIF"])
def test_a_video_or_binary_file_as_training_config_is_refused_in_one_line(tmp_path, capsys, content):
    name = "clip.mp4" if b"ftyp" in content else "photo.jpg"
    (tmp_path / name).write_bytes(content)
    assert main(["train", str(tmp_path / name)]) == 2
    what = "a video" if name.endswith(".mp4") else "not a text file"
    assert one_line(capsys).startswith(f"error: argument config: {tmp_path / name} is {what}, not a training config")


def test_shipped_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "builtin_cvvae" in shipped_configs()
    shipped = config_path("builtin_cvvae")
    for name in ("builtin_cvvae.json", "cvvae_core/train_configs/builtin_cvvae.json"):
        assert config_path(name) == shipped
    assert TrainConfig.from_json("builtin_cvvae").image_vae == "builtin"
    (tmp_path / "builtin_cvvae.json").write_text(json.dumps({"model": "image_vae", "steps": 3}))
    assert TrainConfig.from_json("builtin_cvvae.json").steps == 3  # a file of that name here comes first


def test_train_takes_the_config_once_as_argument_or_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert "give the training config once" in one_line(capsys)
    assert main(["train", "nope"]) == 2
    assert one_line(capsys).startswith("error: argument config: nope does not exist; give a training config .json "
                                       "file, or a shipped config: builtin_cvvae")


def test_train_refuses_a_file_as_out_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.mp4").write_bytes(b"notes")
    assert main(["train", "--config", "builtin_cvvae", "--out", "notes.mp4"]) == 2
    assert one_line(capsys) == ("error: argument --out: notes.mp4 is a file; give a folder (new, or a run's to "
                                "resume it)")


def test_merge_writes_nothing_into_a_folder_encode_dataset_did_not_make(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    assert main(["merge", str(tmp_path / "photos")]) == 2
    assert "is not an encode-dataset output folder" in one_line(capsys)
    assert list((tmp_path / "photos").iterdir()) == []


def test_disk_dir_must_be_an_existing_folder(tmp_path, capsys):
    assert exit_code(["reconstruct", "builtin", "a.mp4", "b.mp4", "--disk-dir", str(tmp_path / "nope")]) == 2
    assert one_line(capsys).endswith(f"argument --disk-dir: {tmp_path / 'nope'} does not exist; give an existing "
                                     "folder")


def test_a_plan_that_fits_no_budget_exits_2_naming_the_flags(tmp_path, capsys, monkeypatch):
    from cvvae_core.data.synthetic import SyntheticConfig, generate_clip
    from cvvae_core.io.video import to_uint8, write_video
    write_video(tmp_path / "in.mp4", to_uint8(generate_clip(0, SyntheticConfig(frames=5, height=32, width=32))[None]))
    seen = {}

    def refuse(self, video, frame_policy=None, tiling=None):
        seen["disk_dir"] = tiling.disk_dir
        raise MemoryBudgetError("no exact encode plan for [1, 3, 5, 32, 32] fits the memory budgets: the smallest "
                                "found needs 1.0 GiB of host memory (budget 0.5 GiB). Use fewer frames or a smaller "
                                "size, a larger memory budget, a disk folder for layer outputs "
                                "(TilingOptions.disk_dir), or mode='official' (its own tiles: seams).")

    monkeypatch.setattr(CVVAE, "encode_framed", refuse)
    assert main(["reconstruct", "builtin", str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4"),
                 "--disk-dir", str(tmp_path)]) == 2
    line = one_line(capsys)
    assert line.startswith("error: no exact encode plan") and "TilingOptions" not in line
    assert line.endswith("Use --disk-dir DIR (a folder for layer outputs), --tiling official (the release's tiles: "
                         "seams), or a smaller --size / --frames")
    assert seen["disk_dir"] == str(tmp_path) and not (tmp_path / "out.mp4").exists()


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_says_what_videos_takes_and_where_demo_writes(capsys):
    encode = help_text("encode-dataset", capsys)
    assert ".txt (one path per line), .csv or .jsonl" in encode and "optional start/end times" in encode
    assert "--height" not in encode and "--width" not in encode  # flags it does not have
    assert "(default: out/demo)" in help_text("demo", capsys)
    assert "--height, --width" in help_text("reconstruct", capsys)
