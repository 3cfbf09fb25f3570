"""Cost of one output-layer tuning step against one plain SVD UNet forward, in the same process.

Targets: a step takes <= 1.3x a forward's time and <= 1.2x its peak memory (everything before
``out.2`` runs without autograd; backward touches ``out.2``'s input only). Both are measured on the
same batch (one clip of ``--latent-frames`` frames, frames as batch, as KSampler's cond pass) and
the same conditioning; ratios and absolute numbers are printed.

Runs inside a real ComfyUI (it loads the checkpoint with ComfyUI's loader, so the model is
ComfyUI's SVD_img2vid). Use the ComfyUI venv's python:

    python bench/bench_svd_tuning.py --comfy-dir PATH/TO/ComfyUI --ckpt random_svd.safetensors \
        --device cpu --height 64 --width 64 --latent-frames 2
    python bench/bench_svd_tuning.py --comfy-dir ... --ckpt svd_xt.safetensors \
        --device cuda --dtype bf16 --height 576 --width 1024 --latent-frames 25

Peak memory: CUDA's peak allocated bytes above what was allocated before the call; on CPU the
process's peak resident memory above its resident memory before the call (VmHWM, reset through
/proc/self/clear_refs before each call). Random weights are fine: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy-dir", required=True, help="a ComfyUI source tree (0.8.0 or newer)")
    p.add_argument("--ckpt", required=True, help="SVD img2vid checkpoint (.safetensors)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="UNet dtype (auto: what ComfyUI picks for the device)")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--latent-frames", type=int, default=2, help="SVD frames (25 = 97 CV-VAE frames)")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: str) -> tuple[float, int]:
    """(seconds, peak bytes above the memory in use before the call)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")
    before = rss_bytes("VmRSS")
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t, rss_bytes("VmHWM") - before


def main():
    args = parse()
    sys.path.insert(0, str(Path(args.comfy_dir).resolve()))
    import comfy.cli_args
    if args.device == "cpu":
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd

    sys.path.insert(0, str(ROOT))
    from cvvae_core.train import svd_head

    options = {}
    if args.dtype != "auto":
        options["dtype"] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    patcher, _, _, _ = comfy.sd.load_checkpoint_guess_config(
        args.ckpt, output_vae=False, output_clip=False, output_clipvision=False, model_options=options)
    mm.load_models_gpu([patcher])
    model = patcher.model
    device = patcher.load_device
    print(f"loaded {type(model).__name__} in {time.perf_counter() - t0:.0f} s on {device}, "
          f"UNet dtype {model.get_dtype()}, torch threads {torch.get_num_threads()}")

    h, w, t = args.height // 8, args.width // 8, args.latent_frames
    g = torch.Generator().manual_seed(0)
    example = svd_head.Example(torch.randn(t, 4, h, w, generator=g) * 0.5,
                               svd_head.Conditioning(torch.randn(1, 1024, generator=g), torch.randn(1, 4, h, w, generator=g)))
    cfg = svd_head.HeadTuneConfig()
    tuner = svd_head.HeadTuner(model, cfg, device)
    x0, x, sigma, kwargs = tuner.noisy_batch([example], torch.tensor([1.0]), [torch.randn(t, 4, h, w, generator=g)])

    def forward():
        with torch.no_grad():
            model.apply_model(x, sigma, **kwargs)

    def step():
        tuner.step([example], torch.Generator().manual_seed(1))

    forward()  # warm-up (kernels, allocator)
    step()
    fwd, stp = [], []
    for _ in range(args.repeats):   # interleaved, so drift affects both alike
        fwd.append(measure(forward, args.device))
        stp.append(measure(step, args.device))
    f_s, s_s = statistics.median(s for s, _ in fwd), statistics.median(s for s, _ in stp)
    f_m, s_m = max(m for _, m in fwd), max(m for _, m in stp)
    mib = 2 ** 20
    print(f"{args.width}x{args.height}, {t} latent frames, device {device}:")
    print(f"  forward  {f_s:8.3f} s   peak +{f_m / mib:8.1f} MiB")
    print(f"  step     {s_s:8.3f} s   peak +{s_m / mib:8.1f} MiB")
    print(f"  step/forward: time {s_s / f_s:.2f}x (target <= 1.3), peak {s_m / max(f_m, 1):.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
