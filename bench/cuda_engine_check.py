"""The seamless engine on a GPU, settled in one short run (about 5 minutes of passes on an H200).

    python bench/cuda_engine_check.py                  # on a CUDA machine: everything below
    python bench/cuda_engine_check.py --device cpu --size 64x64 --frames 5 9 --copy-mib 16 --deadline 60
                                                       # the same code paths on CPU, tiny

In order, each row printed and the JSON (``--json``, default ``$OUT/cuda_engine_check.json`` or
./cuda_engine_check.json) rewritten as soon as it is measured:

1. torch, CUDA and cuDNN versions, the device and its free memory;
2. copy bandwidth: pinned host -> device and device -> host, pageable device -> host, and the
   strided copy of a piece of a larger 5-D tensor (on the device, and into pinned host memory);
3. exactness on the device: a tiny float32 model (TF32 off), encode and decode, every plan kind
   (the default plan, pieces, host tier, recomputation, disk tier), the largest absolute difference
   from the untiled model; later (after the first model's first two lengths: it is slow) the same
   in a child process under ``torch.cuda._sanitizer`` (CUDA only), which fails on an unsynchronised
   access to a tensor from two streams;
4. release-size vae3d (then vae3d_sd3, if time remains) with random weights (``bench_tiling.build_model``),
   bf16, 576x1024, 17 and 97 frames first and 49 last, encode and decode, per case: ``official``,
   ``untiled`` (skipped where the engine's estimate does not fit free memory, or where it would
   likely outrun the deadline: it cannot be cancelled), ``seamless`` without a budget and with
   ``memory_budget`` 20 GiB and 8 GiB: seconds and throughput against official, the measured device
   peak (``max_memory_allocated`` minus what was allocated before the pass) against the plan's
   estimate, measured (the engine's ledger) against estimated page-locked bytes, bytes moved between
   the device and host memory, PSNR against the untiled pass of the same run;
5. the memory format: ``channels_last_3d`` against contiguous stores and pieces
   (``runner.MEMORY_FORMATS``) on one budgeted case;
6. cuDNN benchmark mode on one budgeted case, if time remains;
7. one PASS/FAIL line per target: 8 GiB >= 0.8x official with a device peak <= 8 GiB, 20 GiB >= 1.0x
   official, no budget >= 1.3x official (judged on an H200), measured peaks within the estimates,
   exactness and the sanitizer; and which memory format is faster.

``--deadline`` seconds (default 300, from the start) is checked inside every engine pass
(``TilingOptions.cancel``): a pass still running then is cancelled and its row recorded as skipped.
Errors of the engine (``cvvae_core.errors``: out of memory after its fallback, a refused budget) and
PyTorch's out-of-memory error are recorded per row; the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiling import ROOT, build_model, make_clip, psnr  # noqa: E402

sys.path.insert(0, str(ROOT))
import cvvae_core  # noqa: E402
from cvvae_core import tiling  # noqa: E402
from cvvae_core.errors import CancelledError, CVVAEError, MemoryBudgetError  # noqa: E402
from cvvae_core.tiling import runner  # noqa: E402

GIB = 2 ** 30
#: Largest absolute difference from the untiled float32 model that counts as exact: float32 rounding
#: through ~20 layers, with convolution algorithms that differ with the piece size.
EXACT = 1e-4
MODELS = {"random-sd": "vae3d", "random-sd3": "vae3d_sd3"}


class Record:
    """The rows so far, printed one by one and written to the JSON file after each."""

    def __init__(self, path: Path):
        self.path, self.rows, self.start = path, [], time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        row["at_s"] = round(time.monotonic() - self.start, 1)  # when it finished, from the start
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.rows, indent=1))
        os.replace(partial, self.path)
        return row


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end

    def left(self) -> float:
        return self.end - time.monotonic()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> int:
    """Free device bytes, PyTorch's cache given back first (it would otherwise count as used)."""
    gc.collect()
    if device.type != "cuda":
        return runner.free_bytes(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def guarded(row: dict, measure, device: torch.device) -> dict:
    """``row`` updated with ``measure()``, or with what stopped it: a cancellation by the deadline, a
    refused budget, the engine's or PyTorch's out-of-memory error, another error of the engine."""
    try:
        row.update(measure())
    except CancelledError:
        row["skipped"] = "deadline (cancelled inside the pass)"
    except MemoryBudgetError as err:
        row["refused"] = str(err)
    except (CVVAEError, torch.OutOfMemoryError) as err:
        row["error"] = f"{type(err).__name__}: {err}"[:400]
    free_memory(device)  # outside the except blocks: the failed pass's tensors are unreachable now
    return row


# ------------------------------------------------------------------------------------------
# 1-2. The machine
# ------------------------------------------------------------------------------------------
def versions(device: torch.device) -> dict:
    row = {"section": "versions", "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update(name=props.name, total_gib=props.total_memory / GIB, free_gib=free_memory(device) / GIB,
                   capability=f"{props.major}.{props.minor}")
    return row


def copy_rate(copy, nbytes: int, device: torch.device, repeats: int = 3) -> float:
    """GB/s of ``copy()`` moving ``nbytes``, after one untimed copy."""
    copy()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        copy()
    synchronize(device)
    return repeats * nbytes / (time.perf_counter() - start) / 1e9


def bandwidth(device: torch.device, mib: int) -> list[dict]:
    """Large copies between the device and host memory, and of a strided piece of a 5-D store."""
    n, cuda = mib << 20, device.type == "cuda"
    rows = []
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    pageable = torch.empty(n, dtype=torch.uint8)
    if cuda:
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        rows.append({"copy": "host->device, pinned", "gb_s": copy_rate(lambda: dev.copy_(pinned, non_blocking=True),
                                                                       n, device)})
        rows.append({"copy": "device->host, pinned", "gb_s": copy_rate(lambda: pinned.copy_(dev, non_blocking=True),
                                                                       n, device)})
    rows.append({"copy": "device->host, pageable", "gb_s": copy_rate(lambda: pageable.copy_(dev), n, device)})
    # a store [1, C, T, H, W] in bf16 and one piece of it: half its frames, half its height and width
    c, t, h = 128, 16, int((n / (2 * 128 * 16 * 2)) ** 0.5)
    store = torch.empty(1, c, t, h, 2 * h, dtype=torch.bfloat16, device=device)
    piece = store[:, :, t // 4: 3 * t // 4, h // 4: 3 * h // 4, h // 2: 3 * h // 2]
    size = piece.numel() * piece.element_size()
    block = torch.empty(piece.shape, dtype=piece.dtype, device=device)
    rows.append({"copy": "strided piece -> contiguous, on the device",
                 "gb_s": copy_rate(lambda: block.copy_(piece), size, device)})
    if cuda:
        host = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=True)
        rows.append({"copy": "strided piece -> pinned host", "gb_s": copy_rate(lambda: host.copy_(piece, non_blocking=True),
                                                                               size, device)})
    for row in rows:
        row.update(section="bandwidth", mib=mib)
    return rows


# ------------------------------------------------------------------------------------------
# 3. Exactness of every plan kind
# ------------------------------------------------------------------------------------------
def tiny_model(device: torch.device):
    """A four-level float32 CV-VAE with the released structure and seeded non-trivial weights."""
    cfg = cvvae_core.CVVAEConfig(variant="sd", latent_channels=4, base_channels=16, channel_mult=(1, 2, 2, 2),
                                 blocks_per_level=1, norm_groups=8)
    g = torch.Generator().manual_seed(0)
    model = cvvae_core.CVVAE(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.to(device)


def plan_kinds(model, direction, shape, disk_dir) -> list[tuple[str, dict, str]]:
    """(kind, TilingOptions fields, the Plan field that must be non-empty) of every plan kind, with
    budgets found from the planner so that each kind is really taken."""
    whole = tiling.estimate_memory(model, direction, shape, tiling.Plan())
    kinds = [("default plan", {}, ""), ("pieces", {"tile_size": 32, "chunk_frames": 4}, "")]

    def device_budget(share: float) -> int:  # a share of the untiled peak; the fixed workspace on top
        return whole.workspace + int(share * (whole.total - whole.workspace))

    host_budget = None
    for share in (0.5, 0.35, 0.25, 0.15, 0.1, 0.05):
        opts = {"memory_budget": device_budget(share), "recompute": False}
        try:
            plan = tiling.plan_for(model, direction, shape, tiling.TilingOptions(**opts))
        except MemoryBudgetError:
            continue
        if plan.host:
            host_budget = opts
            break
    host_budget = host_budget or {"memory_budget": device_budget(0.1), "recompute": False}
    kinds.append(("host tier", host_budget, "host"))
    kinds.append(("recompute", {**host_budget, "recompute": True}, "recompute"))
    disk = None
    # host memory just short of what the host tier needs; the smaller the device budget, the more
    # there is to move to disk past the fixed staging buffers
    for device_share in (None, 0.1, 0.05, 0.02):
        base = host_budget if device_share is None else {"memory_budget": device_budget(device_share),
                                                          "recompute": False}
        try:
            plan = tiling.plan_for(model, direction, shape, tiling.TilingOptions(**base))
        except MemoryBudgetError:
            continue
        stored = tiling.estimate_memory(model, direction, shape, plan).host
        for share in (0.95, 0.9, 0.8, 0.6, 0.4, 0.25):
            candidate = {**base, "host_memory_budget": int(share * stored), "disk_dir": disk_dir}
            try:
                if tiling.plan_for(model, direction, shape, tiling.TilingOptions(**candidate)).disk:
                    disk = candidate
                    break
            except MemoryBudgetError:
                continue
        if disk:
            break
    disk = disk or {**host_budget, "host_memory_budget": 1, "disk_dir": disk_dir}  # refused: reported as such
    kinds.append(("disk tier", disk, "disk"))
    return kinds


def exactness(device: torch.device, deadline: Deadline) -> list[dict]:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model(device)
    # on CUDA a clip large enough that the stores outweigh the disk tier's page-locked staging buffers
    frames, h, w = (17, 128, 192) if device.type == "cuda" else (9, 64, 96)
    video = make_clip("smooth", frames, h, w)
    latent = torch.randn(1, 4, (frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as disk_dir:
        for direction, x in ((tiling.ENCODE, video), (tiling.DECODE, latent)):
            with torch.no_grad():
                ref = direction.untiled(model, x.to(device)).float().cpu()
            for kind, fields, must in plan_kinds(model, direction, x.shape, disk_dir):
                row = {"section": "exactness", "direction": direction.name, "kind": kind}
                reports = []
                opts = tiling.TilingOptions(report=reports.append, cancel=deadline.passed, **fields)

                def measure():
                    out = (tiling.encode_moments if direction is tiling.ENCODE else tiling.decode_latent)(model, x, opts)
                    r = reports[0]
                    diff = (out - ref).abs().max().item()
                    return {"max_abs_diff": diff, "exact": diff <= EXACT, "plan": r.plan.describe(),
                            "kind_taken": not must or bool(getattr(r.plan, must)),
                            "host_traffic": r.host_traffic, "disk_traffic": r.disk_traffic,
                            "disk_left_behind": bool(os.listdir(disk_dir))}
                rows.append(guarded(row, measure, device))
    return rows


def sanitized_exactness(device: torch.device, deadline: Deadline, json_path: Path) -> dict:
    """The exactness section again, in a child process under PyTorch's CUDA stream sanitizer."""
    row = {"section": "sanitizer"}
    if device.type != "cuda":
        return {**row, "skipped": "CUDA only"}
    if deadline.left() < 30:
        return {**row, "skipped": "deadline"}
    child_json = json_path.with_name(json_path.stem + "_sanitizer.json")
    argv = [__file__, "--exactness-only", "--device", str(device), "--json", str(child_json),
            "--deadline", str(int(deadline.left()))]
    code = ("import runpy, sys; import torch.cuda._sanitizer as s; s.enable_cuda_sanitizer(); "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              timeout=max(10, deadline.left()))
    except subprocess.TimeoutExpired:
        return {**row, "skipped": "deadline (the child was stopped)"}
    rows = json.loads(child_json.read_text()) if child_json.exists() else []
    races = "CSAN" in proc.stderr or "data race" in proc.stderr.lower()
    return {**row, "seconds": time.perf_counter() - start, "returncode": proc.returncode, "race_reported": races,
            "rows": len(rows), "all_exact": bool(rows) and all(r.get("exact") for r in rows),
            "clean": proc.returncode == 0 and not races and bool(rows) and all(r.get("exact") for r in rows),
            "stderr_tail": proc.stderr[-1500:]}


# ------------------------------------------------------------------------------------------
# 4-6. Release-size cases
# ------------------------------------------------------------------------------------------
def timed_pass(model, direction, x: torch.Tensor, mode: str, budget: float | None, device: torch.device,
               deadline: Deadline) -> dict:
    """One pass from an input in host memory to a float32 result in host memory: seconds, measured
    device peak, and for the engine its plan, estimate and ledger; ``y`` is the result."""
    reports = []
    if mode == "untiled":
        def run():
            return direction.untiled(model, x).float().cpu()
    else:
        opts = tiling.TilingOptions(mode="official" if mode == "official" else "seamless", report=reports.append,
                                    cancel=deadline.passed, memory_budget=None if budget is None else int(budget * GIB))
        def run():
            return (tiling.encode_moments if direction is tiling.ENCODE else tiling.decode_latent)(model, x, opts)
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        y = run()
    synchronize(device)
    row = {"seconds": time.perf_counter() - start, "y": y}
    if device.type == "cuda":
        row["device_peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
    elif reports and reports[0].device_peak is not None:
        row["device_peak_gib"] = reports[0].device_peak / GIB  # on CPU: what the engine's ledger counted
    if mode == "untiled":
        row["estimate_gib"] = tiling.estimate_memory(model, direction, x.shape, tiling.Plan(), "cpu").total / GIB
    if reports:
        r = reports[0]
        row.update(plan=r.describe(), estimate_gib=r.estimate.total / GIB, estimated_host_gib=r.estimate.host / GIB,
                   host_peak_gib=None if r.host_peak is None else r.host_peak / GIB,
                   engine_device_peak_gib=None if r.device_peak is None else r.device_peak / GIB,
                   pinned_gib=r.pinned / GIB, estimated_pinned_gib=r.estimate.pinned / GIB,
                   host_traffic_gib=r.host_traffic / GIB, estimated_host_traffic_gib=r.estimate.host_traffic / GIB,
                   disk_traffic_gib=r.disk_traffic / GIB, relative_cost=r.estimate.relative_cost)
    return row


def inputs(model, frames: int, h: int, w: int) -> dict:
    cfg = model.config
    latent = torch.randn(1, cfg.latent_channels, cfg.latent_frames(frames), h // cfg.spatial_compression,
                         w // cfg.spatial_compression, generator=torch.Generator().manual_seed(0))
    return {tiling.ENCODE: make_clip("smooth", frames, h, w), tiling.DECODE: latent}


def quality(direction, y: torch.Tensor, ref: torch.Tensor, latent_channels: int) -> float:
    if direction is tiling.DECODE:
        return psnr(y, ref, 2.0)
    c = latent_channels
    return psnr(y[:, :c], ref[:, :c], float(ref[:, :c].max() - ref[:, :c].min()))


def case_rows(record: Record, name: str, model, frames: int, x: torch.Tensor, direction, budgets, device,
              deadline: Deadline):
    """official, untiled, seamless without and with each budget, on one clip and direction."""
    modes = [("official", None), ("untiled", None), ("seamless", None)] + [("seamless", b) for b in budgets]
    base, ref = None, None
    for mode, budget in modes:
        label = mode if budget is None else f"seamless-{budget:g}GiB"
        row = {"section": "case", "model": name, "frames": frames, "direction": direction.name, "mode": label}
        if mode == "untiled":
            need = tiling.estimate_memory(model, direction, x.shape, tiling.Plan(), "cpu").total
            if device.type == "cuda" and need > 0.9 * free_memory(device):
                row["skipped"] = f"needs {need / GIB:.1f} GiB (estimate), more than is free"
            elif base is not None and deadline.left() < 3 * base:
                row["skipped"] = "deadline (it cannot be cancelled and would likely outrun it)"
        if "skipped" not in row:
            if deadline.passed():
                row["skipped"] = "deadline"
            else:
                guarded(row, lambda: timed_pass(model, direction, x, mode, budget, device, deadline), device)
        y = row.pop("y", None)
        if y is not None:
            if mode == "official":
                base = row["seconds"]
            elif mode == "untiled":
                ref = y
            row["vs_official"] = base / row["seconds"] if base else None
            if ref is not None and mode == "seamless":
                row["psnr_vs_untiled"] = quality(direction, y, ref, model.latent_channels)
        del y
        record.add(row)


def layout_rows(record: Record, name: str, model, frames: int, x: torch.Tensor, direction, budget: float,
                device, deadline: Deadline):
    """The same budgeted pass with contiguous and with channels_last_3d stores and pieces."""
    default = runner.MEMORY_FORMATS.get(device.type)
    seconds = {}
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
        row = {"section": "layout", "model": name, "frames": frames, "direction": direction.name,
               "budget_gib": budget, "memory_format": fmt_name}
        runner.MEMORY_FORMATS[device.type] = fmt
        try:
            if deadline.passed():
                row["skipped"] = "deadline"
            else:
                guarded(row, lambda: timed_pass(model, direction, x, "seamless", budget, device, deadline), device)
        finally:
            runner.MEMORY_FORMATS[device.type] = default
        row.pop("y", None)
        if "seconds" in row:
            seconds[fmt_name] = row["seconds"]
        record.add(row)
    return seconds


def cudnn_benchmark_row(model, x: torch.Tensor, direction, budget: float, device, deadline: Deadline) -> dict:
    """The same budgeted pass without and with cuDNN's autotuner (twice with: the first pays the tuning)."""
    row = {"section": "trial", "trial": "cudnn.benchmark", "budget_gib": budget, "direction": direction.name}
    times = []
    try:
        for benchmark in (False, True, True):
            torch.backends.cudnn.benchmark = benchmark
            if deadline.passed():
                return {**row, "skipped": "deadline"}
            r = guarded({}, lambda: timed_pass(model, direction, x, "seamless", budget, device, deadline), device)
            if "seconds" not in r:
                return {**row, **{k: v for k, v in r.items() if k != "y"}}
            times.append(r["seconds"])
    finally:
        torch.backends.cudnn.benchmark = False
    return {**row, "without": times[0], "first": times[1], "second": times[2], "speedup": times[0] / times[2]}


# ------------------------------------------------------------------------------------------
# 7. Verdicts
# ------------------------------------------------------------------------------------------
def verdict(label: str, checks: list[tuple[bool, str]], judged: bool = True) -> dict:
    if not checks:
        status = "NOT MEASURED"
    elif not judged:
        status = "REPORTED"
    else:
        status = "PASS" if all(ok for ok, _ in checks) else "FAIL"
    return {"section": "target", "target": label, "status": status, "cases": [text for _, text in checks]}


def targets(rows: list[dict], device_name: str, budgets: list[float], layout: dict) -> list[dict]:
    """The smallest budget (8 GiB) is held to the low-memory target, the largest (20 GiB) to the
    middle one."""
    small, large = min(budgets), max(budgets)
    cases = [r for r in rows if r.get("section") == "case" and "seconds" in r]

    def of(mode):
        return [r for r in cases if r["mode"] == mode and r.get("vs_official") is not None]

    def where(r):
        return f"{r['model']} {r['frames']}f {r['direction']}"

    out = []
    checks = [(r["vs_official"] >= 0.8 and r.get("device_peak_gib", float("inf")) <= small,
               f"{where(r)}: {r['vs_official']:.2f}x official, device peak {r.get('device_peak_gib', float('nan')):.2f} GiB")
              for r in of(f"seamless-{small:g}GiB")]
    out.append(verdict(f"{small:g} GiB budget: >= 0.8x official, device peak <= {small:g} GiB", checks))
    checks = [(r["vs_official"] >= 1.0, f"{where(r)}: {r['vs_official']:.2f}x official")
              for r in of(f"seamless-{large:g}GiB")]
    out.append(verdict(f"{large:g} GiB budget: >= 1.0x official", checks))
    checks = [(r["vs_official"] >= 1.3, f"{where(r)}: {r['vs_official']:.2f}x official") for r in of("seamless")]
    out.append(verdict("no budget: >= 1.3x official (on an H200)", checks, judged="H200" in device_name))
    engine = [r for r in cases if r["mode"].startswith("seamless") and "device_peak_gib" in r]
    checks = [(r["device_peak_gib"] <= r["estimate_gib"],
               f"{where(r)} {r['mode']}: measured {r['device_peak_gib']:.2f} GiB, estimate {r['estimate_gib']:.2f} GiB")
              for r in engine]
    out.append(verdict("measured device peak <= the plan's estimate", checks))
    checks = [(r["pinned_gib"] <= r["estimated_pinned_gib"],
               f"{where(r)} {r['mode']}: {r['pinned_gib']:.2f} GiB pinned, estimate {r['estimated_pinned_gib']:.2f} GiB")
              for r in engine if r.get("pinned_gib") is not None and r["pinned_gib"] + r["estimated_pinned_gib"] > 0]
    out.append(verdict("page-locked bytes <= the plan's estimate", checks))
    exact = [r for r in rows if r.get("section") == "exactness"]
    checks = [(r["exact"] and r["kind_taken"] and not r["disk_left_behind"],
               f"{r['direction']} {r['kind']}: max |diff| {r['max_abs_diff']:.2e}"
               f"{'' if r['kind_taken'] else ' (kind not taken)'}{' (disk files left)' if r['disk_left_behind'] else ''}")
              if "max_abs_diff" in r else
              (False, f"{r['direction']} {r['kind']}: " + str(r.get("skipped") or r.get("refused") or r.get("error")))
              for r in exact]
    out.append(verdict(f"every plan kind exact (max |diff| <= {EXACT:g} from untiled float32)", checks))
    san = [r for r in rows if r.get("section") == "sanitizer" and "clean" in r]
    out.append(verdict("the same under torch.cuda._sanitizer: no race, exact",
                       [(r["clean"], f"returncode {r['returncode']}, race reported: {r['race_reported']}")
                        for r in san]))
    if len(layout) == 2:
        ratio = layout["contiguous"] / layout["channels_last_3d"]
        faster = "channels_last_3d" if ratio > 1 else "contiguous"
        out.append({"section": "target", "target": "memory format", "status": f"{faster} faster",
                    "cases": [f"channels_last_3d {ratio:.2f}x the speed of contiguous"]})
    else:
        out.append(verdict("memory format", []))
    return out


def print_table(rows: list[dict]):
    print("\nmodel        frames dir    mode              seconds vs off dev GiB  est GiB pinned/est GiB  "
          "host moved  PSNR")
    for r in rows:
        if r.get("section") not in ("case", "layout"):
            continue
        mode = r.get("mode") or f"{r['memory_format']} {r['budget_gib']:g}GiB"
        head = f"{r['model']:12s} {r['frames']:6d} {r['direction']:6s} {mode:17s}"
        stop = r.get("skipped") or r.get("refused") or r.get("error")
        if stop:
            print(f"{head} {'skipped' if 'skipped' in r else 'refused' if 'refused' in r else 'error'}: {stop[:100]}")
            continue

        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        pinned = f"{num('pinned_gib', '.2f')}/{num('estimated_pinned_gib', '.2f')}"
        print(f"{head} {num('seconds', '7.2f'):>7s} {num('vs_official', '6.2f'):>6s} {num('device_peak_gib', '7.2f'):>7s}"
              f" {num('estimate_gib', '8.2f'):>8s} {pinned:>15s} {num('host_traffic_gib', '9.1f'):>9s} G "
              f"{num('psnr_vs_untiled', '5.1f'):>5s}")
    print()
    for r in rows:
        if r.get("section") == "target":
            print(f"{r['status']:12s} {r['target']}" + "".join(f"\n             {c}" for c in r["cases"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="576x1024", help="HxW pixels")
    ap.add_argument("--frames", type=int, nargs="+", default=[17, 97, 49], help="in this order")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="in this order")
    ap.add_argument("--budgets", type=float, nargs="+", default=[20, 8], help="GiB")
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth copies")
    ap.add_argument("--deadline", type=float, default=300, help="seconds from the start; checked inside passes")
    ap.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "cuda_engine_check.json")
    ap.add_argument("--exactness-only", action="store_true", help=argparse.SUPPRESS)  # the sanitizer's child
    args = ap.parse_args()
    deadline, started = Deadline(args.deadline), time.monotonic()
    device = torch.device(args.device)
    record = Record(args.json)
    if args.exactness_only:
        for row in exactness(device, deadline):
            record.add(row)
        return
    info = record.add(versions(device))
    for row in bandwidth(device, args.copy_mib):
        record.add(row)
    for row in exactness(device, deadline):
        record.add(row)

    h, w = (int(v) for v in args.size.split("x"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout, budget = {}, min(args.budgets)
    first, once_done = None, False
    for name in args.models:
        if deadline.passed():
            record.add({"section": "case", "model": name, "skipped": "deadline"})
            continue
        model = build_model(name, args.device, dtype)
        # kernels, cuDNN handles and the allocators out of the first timed pass
        tiling.decode_latent(model, inputs(model, 5, 64, 64)[tiling.DECODE], tiling.TilingOptions())
        for i, frames in enumerate(args.frames):
            x = inputs(model, frames, h, w)
            for direction in (tiling.ENCODE, tiling.DECODE):
                case_rows(record, name, model, frames, x[direction], direction, args.budgets, device, deadline)
            if first is None:
                first = (model, x[tiling.DECODE])
            if not once_done and i == min(1, len(args.frames) - 1):  # after the first two lengths
                once_done = True
                layout = layout_rows(record, name, model, args.frames[0], first[1], tiling.DECODE, budget,
                                     device, deadline)
                # slow (every operation checked from Python): after the rows the peak targets need
                record.add(sanitized_exactness(device, deadline, args.json))
        if device.type == "cuda" and name == args.models[0] and not deadline.passed():
            record.add(cudnn_benchmark_row(model, first[1], tiling.DECODE, budget, device, deadline))
        del model, x
        first = None
        free_memory(device)
    for row in targets(record.rows, info.get("name", str(device)), args.budgets, layout):
        record.add(row)
    print_table(record.rows)
    print(f"total {time.monotonic() - started:.0f} s; JSON: {args.json}", flush=True)


if __name__ == "__main__":
    main()
