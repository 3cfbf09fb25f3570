"""Reading video files: every way PyAV can fail gives a typed error that names the file and what to
do, never FFmpeg's raw error code."""
import av
import numpy as np
import pytest
import torch

from cvvae_core.errors import VideoFileError, VideoNotFoundError
from cvvae_core.io.video import read_video, write_video


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, (torch.rand(9, 32, 48, 3) * 255).to(torch.uint8), fps=8)
    return path


def _read_error(path) -> str:
    with pytest.raises(VideoFileError) as err:
        read_video(path)
    message = str(err.value)
    assert str(path) in message and "Errno" not in message
    return message


def test_a_good_clip_reads(clip):
    frames, fps = read_video(clip)
    assert frames.shape == (9, 32, 48, 3) and fps == 8


def test_a_text_file_named_mp4_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are notes, not a video\n")
    assert "is not a video file PyAV can read" in _read_error(path)


def test_a_truncated_mp4_is_called_truncated(clip, tmp_path):
    # PyAV writes the index (moov) at the end: a cut-off download cannot even be opened.
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    assert "probably truncated or corrupt" in _read_error(cut)


def test_a_truncated_faststart_mp4_fails_while_decoding(tmp_path):
    # With the index in front the file opens, and decoding hits the cut.
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in (np.random.default_rng(0).random((9, 32, 48, 3)) * 255).astype(np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    assert "is truncated or corrupt: decoding failed after" in _read_error(cut)


def test_missing_empty_folder_and_audio_only(tmp_path):
    with pytest.raises(VideoNotFoundError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "is empty (0 bytes)" in _read_error(empty)
    assert "is a folder" in _read_error(tmp_path)
    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    assert "has no video stream (it holds audio streams)" in _read_error(audio)


def test_write_video_refuses_a_suffix_it_cannot_write(tmp_path):
    with pytest.raises(VideoFileError, match="must end in .mp4"):
        write_video(tmp_path / "out.gif", torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
