"""Ctrl-C (SIGINT) and SIGTERM on the commands, at any moment: one line on what was kept and how to
go on, exit status 130, no traceback; and running the same command again finishes the work."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cvvae_core.cli import model as cli_model
from cvvae_core.cli import train as cli_train
from cvvae_core.cli.main import INTERRUPTED, main
from cvvae_core.data.encode import EncodeOptions, encode_dataset
from cvvae_core.data.synthetic import SyntheticConfig, generate_clip
from cvvae_core.io.video import to_uint8, write_video

ROOT = Path(__file__).resolve().parents[1]
KEPT_BEFORE_CTRL_C = 3  # clips made durable before the interrupt arrives

# Pauses encode-dataset for Ctrl-C once KEPT_BEFORE_CTRL_C clips are durable: the interrupt then
# lands mid-run at a known point, on any machine however fast or loaded.
PAUSE_AFTER_DURABLE_CLIPS = """
import time
from pathlib import Path
import cvvae_core.data.encode as encode
ready, kept, append = Path("ready"), [], encode.append_lines
def append_then_pause(path, records):
    append(path, records)
    if path.name.startswith("index."):
        kept.extend(records)
        if len(kept) >= {kept}:
            ready.touch()
            time.sleep(120)
encode.append_lines = append_then_pause
""".format(kept=KEPT_BEFORE_CTRL_C)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i in range(6):
        write_video(folder / f"clip{i}.mp4", to_uint8(generate_clip(i, SyntheticConfig(frames=9, height=32,
                                                                                        width=32))[None]), fps=8)
    return folder


def encode_args(videos: Path, out: Path) -> list[str]:
    # One clip per shard and model call, so clips become durable one by one.
    return ["encode-dataset", "builtin", "--videos", str(videos), "--out", str(out), "--frames", "5",
            "--size", "32x32", "--batch-size", "1", "--shard-mb", "0.0001", "--num-workers", "1"]


def clip_ids(out: Path) -> list[str]:
    return [json.loads(line)["clip"] for line in (out / "index.jsonl").read_text().splitlines()]


def start(argv: list[str], tmp_path: Path, prelude: str = "") -> subprocess.Popen:
    """The command in a process group of its own (a terminal's Ctrl-C reaches the whole group),
    with SIGINT handled as in a terminal even when pytest runs in the background."""
    code = prelude + "\nimport sys\nfrom cvvae_core.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop(child: subprocess.Popen, signum: int, ready: Path | None = None) -> str:
    """Send ``signum`` once ``ready`` exists (at once without one); the child's stderr."""
    try:
        deadline = time.monotonic() + 120
        while ready is not None and not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready is None or ready.exists(), child.communicate(timeout=10)
        os.killpg(child.pid, signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == INTERRUPTED, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    return stderr


def test_ctrl_c_on_encode_dataset_keeps_the_encoded_clips_and_the_rerun_finishes(videos, tmp_path):
    out = tmp_path / "out"
    stderr = stop(start(encode_args(videos, out), tmp_path, PAUSE_AFTER_DURABLE_CLIPS), signal.SIGINT,
                  tmp_path / "ready")
    last = stderr.strip().splitlines()[-1]
    assert last == (f"interrupted: {KEPT_BEFORE_CTRL_C} encoded clips are kept in {out} (its shards and index); "
                    "run the same command again to encode the rest"), stderr

    assert main(encode_args(videos, out)) == 0
    reference = tmp_path / "uninterrupted"
    encode_dataset(EncodeOptions(model="builtin", videos=str(videos), out=str(reference), frames=5, height=32,
                                 width=32, num_workers=0))
    assert clip_ids(out) == clip_ids(reference) and len(clip_ids(out)) == 6


def test_ctrl_c_on_reconstruct_keeps_no_half_written_output(tmp_path, monkeypatch, capsys):
    source = tmp_path / "in.mp4"
    write_video(source, to_uint8(generate_clip(0, SyntheticConfig(frames=5, height=32, width=32))[None]), fps=8)
    out = tmp_path / "out.mp4"

    def write_then_ctrl_c(path, frames, fps):
        Path(path).write_bytes(b"half a video")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_model, "write_video", write_then_ctrl_c)
    assert main(["reconstruct", "builtin", str(source), str(out)]) == INTERRUPTED
    assert not out.exists()
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress lines
    assert last == f"interrupted: nothing was kept ({out} is written only at the end); run the same command again to " \
                   "start over"


@pytest.mark.parametrize("restart", [False, True])
def test_ctrl_c_on_train_names_the_step_it_resumes_from(tmp_path, monkeypatch, capsys, restart):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "image_vae", "steps": 10}))
    out = tmp_path / "run"

    def train_then_ctrl_c(cfg, device=None, resume=True):
        Path(cfg.out_dir).mkdir()
        torch.save({"step": 4, "model": {"w": torch.zeros(3)}}, Path(cfg.out_dir) / "training_state.pt")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "train", train_then_ctrl_c)
    assert main(["train", str(config), "--out", str(out), *(["--restart"] if restart else [])]) == INTERRUPTED
    again = "the same command without --restart" if restart else "the same command again"
    assert capsys.readouterr().err == (f"interrupted: kept {out / 'training_state.pt'} at step 4, the last finished "
                                       f"step; run {again} to resume from there\n")


