"""How loaded weights are built: where they live, and in which dtype.

    python bench/bench_load.py                       # release-size vae3d, random weights, fp32, CPU
    python bench/bench_load.py --variant vae3d_sd3 --size 64x64 --frames 9
    python bench/bench_load.py --modes fp32_then_cast working_dtype --dtype bf16 --frames 0

The safetensors reader hands out one buffer per tensor at the offset the file gives it, so most
of them are not 64-byte aligned (the PyTorch allocator aligns its own to 64). Kernels may take
other code paths on unaligned data, and on some CPUs round the last bit differently. This
script writes a release-size checkpoint with seeded random weights in the official layout (a
release folder: config.json + diffusion_pytorch_model.safetensors), then loads its weights file in
a fresh process per mode and prints, for each:
  load_s      wall time of read + build (median over --repeats processes)
  peak_mb     peak RSS of the process minus its RSS before loading
  aligned     share of parameters whose data pointer is 64-byte aligned
  encode_s / decode_s   median of 3 runs on a --frames x --size clip
and the max |difference| of the first two modes' latents (same weights; any difference is rounding).
  file_buffers   the reader's tensors assigned as parameters (load_state_dict(assign=True))
  aligned        what cvvae_core.load_model does: each tensor copied into fresh memory as it is read
  fp32_then_cast built in fp32, then cast to --dtype (a loader that leaves the cast to ComfyUI)
  working_dtype  built straight in --dtype (what the ComfyUI loader does: one copy of the weights)
--frames 0 skips the encode/decode timing (slow in fp16/bf16 on CPU).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cvvae_core  # noqa: E402
from cvvae_core.io import checkpoint  # noqa: E402

MODES = ("file_buffers", "aligned", "fp32_then_cast", "working_dtype")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def load_file_buffers(path: Path) -> cvvae_core.CVVAE:
    """The loader as it was: the reader's own tensors become the parameters."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    hints = json.loads(metadata["cvvae_config"])
    cfg = checkpoint.detect_config({k: tuple(v.shape) for k, v in sd.items()}, hints)
    with torch.device("meta"):
        model = cvvae_core.CVVAE(cfg)
    model.load_state_dict(checkpoint.to_internal(sd, cfg), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def child(args) -> None:
    x = torch.rand(1, 3, args.frames, *args.hw, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = rss_mb()
    t0 = time.perf_counter()
    dtype = DTYPES[args.dtype]
    if args.mode == "file_buffers":
        model = load_file_buffers(args.ckpt)
    elif args.mode == "fp32_then_cast":
        model = cvvae_core.load_model(args.ckpt, device="cpu", dtype=torch.float32).to(dtype)
    elif args.mode == "working_dtype":
        model = cvvae_core.load_model(args.ckpt, device="cpu", dtype=dtype)
    else:
        model = cvvae_core.load_model(args.ckpt)
    load_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    params = list(model.parameters())
    aligned = sum(p.data_ptr() % 64 == 0 for p in params) / len(params)
    times = {"encode_s": [], "decode_s": []}
    x = x.to(model.dtype)
    z = torch.zeros(())
    with torch.inference_mode():
        for _ in range(3 if args.frames else 0):
            t0 = time.perf_counter()
            z = model.encoder_output(x)[:, :model.config.latent_channels]
            times["encode_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.decode(z)
            times["decode_s"].append(time.perf_counter() - t0)
    torch.save(z, args.out)
    print(json.dumps({"load_s": load_s, "peak_mb": peak_mb, "aligned": aligned,
                      **{k: statistics.median(v) if v else float("nan") for k, v in times.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="vae3d", choices=sorted(cvvae_core.PRESETS))
    ap.add_argument("--size", default="64x64", help="HxW of the clip encoded and decoded")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=3, help="processes per mode (load time and peak are medians)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES[:2]), help="modes to compare")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="working dtype of fp32_then_cast and working_dtype")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hw = tuple(int(v) for v in args.size.split("x"))
    if args.mode:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = cvvae_core.CVVAE(cvvae_core.PRESETS[args.variant])
        ckpt = cvvae_core.save_model(model, tmp / args.variant) / checkpoint.WEIGHTS_NAME
        del model
        print(f"{args.variant}: {ckpt.stat().st_size / 2**20:.0f} MiB fp32 file; clip {args.frames}x{args.size}; "
              f"working dtype {args.dtype}; {torch.get_num_threads()} threads; "
              f"{torch.backends.cpu.get_cpu_capability()}")
        rows, latents = {}, {}
        for mode in args.modes:
            runs = []
            for r in range(args.repeats):
                out = tmp / f"{mode}.pt"
                cmd = [sys.executable, __file__, "--mode", mode, "--ckpt", str(ckpt), "--out", str(out),
                       "--size", args.size, "--frames", str(args.frames), "--dtype", args.dtype]
                runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            rows[mode] = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            latents[mode] = torch.load(out)
        print(f"{'mode':<13}{'load_s':>8}{'peak_mb':>9}{'aligned':>9}{'encode_s':>10}{'decode_s':>10}")
        for mode, r in rows.items():
            print(f"{mode:<13}{r['load_s']:>8.2f}{r['peak_mb']:>9.0f}{r['aligned']:>9.2f}"
                  f"{r['encode_s']:>10.2f}{r['decode_s']:>10.2f}")
        if args.frames and len(latents) > 1:
            a, b = list(latents)[:2]
            diff = (latents[a].float() - latents[b].float()).abs().max().item()
            print(f"max |latent difference| between {a} and {b}: {diff:.3g}")


if __name__ == "__main__":
    main()
