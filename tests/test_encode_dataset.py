"""encode-dataset: shards + index, bad videos, resume after a crash, refused resumes, 2 ranks (gloo)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cvvae_core
from cvvae_core.io.builtin import builtin_path
from cvvae_core.cli.main import main
from cvvae_core.data.encode import EncodeOptions, encode_dataset, window_starts
from cvvae_core.errors import DatasetRunMismatchError, InjectedFaultError
from cvvae_core.data.synthetic import SyntheticConfig, generate_clip
from cvvae_core.io.video import read_video, to_model_range, to_uint8, write_video
from conftest import randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# 13 frames at 32x32: with --frames 5 --windows all each video gives clips at frames 0 and 5.
CLIP = SyntheticConfig(frames=13, height=32, width=32)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i in range(5):
        write_video(folder / ("nested" if i == 2 else "") / f"clip{i}.mp4", to_uint8(generate_clip(i, CLIP)[None]), fps=8)
    return folder


@pytest.fixture(scope="module")
def videos_with_bad_files(videos, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    for p in videos.rglob("*.mp4"):
        (folder / p.name).write_bytes(p.read_bytes())
    good = (videos / "clip0.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (folder / "notes.mp4").write_text("not a video\n")
    return folder


def options(videos, out, **kw) -> EncodeOptions:
    base = dict(model="builtin", videos=str(videos), out=str(out), frames=5, height=32, width=32, windows="all",
                batch_size=3, shard_mb=0.002, num_workers=0)  # ~4 clips per shard: several shards
    base.update(kw)
    return EncodeOptions(**base)


def index(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "index.jsonl").read_text().splitlines()]


def clip_content(out) -> dict:
    """clip id -> (latent, index line without where it happens to be stored)."""
    data = cvvae_core.LatentDataset(out)
    return {meta["clip"]: (latent, {k: v for k, v in meta.items() if k not in ("shard", "key")})
            for latent, meta in (data[i] for i in range(len(data)))}


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    summary = encode_dataset(options(videos, out, num_workers=2))
    assert summary.encoded == 10 and summary.failed_videos == 0
    return out


def test_shards_and_index_read_back_as_the_model_encodes(reference, videos):
    records = index(reference)
    assert [r["clip"] for r in records] == sorted(r["clip"] for r in records)
    assert len({r["clip"] for r in records}) == 10 and len({r["shard"] for r in records}) > 1
    model = cvvae_core.load_model(builtin_path(), dtype=torch.float32)
    data = cvvae_core.LatentDataset(reference)
    assert len(data) == 10
    for latent, meta in data:
        frames, fps = read_video(videos / meta["source"])
        expected = model.encode(to_model_range(frames[meta["frame_start"]:meta["frame_end"]]))[0]
        assert latent.shape == expected.shape == tuple(meta["latent_shape"])
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=1e-5)
        assert meta["fps"] == fps and meta["size"] == [32, 32] and meta["frames"] == 5
        assert meta["scaling_factor"] == model.scaling_factor and meta["shift_factor"] == model.shift_factor
        assert len(meta["model_sha256"]) == 64
    assert (reference / "errors.jsonl").read_text() == ""


def test_bad_videos_are_reported_and_skipped(videos_with_bad_files, tmp_path, capsys):
    args = ["encode-dataset", "builtin", "--videos", str(videos_with_bad_files), "--frames", "5", "--size", "32x32",
            "--num-workers", "0"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    errors = {json.loads(line)["source"]: json.loads(line) for line in (tmp_path / "a" / "errors.jsonl").open()}
    assert set(errors) == {"truncated.mp4", "notes.mp4"}
    assert "truncated or corrupt" in errors["truncated.mp4"]["reason"]
    assert "not a video file" in errors["notes.mp4"]["reason"]
    assert len(index(tmp_path / "a")) == 5
    assert "2 videos that could not be used" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b"), "--strict"]) == 1
    assert main(args + ["--out", str(tmp_path / "b"), "--strict"]) == 1  # a resume still knows them


def test_too_short_video_is_reported(videos, tmp_path):
    summary = encode_dataset(options(videos, tmp_path, frames=17))
    assert summary.failed_videos == 5 and summary.encoded == 0
    assert all("too short" in json.loads(line)["reason"] for line in (tmp_path / "errors.jsonl").open())


def test_resume_after_a_crash_gives_the_uninterrupted_set(reference, videos, tmp_path):
    with pytest.raises(InjectedFaultError):
        encode_dataset(options(videos, tmp_path, fault_after_clips=6))
    partial = [json.loads(line) for line in (tmp_path / "index.rank0.jsonl").open()]
    assert 0 < len(partial) < 10  # some clips durable, the others lost with the crash
    with open(tmp_path / "index.rank0.jsonl", "a") as f:
        f.write('{"clip": "torn')  # a write cut short by the crash
    summary = encode_dataset(options(videos, tmp_path))
    assert summary.already_done == len(partial) and summary.encoded == 10 - len(partial)
    clips = [r["clip"] for r in index(tmp_path)]
    assert len(clips) == len(set(clips)) == 10
    got, want = clip_content(tmp_path), clip_content(reference)
    assert got.keys() == want.keys()
    for clip, (latent, meta) in want.items():
        assert got[clip][1] == meta
        torch.testing.assert_close(got[clip][0], latent, atol=1e-5, rtol=1e-5)
    referenced = {r["shard"] for r in index(tmp_path)}
    assert {p.name for p in tmp_path.glob("shard-*")} == referenced  # no orphan shard left behind
    assert encode_dataset(options(videos, tmp_path)).encoded == 0  # a third run has nothing left to do


def test_resume_with_other_settings_is_refused(reference, videos, tmp_path):
    with pytest.raises(DatasetRunMismatchError, match="height: 32 there, 64 now"):
        encode_dataset(options(videos, reference, height=64))
    torch.manual_seed(0)
    other = cvvae_core.save_model(randomize_(cvvae_core.CVVAE(tiny_config())), tmp_path / "other.safetensors")
    with pytest.raises(DatasetRunMismatchError, match="model_sha256"):
        encode_dataset(options(videos, reference, model=str(other)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank(reference, videos, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cvvae_core", "encode-dataset", "builtin", "--videos", str(videos), "--out", str(out),
           "--frames", "5", "--size", "32x32", "--windows", "all", "--batch-size", "3", "--shard-mb", "0.002",
           "--num-workers", "1"]
    ranks = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting at a barrier must not outlive the test
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], logs
    assert {p.name for p in out.glob("index.rank*.jsonl")} == {"index.rank0.jsonl", "index.rank1.jsonl"}
    assert any(p.name.startswith("shard-r001-") for p in out.iterdir())
    got, want = clip_content(out), clip_content(reference)
    assert got.keys() == want.keys()
    for clip, (latent, meta) in want.items():
        assert got[clip][1] == meta
        torch.testing.assert_close(got[clip][0], latent, atol=1e-5, rtol=1e-5)


def test_latent_dataset_under_a_distributed_sampler(reference):
    data = cvvae_core.LatentDataset(reference)
    parts = [list(torch.utils.data.DistributedSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(len(data)))
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2,
                                         collate_fn=lambda items: torch.stack([latent for latent, _ in items]))
    assert sum(len(batch) for batch in loader) == len(data)


def test_sample_and_mean_logvar_outputs(reference, videos, tmp_path):
    mean = {clip: latent for clip, (latent, _) in clip_content(reference).items()}
    encode_dataset(options(videos, tmp_path / "mv", output="mean+logvar"))
    for clip, (latent, meta) in clip_content(tmp_path / "mv").items():
        assert meta["latent_shape"][0] == 2 * mean[clip].shape[0] and meta["output"] == "mean+logvar"
        torch.testing.assert_close(latent[: mean[clip].shape[0]], mean[clip], atol=1e-5, rtol=1e-5)
    # Samples are seeded per clip: two runs (or a resumed one) draw the same noise.
    first, second = ([latent for latent, _ in clip_content(o).values()] for o in
                     (encode_dataset(options(videos, tmp_path / s, output="sample")) and tmp_path / s
                      for s in ("s1", "s2")))
    for a, b, m in zip(first, second, mean.values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, m, atol=1e-3)


@pytest.mark.parametrize("available, windows, starts", [(13, "first", [0]), (13, "all", [0, 5]), (4, "all", []),
                                                        (13, "3", [0, 4, 8]), (5, "4", [0]), (13, "1", [0])])
def test_window_starts(available, windows, starts):
    assert window_starts(available, 5, windows) == starts


def test_frame_stride_takes_every_nth_frame(videos, tmp_path):
    encode_dataset(options(videos, tmp_path, frame_stride=2, windows="first"))
    model = cvvae_core.load_model(builtin_path(), dtype=torch.float32)
    for latent, meta in cvvae_core.LatentDataset(tmp_path):
        frames, fps = read_video(videos / meta["source"])
        assert (meta["frame_start"], meta["frame_end"], meta["fps"]) == (0, 9, fps / 2)
        expected = model.encode(to_model_range(frames[0:9:2]))[0]
        torch.testing.assert_close(latent, expected, atol=1e-5, rtol=1e-5)


def test_merge_rebuilds_the_index(reference, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    (copy / "index.jsonl").unlink()
    assert main(["merge", str(copy)]) == 0
    assert "merged   10 clips" in capsys.readouterr().out
    assert (copy / "index.jsonl").read_text() == (reference / "index.jsonl").read_text()


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_run(videos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["encode-dataset", "builtin", "--frames", "5", "--size", "32x32", "--num-workers", "0", "--out", str(out)]
    assert main(args + ["--videos", str(tmp_path / "nonexistent")]) == 2
    assert not out.exists()                                 # inputs are checked before anything is written
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": "other.safetensors", "frames": 9}))  # no index, no shards
    assert main(args + ["--videos", str(videos)]) == 0      # settings nobody depends on do not count
    assert json.loads((out / "run.json").read_text())["frames"] == 5
    last = capsys.readouterr().err.splitlines()[-1]           # the progress line ends with the real counts
    assert re.search(r" 5/5 .* videos, 5 clips, [0-9.]+ clips/s$", last), last


def test_a_run_that_encodes_nothing_exits_1_and_says_why(videos, tmp_path, capsys):
    args = ["encode-dataset", "builtin", "--videos", str(videos), "--frames", "17", "--size", "32x32",
            "--num-workers", "0", "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "no clip was encoded from the 5 videos given" in capsys.readouterr().err
    assert main(args) == 1                                  # a resume knows the failures


def test_a_training_manifest_with_time_ranges_encodes(videos, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"path": str(videos / "clip0.mp4"), "start_frame": 4}) + "\n"
        + json.dumps({"path": str(videos / "clip1.mp4")}) + "\n"
        + json.dumps({"path": "missing.mp4"}) + "\n")
    summary = encode_dataset(options(tmp_path / "train.jsonl", tmp_path / "out"))
    assert summary.encoded == 3 and summary.failed_videos == 1    # 13 frames from frame 4 hold one window
    clips = {r["clip"]: r for r in index(tmp_path / "out")}
    ranged = next(r for c, r in clips.items() if c.startswith(f"{videos / 'clip0.mp4'}["))
    assert ranged["frame_start"] == 4 and ranged["frame_end"] == 9
    frames, _ = read_video(videos / "clip0.mp4", height=32, width=32)
    latent = cvvae_core.LatentDataset(tmp_path / "out")[list(sorted(clips)).index(ranged["clip"])][0]
    model = cvvae_core.load_model("builtin", dtype=torch.float32)
    torch.testing.assert_close(latent, model.encode(to_model_range(frames[4:9]))[0], atol=1e-4, rtol=1e-4)


def test_a_missing_truncated_or_replaced_shard_is_named_and_repaired_by_a_rerun(reference, videos, tmp_path):
    out = tmp_path / "out"
    encode_dataset(options(videos, out, shard_mb=0.0005))                    # 2 clips per shard
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    before = index(out)
    (out / shards[0]).unlink()                                               # missing
    (out / shards[1]).write_bytes((out / shards[1]).read_bytes()[:100])      # truncated
    (out / shards[2]).write_bytes((out / shards[3]).read_bytes())            # replaced by another shard
    data = cvvae_core.LatentDataset(out)
    for name, what in ((shards[0], "is missing"), (shards[1], "is truncated"), (shards[2], "was replaced")):
        i = next(i for i, r in enumerate(data.records) if r["shard"] == name)
        with pytest.raises(cvvae_core.LatentShardError, match=f"{name} .*{what}.*run the same .*encode-dataset"):
            data[i]
    summary = encode_dataset(options(videos, out, shard_mb=0.0005))
    assert summary.encoded == sum(r["shard"] in shards[:3] for r in before) == 6
    repaired, expected = clip_content(out), clip_content(reference)
    assert repaired.keys() == expected.keys()
    for clip, (latent, meta) in expected.items():
        torch.testing.assert_close(repaired[clip][0], latent, atol=1e-5, rtol=1e-5)
        assert repaired[clip][1] == meta


def test_clip_shape_comes_from_the_model_and_is_checked_before_writing(videos, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(cvvae_core.InputError, match="frames must be 1\\+4k"):
        encode_dataset(options(videos, out, frames=8))
    with pytest.raises(cvvae_core.InputError, match="height and width must be multiples of 8"):
        encode_dataset(options(videos, out, height=30))
    assert not out.exists()
