"""Memory budgets are promises: plans within both budgets or a refusal before any work; the disk tier;
recomputation of any layer output; the asynchronous copy schedule; and the measured RAM of a pass.

The copy schedule is checked with :class:`LazyStreams`, stand-in copy streams that run each copy
only when an event after it is waited for (as late as a real copy engine may), so a buffer read
before its copy's event, or a staging buffer reused early, gives wrong numbers.
"""
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import cvvae_core
from cvvae_core.errors import MemoryBudgetError
from cvvae_core.tiling import executor, planner, runner as tiling, search, tiers
from conftest import randomize_, tiny_config, video

EXACT = 2e-5
#: A device budget for these tiny models that needs part of the layer outputs in host memory.
DEVICE_BUDGET = 2_000_000
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return randomize_(cvvae_core.CVVAE(tiny_config("sd", base_channels=8, norm_groups=4))).eval()


def latent(model, frames=3, seed=5):
    return torch.randn(1, model.latent_channels, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


def run(model, x, what="decode", **opts):
    reports = []
    fn = tiling.decode_latent if what == "decode" else tiling.encode_moments
    out = fn(model, x, tiling.TilingOptions(report=reports.append, **opts))
    return out, reports[0]


def untiled(model, x, what="decode"):
    return model.decoder_output(x) if what == "decode" else model.encoder_output(x)


def no_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a piece ran")
    for cls in (executor.ConvStep, executor.UpsampleStep, executor.AttentionSpatialStep):
        monkeypatch.setattr(cls, "run", refuse)


# ---------------------------------------------------------------------------------------------
# Budgets hold, or the call is refused before work
# ---------------------------------------------------------------------------------------------
def test_a_plan_that_fits_no_budget_is_refused_before_any_work(model, monkeypatch):
    z = latent(model)
    no_work(monkeypatch)
    with pytest.raises(MemoryBudgetError, match="disk_dir.*official") as err:
        tiling.decode_latent(model, z, tiling.TilingOptions(memory_budget=20_000, host_memory_budget=20_000))
    assert err.value.device_budget == 20_000 and err.value.host_needed > 20_000


@pytest.mark.parametrize("what", ["encode", "decode"])
def test_every_plan_keeps_within_both_budgets(model, what):
    x = video(1, 9, 32, 40, seed=2) if what == "encode" else latent(model)
    ref = untiled(model, x, what)
    free = tiling.plan_for(model, planner.ENCODE if what == "encode" else planner.DECODE, x.shape,
                           tiling.TilingOptions(memory_budget=DEVICE_BUDGET))
    whole = tiling.estimate_memory(model, planner.ENCODE if what == "encode" else planner.DECODE, x.shape, free).host
    for share in (0.95, 0.8):
        out, report = run(model, x, what, memory_budget=DEVICE_BUDGET, host_memory_budget=int(share * whole))
        assert report.estimate.total <= DEVICE_BUDGET and report.device_peak <= DEVICE_BUDGET
        assert report.estimate.host <= share * whole and report.host_peak <= 1.1 * share * whole
        torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)


def test_short_host_memory_recomputes_beyond_resnet_intermediates(model):
    z = latent(model, 5)
    prog = executor.Program(model.decoder.layers(), z.shape)
    free = {s.name for s in prog.steps if prog.free_to_recompute(s)}
    opts = tiling.TilingOptions(memory_budget=3_000_000, recompute=False)
    stored = tiling.estimate_memory(model, planner.DECODE, z.shape,
                                    tiling.plan_for(model, planner.DECODE, z.shape, opts)).host
    out, report = run(model, z, memory_budget=3_000_000, host_memory_budget=int(0.7 * stored))
    assert report.plan.recompute - free, report.describe()  # some other layer output recomputed
    assert report.estimate.host <= 0.7 * stored
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)


def test_a_chain_of_recomputed_outputs_is_exact(model):
    """Recomputed outputs whose inputs are recomputed too (readers recompute down the chain)."""
    z = latent(model)
    prog = executor.Program(model.decoder.layers(), z.shape)
    up = next(i for i, s in enumerate(prog.steps) if isinstance(s, executor.UpsampleStep))
    chain = frozenset(s.name for s in prog.steps[up:up + 4])  # an upsampler and the ResNet block after it
    assert all(prog.steps[i].recomputable for i in range(up, up + 4))
    plan = planner.Plan(tile=16, chunk=3, recompute=chain)
    with torch.no_grad():
        out = tiling._seamless(model, z, tiling.TilingOptions(), planner.DECODE, plan, None)
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)