def test_ctrl_c_before_the_first_training_state_says_nothing_was_kept(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "image_vae", "steps": 10}))

    def ctrl_c(cfg, device=None, resume=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "train", ctrl_c)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith("interrupted: nothing was kept") and "run the same command again" in err


def handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGTERM: the command's first act, before it imports torch."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc (Linux)")
@pytest.mark.parametrize("after", [0.0, 0.3, 1.0])
def test_a_signal_while_the_command_starts_ends_it_in_one_line(tmp_path, after):
    """During imports (torch takes a second or more), parsing and loading: nothing is written. The
    moments count from when the command's handlers are in place (before that, only the
    interpreter's own start-up, some milliseconds, can be interrupted)."""
    child = subprocess.Popen([sys.executable, "-m", "cvvae_core", "demo", "--out", "demo"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while child.poll() is None and not handles_sigterm(child.pid) and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(after)
    stderr = stop(child, signal.SIGINT)
    assert stderr.strip().splitlines()[-1].startswith("interrupted: "), stderr
    assert not (tmp_path / "demo" / "metrics.json").exists()


# Pauses the run for the signal once three clips are encoded (into a shard that is still open).
PAUSE_AFTER_THREE_CLIPS = """
import sys, time
from pathlib import Path
import cvvae_core.data.encode as encode
ready, add = Path("ready"), encode._ShardWriter.add
def add_then_pause(self, record, latent):
    made = add(self, record, latent)
    if len(self.records) >= 3:
        ready.touch()
        time.sleep(120)
    return made
encode._ShardWriter.add = add_then_pause
"""


def test_sigterm_on_encode_dataset_closes_the_open_shard(videos, tmp_path):
    out = tmp_path / "out"
    argv = [a for a in encode_args(videos, out) if a not in ("--shard-mb", "0.0001")]  # one shard for all clips
    stderr = stop(start(argv, tmp_path, PAUSE_AFTER_THREE_CLIPS), signal.SIGTERM, tmp_path / "ready")
    assert stderr.strip().splitlines()[-1] == (f"interrupted: 3 encoded clips are kept in {out} (its shards and "
                                               "index); run the same command again to encode the rest"), stderr
    assert len(clip_ids(out)) == 3 and len(list(out.glob("shard-*.safetensors"))) == 1
    assert main(argv) == 0
    assert len(clip_ids(out)) == 6 and len(set(clip_ids(out))) == 6


# Pauses training for the signal after its third step (no state saved before: save_every is larger).
PAUSE_AFTER_THREE_STEPS = """
import time
from pathlib import Path
from cvvae_core.train.trainer import Trainer
step = Trainer.step
def step_then_pause(self, batches):
    logs = step(self, batches)
    if self.step_count == 3:
        Path("ready").touch()
        time.sleep(120)
    return logs
Trainer.step = step_then_pause
"""


@pytest.mark.parametrize("signum, video_workers", [(signal.SIGINT, 0), (signal.SIGTERM, 0), (signal.SIGTERM, 2)])
def test_a_signal_on_train_keeps_the_last_finished_step_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, signum,
                                                                              video_workers, request):
    # With video data, DataLoader workers in the signalled process group get the signal too.
    data = ({"videos": str(request.getfixturevalue("videos")), "workers": video_workers} if video_workers
            else {"synthetic": True})
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": "image_vae", "steps": 5, "save_every": 100, "log_every": 1, "frames": 1,
                                  "height": 16, "width": 16, "tensorboard": False, "loss": {"perceptual": "none"},
                                  "data": data,
                                  "image_vae_config": {"base_channels": 8, "channel_mult": [1, 2],
                                                       "blocks_per_level": 1, "norm_groups": 4}}))
    argv = ["train", str(config), "--out", "run", "--device", "cpu"]
    stderr = stop(start(argv, tmp_path, PAUSE_AFTER_THREE_STEPS), signum, tmp_path / "ready")
    state = tmp_path / "run" / "training_state.pt"
    assert stderr.strip().splitlines()[-1] == (f"interrupted: kept {Path('run') / 'training_state.pt'} at step 3, the "
                                               "last finished step; run the same command again to resume from there")
    assert torch.load(state, weights_only=True)["step"] == 3
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert f"resumed from {Path('run') / 'training_state.pt'} at step 3" in capsys.readouterr().err
    assert torch.load(state, weights_only=True)["step"] == 5
