"""One clip's seamless pieces across 2 ranks (gloo, CPU): equal to one process; idle ranks; failures."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

import cvvae_core
from cvvae_core.tiling import executor, runner as tiling
from cvvae_core.cli.main import main
from cvvae_core.data.synthetic import SyntheticConfig, generate_clip
from cvvae_core.io.video import read_video, to_uint8, write_video
from conftest import randomize_, tiny_config, video

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_tiling_worker.py")

# Odd tiles and chunks that divide nothing: 32x40 frames in 24 px tiles, 9 frames in 3-frame chunks,
# once with a device budget that sends part of the layer outputs to host memory; and one piece per
# layer (fewer pieces than ranks: rank 1 has nothing to do but the collectives).
CASES = [dict(what=w, tile=24, chunk=3) for w in ("decode", "encode")] + [
    dict(what="decode", tile=24, chunk=3, budget=4_700_000)]
WHOLE = dict(what="decode", tile=1024, chunk=1024)


def small_model():
    return randomize_(cvvae_core.CVVAE(tiny_config("sd", base_channels=8, norm_groups=4))).eval()


def case_input(case) -> torch.Tensor:
    if case["what"] == "encode":
        return video(1, 9, 32, 40, seed=1)
    return torch.randn(1, 4, 3, 4, 5, generator=torch.Generator().manual_seed(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out: Path, cases: list, timeout: float, cmd=None, **env_extra) -> tuple[list[int], list[str]]:
    """Two ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), of the worker or ``cmd``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
    cmd = cmd or [sys.executable, str(WORKER), str(out), json.dumps(cases)]
    ranks = [subprocess.Popen(cmd,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in ranks]
    finally:
        for p in ranks:  # a rank left waiting in a collective must not outlive the test
            p.kill()
    return [p.returncode for p in ranks], logs


def _convolution_pieces(monkeypatch) -> list:
    count = [0]
    real = executor.ConvStep.run

    def run(step, read, box):
        count[0] += 1
        return real(step, read, box)
    monkeypatch.setattr(executor.ConvStep, "run", run)
    return count


def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    out = tmp_path / "results.pt"
    codes, logs = run_ranks(out, CASES + [WHOLE], timeout=120)
    assert codes == [0, 0], logs
    got = torch.load(out)
    counts = [json.loads(log.split("pieces ", 1)[1].splitlines()[0]) for log in logs]
    model = small_model()
    one_process = _convolution_pieces(monkeypatch)
    for case in CASES + [WHOLE]:
        one_process[0] = 0
        opts = tiling.TilingOptions(tile_size=case["tile"], chunk_frames=case["chunk"],
                                    memory_budget=case.get("budget"))
        run = tiling.decode_latent if case["what"] == "decode" else tiling.encode_moments
        if "budget" in case:  # the case it is there for: both tiers in use
            plan = tiling.plan_for(model, tiling.DECODE, case_input(case).shape, opts)
            assert 0 < len(plan.host) < len(executor.Program(model.decoder.layers(), case_input(case).shape).steps) - 1
        want = run(model, case_input(case), opts)
        torch.testing.assert_close(got[json.dumps(case)], want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{case}: {m}")
        ran = [c.get(json.dumps(case), 0) for c in counts]
        if case is WHOLE:
            assert ran == [one_process[0], 0]  # one piece per layer: all on rank 0, rank 1 idle
        else:
            # every piece ran exactly once, on one of the ranks, and both ranks had work
            assert sum(ran) == one_process[0] and min(ran) > 0.4 * one_process[0], (case, ran, one_process[0])


def test_a_failing_rank_stops_every_rank_with_a_typed_error(tmp_path):
    start = time.monotonic()
    codes, logs = run_ranks(tmp_path / "none.pt", CASES[:1], timeout=60, CVVAE_FAULT_RANK="1")
    assert codes == [3, 3], logs
    for log in logs:
        assert "DistributedRunError: rank 1 failed: InjectedFaultError" in log, logs
    assert time.monotonic() - start < 60
    assert not (tmp_path / "none.pt").exists()


def test_distributed_option_is_a_no_op_in_one_process():
    model, case = small_model(), CASES[0]
    a = tiling.decode_latent(model, case_input(case), tiling.TilingOptions(tile_size=24, chunk_frames=3,
                                                                          distributed=True))
    b = tiling.decode_latent(model, case_input(case), tiling.TilingOptions(tile_size=24, chunk_frames=3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_reconstruct_distributed_cli(tmp_path, capsys):
    """``reconstruct --distributed`` on 2 ranks: rank 0 alone prints and writes, the same video as one process."""
    src = tmp_path / "in.mp4"
    write_video(src, to_uint8(generate_clip(0, SyntheticConfig(frames=9, height=32, width=48))[None]), fps=8)
    args = ["reconstruct", "builtin", str(src), "--device", "cpu", "--tile-size", "16", "--chunk-frames", "4"]
    assert main([*args, str(tmp_path / "one.mp4")]) == 0
    capsys.readouterr()
    codes, logs = run_ranks(tmp_path, [], timeout=120, cmd=[sys.executable, "-m", "cvvae_core", *args,
                                                               str(tmp_path / "two.mp4"), "--distributed"])
    assert codes == [0, 0], logs
    assert "PSNR" in logs[0] and "PSNR" not in logs[1] and "encode [" not in logs[1], logs
    assert (tmp_path / "two.png").exists()
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape
    # The lossless PNG strips: the MP4s are lossy, and a pixel that rounds the other way (the ranks
    # compute to float rounding of one process) can change the codec's choices over a whole block.
    one, two = (read_video(tmp_path / f"{name}.png")[0] for name in ("one", "two"))
    assert one.shape == two.shape and (one.int() - two.int()).abs().max() <= 1


def test_reconstruct_distributed_cli_failure(tmp_path):
    """A rank failing inside the engine: both ranks print the typed error and exit 2, no output."""
    src = tmp_path / "in.mp4"
    write_video(src, to_uint8(generate_clip(0, SyntheticConfig(frames=9, height=32, width=48))[None]), fps=8)
    codes, logs = run_ranks(tmp_path, [], timeout=60, CVVAE_FAULT_RANK="1", cmd=[
        sys.executable, "-m", "cvvae_core", "reconstruct", "builtin", str(src), str(tmp_path / "o.mp4"), "--device",
        "cpu", "--tile-size", "16", "--chunk-frames", "4", "--distributed"])
    assert codes == [2, 2], logs
    for log in logs:
        assert "error: rank 1 failed: InjectedFaultError" in log, logs
    assert not (tmp_path / "o.mp4").exists()


def test_distributed_refuses_other_tiling_modes(tmp_path, capsys):
    assert main(["reconstruct", "builtin", str(tmp_path / "in.mp4"), str(tmp_path / "o.mp4"), "--tiling", "official",
                 "--distributed"]) == 2
    assert "--distributed shares the seamless engine's tiles" in capsys.readouterr().err