def test_the_search_remembers_piece_sizes_only_by_what_they_depend_on(model):
    z = latent(model, 5)
    prog = executor.Program(model.decoder.layers(), z.shape)
    names = [s.name for s in prog.steps[:-1] if s.recomputable]
    memo, video, cpu = {}, planner.DECODE.video_size(model, z.shape), torch.device("cpu")
    plans = [planner.Plan(piece_bytes=pieces, recompute=frozenset(names[k::3]), host=frozenset(names[k + 1::3]))
             for k in range(len(names)) for pieces in (2_000_000, 500_000)]
    # chains of different depth ending at the same reader: its pieces shrink as the chain grows
    plans += [planner.Plan(piece_bytes=300_000, recompute=frozenset(names[j:8])) for j in range(8)]
    for plan in plans:
        assert (planner.piece_sizes(prog, plan, video, 4, cpu, memo)
                == planner.piece_sizes(prog, plan, video, 4, cpu)), plan
    assert len(memo) < len(plans) * len(prog.steps)  # and it is used


def test_a_plan_of_hopeless_work_is_refused_unless_its_pieces_were_given(model, monkeypatch):
    z = latent(model, 5)
    opts = dict(memory_budget=3_000_000, recompute=True)
    plan = tiling.plan_for(model, planner.DECODE, z.shape, tiling.TilingOptions(**opts))
    work = tiling.estimate_memory(model, planner.DECODE, z.shape, plan).relative_work
    assert work > 1.0  # it recomputes
    monkeypatch.setattr(search, "MAX_RELATIVE_WORK", 0.99 * work)
    no_work(monkeypatch)
    with pytest.raises(MemoryBudgetError, match="useful time.*official"):
        tiling.decode_latent(model, z, tiling.TilingOptions(**opts))
    assert tiling.plan_for(model, planner.DECODE, z.shape, tiling.TilingOptions(tile_size=16, chunk_frames=3, **opts))


def test_a_search_that_finds_nothing_starts_again_from_a_smaller_device_budget(model, monkeypatch):
    z = latent(model, 5)
    full = DEVICE_BUDGET
    real = search._Search.relieve_host

    def stuck_at_the_full_budget(self, plan):  # a greedy search that misses at this budget
        return plan if self.device_budget == full else real(self, plan)
    monkeypatch.setattr(search._Search, "relieve_host", stuck_at_the_full_budget)
    opts = tiling.TilingOptions(memory_budget=full, recompute=False)
    stored = tiling.estimate_memory(model, planner.DECODE, z.shape,
                                    tiling.plan_for(model, planner.DECODE, z.shape, opts)).host
    out, report = run(model, z, memory_budget=full, host_memory_budget=int(0.8 * stored))
    assert report.estimate.total <= 0.75 * full and report.estimate.host <= 0.8 * stored
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)
    monkeypatch.setattr(search, "NARROWER_DEVICE_BUDGETS", (1.0,))
    with pytest.raises(MemoryBudgetError):
        run(model, z, memory_budget=full, host_memory_budget=int(0.8 * stored))


def test_the_plan_says_where_each_output_is_and_what_it_costs(model):
    z = latent(model)
    for budget in (4_000_000, 3_000_000):
        _, report = run(model, z, tile_size=16, chunk_frames=3, memory_budget=budget, recompute=True)
        text = report.describe()
        for name in report.plan.host | report.plan.recompute:
            assert name in text
        assert ("in host memory" in text) == bool(report.plan.host)
        assert "recomputed" in text and "x the untiled pass" in text


# ---------------------------------------------------------------------------------------------
# The disk tier
# ---------------------------------------------------------------------------------------------
def disk_run(model, z, folder, device_budget=DEVICE_BUDGET, host_share=0.6, **more):
    """A decode whose layer outputs go to the device, host memory and disk (host memory at
    ``host_share`` of what the device budget alone would need)."""
    opts = dict(memory_budget=device_budget, recompute=False, **more)
    stored = tiling.estimate_memory(model, planner.DECODE, z.shape,
                                    tiling.plan_for(model, planner.DECODE, z.shape, tiling.TilingOptions(**opts))).host
    return run(model, z, host_memory_budget=int(host_share * stored), disk_dir=folder, **opts)


def test_the_disk_tier_is_exact_and_leaves_nothing_behind(model, tmp_path):
    z = latent(model, 5)
    out, report = disk_run(model, z, tmp_path)
    assert report.plan.disk and report.disk_traffic > 0 and report.estimate.disk > 0
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_the_disk_tier_is_removed_after_a_failure_or_ctrl_c(model, tmp_path, monkeypatch, failure):
    z = latent(model, 5)
    seen = []
    real = executor.ConvStep.run

    def failing(self, read, box):
        seen.append(1)
        if len(seen) == 40:
            assert any(tmp_path.iterdir())  # the disk files exist while the pass runs
            raise failure
        return real(self, read, box)
    monkeypatch.setattr(executor.ConvStep, "run", failing)
    with pytest.raises(type(failure)):
        disk_run(model, z, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_folder_that_does_not_exist_is_refused():
    with pytest.raises(cvvae_core.InputError, match="disk_dir"):
        tiling.TilingOptions(disk_dir="/nonexistent/cvvae-folder")


# ---------------------------------------------------------------------------------------------
# Asynchronous copies: the host never touches a buffer before its copy's event
# ---------------------------------------------------------------------------------------------
class LazyStreams(tiers.Streams):
    """Copy streams whose copies run as late as possible: when an event after them is waited for.
    Buffers for inbound copies start as NaN, so reading one early shows."""

    def __init__(self, device):
        super().__init__(device)
        self.asynchronous = True
        self.compute, self.outbound, self.inbound = "compute", "outbound", "inbound"
        self.ops = {"outbound": [], "inbound": []}
        self.done = {"outbound": 0, "inbound": 0}

    def empty(self, shape, dtype):
        return torch.full(shape, float("nan"), dtype=dtype)

    def copy(self, dst, src, stream):
        self.ops[stream].append(("copy", dst, src))

    def record(self, stream):
        return None if stream == "compute" else (stream, len(self.ops[stream]))

    def wait(self, stream, event):
        if event is None:
            return
        if stream == "compute":
            self.flush(*event)
        else:
            self.ops[stream].append(("barrier",) + event)

    def synchronize(self, event):
        if event is not None:
            self.flush(*event)

    def flush(self, stream, upto):
        while self.done[stream] < upto:
            op = self.ops[stream][self.done[stream]]
            self.done[stream] += 1
            if op[0] == "copy":
                op[1].copy_(op[2])
            else:
                self.flush(op[1], op[2])

    def keep(self, tensor, event):
        pass

    def finish(self):
        for stream in self.ops:
            self.flush(stream, len(self.ops[stream]))


def test_lazy_copies_give_the_exact_result(model, tmp_path, monkeypatch):
    monkeypatch.setattr(tiling, "Streams", LazyStreams)
    z = latent(model, 5)
    out, report = run(model, z, memory_budget=DEVICE_BUDGET, recompute=False)
    assert report.plan.host
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)
    for budget, share, pieces in ((DEVICE_BUDGET, 0.6, {}), (8_000_000, 0.9, dict(tile_size=16, chunk_frames=9))):
        out, report = disk_run(model, z, tmp_path, budget, share, **pieces)  # whole rows; many row blocks
        assert report.plan.disk
        torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)


@pytest.mark.parametrize("fault", ["compute reads before its copy", "staging buffer reused early"])
def test_lazy_copies_catch_a_broken_schedule(model, tmp_path, monkeypatch, fault):
    """The check above can fail: the same run with one ordering removed is wrong."""
    monkeypatch.setattr(tiling, "Streams", LazyStreams)
    if fault == "compute reads before its copy":
        real_wait = LazyStreams.wait
        monkeypatch.setattr(LazyStreams, "wait", lambda self, s, e: None if s == "compute" else real_wait(self, s, e))
    else:
        def slot(self, nbytes):
            slot = self.ring[self.next_slot]
            self.next_slot = (self.next_slot + 1) % len(self.ring)
            if slot.landing is not None:
                self._land(slot)
            return slot  # without waiting for its last inbound copy
        monkeypatch.setattr(tiers.HostLink, "_slot", slot)
    z = latent(model, 5)
    out, _ = disk_run(model, z, tmp_path, 8_000_000, 0.9, tile_size=16, chunk_frames=9)  # regions of many row blocks
    assert not torch.allclose(out, model.decoder_output(z), atol=1e-3, equal_nan=False)


# ---------------------------------------------------------------------------------------------
# Outputs written over their residual store
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_an_output_written_over_its_residual_is_exact_in_every_tier(model, tmp_path, monkeypatch, tier):
    monkeypatch.setattr(tiling, "Streams", LazyStreams)  # the write over a piece is ordered after its read
    z = latent(model, 5)
    prog = executor.Program(model.decoder.layers(), z.shape)
    stores = frozenset(s.name for s in prog.steps[:-1])
    plan = planner.Plan(tile=16, chunk=3, **({} if tier == "device" else {tier: stores}))
    sched = planner.schedule(prog, plan, 4)
    assert sched.overwrites  # the ResNet blocks whose channels stay the same
    for out, residual in sched.overwrites.items():
        assert prog.shapes[out] == prog.shapes[residual]
        if tier != "device":
            assert sched.offsets[out] == sched.offsets[residual]  # the same bytes of the arena
    with torch.no_grad():
        out = tiling._seamless(model, z, tiling.TilingOptions(disk_dir=tmp_path), planner.DECODE, plan, None)
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)


def test_no_output_is_written_over_a_residual_still_read_through_a_recomputed_input(model):
    """A recomputed first convolution reads the block input with a halo while the second writes."""
    x = video(1, 5, 16, 16, seed=1)
    prog = executor.Program(model.encoder.layers(), x.shape)
    conv2 = [s for s in prog.steps if s.name.endswith(".conv2") and s.shortcut is None]
    assert all(s.out in prog.overwrites() for s in conv2)
    conv1 = frozenset(s.name.replace(".conv2", ".conv1") for s in conv2)
    assert not any(s.out in prog.overwrites(conv1) for s in conv2)


# ---------------------------------------------------------------------------------------------
# Out of memory: the failed attempt's memory is free before the retry
# ---------------------------------------------------------------------------------------------
def test_the_failed_attempt_is_freed_before_the_retry(model, monkeypatch):
    z = latent(model)
    stores, alive_at_free = [], []
    real_take = tiers.StorePool.take

    def take(self, shape):
        t = real_take(self, shape)
        stores.append(weakref.ref(t))
        return t
    monkeypatch.setattr(tiers.StorePool, "take", take)
    calls = []
    real_run = executor.ConvStep.run

    def run_once_oom(self, read, box):
        calls.append(1)
        if len(calls) == 30:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, read, box)
    monkeypatch.setattr(executor.ConvStep, "run", run_once_oom)
    real_free = tiling._free

    def free(device):
        real_free(device)
        alive_at_free.append(sum(r() is not None for r in stores))
    monkeypatch.setattr(tiling, "_free", free)
    out = tiling.decode_latent(model, z, tiling.TilingOptions(tile_size=16, chunk_frames=3))
    assert alive_at_free == [0]
    torch.testing.assert_close(out, model.decoder_output(z), atol=EXACT, rtol=0)


def test_an_output_gpu_named_without_index_is_the_compute_gpu():
    assert tiling.resolve_output_device("cuda", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert tiling.resolve_output_device("cuda:0", torch.device("cuda", 1)) == torch.device("cuda", 0)
    assert tiling.resolve_output_device("cpu", torch.device("cuda", 1)) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Measured RAM
# ---------------------------------------------------------------------------------------------
RSS_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    import cvvae_core
    from cvvae_core import tiling
    from cvvae_core.spec import CVVAEConfig
    torch.manual_seed(0)
    cfg = CVVAEConfig(variant="sd", base_channels=16, channel_mult=(1, 2), blocks_per_level=1, norm_groups=4,
                      latent_channels=4)
    model = cvvae_core.CVVAE(cfg).eval()
    z = torch.randn(1, 4, 5, 48, 48)
    share = float(sys.argv[2])

    def rss(field):
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(field)).split()[1]) * 1024

    whole = tiling.estimate_memory(model, tiling.DECODE, z.shape,
                                   tiling.plan_for(model, tiling.DECODE, z.shape, tiling.TilingOptions())).host
    budget = int(share * whole)
    opts = tiling.TilingOptions(memory_budget=32 << 20, host_memory_budget=budget)
    tiling.decode_latent(model, z, opts)  # the same pass once: the libraries' one-off buffers
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS")
    reports = []
    opts.report = reports.append
    tiling.decode_latent(model, z, opts)
    print(json.dumps({"budget": budget, "growth": rss("VmHWM") - before, "plan": reports[0].describe(),
                      "estimate": reports[0].estimate.host}))
""")


def test_the_host_budget_holds_for_the_measured_peak_rss(tmp_path):
    """In a fresh process (the peak resident set of this one says nothing), after one pass that
    pays the libraries' one-off buffers: RSS growth during a pass stays within the host budget and
    the plan's estimate + 10% (plus 8 MiB of allocator and interpreter slack)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    child = tmp_path / "child.py"
    child.write_text(RSS_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(child), str(ROOT), "0.4"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["estimate"] <= row["budget"]
    assert row["growth"] <= 1.1 * row["budget"] + (8 << 20), row
    assert row["growth"] <= 1.1 * row["estimate"] + (8 << 20), row  # the plan's own figure holds too
