"""The tiling engine (cvvae_core.tiling) on tiny CPU models.

Seamless mode is exact: with the clip-wide GroupNorm statistics it sums itself, every split of
the clip into time chunks and spatial tiles must give the untiled result to float32 rounding
(this proves halos, edge padding, frame order and the statistics at once); a separate test checks
the statistics themselves against the untiled pass's. Under a device budget the layer outputs are
split between the device and host memory, or recomputed, by the same code that runs on CUDA: exact
too, and within the budget the plan estimated.
"""
import math

import pytest
import torch
from torch import nn

import cvvae_core
from cvvae_core.tiling import executor, planner, runner as tiling
from cvvae_core.errors import CancelledError, InputError, OutOfMemoryError, UnsupportedLayerError
from conftest import randomize_, tiny_config, video

EXACT = 2e-5  # float32 rounding through ~20 layers


def small_model(variant):
    # tinier than conftest's: piece-by-piece runs are many small calls
    cfg = tiny_config(variant, base_channels=8, norm_groups=4)
    return randomize_(cvvae_core.CVVAE(cfg)).eval()


@pytest.fixture(scope="module", params=["sd", "sd3"])
def model(request):
    """Both variants: they pad differently (zeros vs replicate, downsampling (0,1) vs (1,1))."""
    return small_model(request.param)


@pytest.fixture(scope="module")
def sd_model():
    return small_model("sd")


# (tile px, chunk frames): odd tiles that divide nothing, chunks that do not divide the clip,
# single-frame chunks with tiles smaller than the receptive field, whole frames with time chunks.
SPLITS = [(24, 3), (16, 1), (1024, 2)]


@pytest.mark.parametrize("tile,chunk", SPLITS)
def test_seamless_encode_equals_untiled(model, tile, chunk):
    x = video(1, 9, 32, 40, seed=1)
    ref = model.encoder_output(x)
    out = tiling.encode_moments(model, x, tiling.TilingOptions(tile_size=tile, chunk_frames=chunk))
    assert out.shape == ref.shape and out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)


@pytest.mark.parametrize("tile,chunk", SPLITS)
def test_seamless_decode_equals_untiled(model, tile, chunk):
    z = torch.randn(1, model.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    ref = model.decoder_output(z)
    out = tiling.decode_latent(model, z, tiling.TilingOptions(tile_size=tile, chunk_frames=chunk))
    assert out.shape == ref.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)
    # frames in order, none lost or duplicated: each output frame is closest to its own reference frame
    dist = torch.cdist(out[0].transpose(0, 1).flatten(1), ref[0].transpose(0, 1).flatten(1))
    assert dist.argmin(dim=1).tolist() == list(range(9))


def test_automatic_cpu_pieces_equal_untiled(sd_model, monkeypatch):
    """The default plan on CPU (pieces capped in bytes, per layer), forced small, in a batch of 2."""
    monkeypatch.setattr(planner, "CPU_PIECE_BYTES", 20_000)
    x = torch.cat([video(1, 5, 24, 32, seed=s) for s in (2, 3)])
    torch.testing.assert_close(tiling.encode_moments(sd_model, x), sd_model.encoder_output(x), atol=EXACT, rtol=0)
    z = sd_model.encode(x)
    torch.testing.assert_close(tiling.decode_latent(sd_model, z), sd_model.decoder_output(z), atol=EXACT, rtol=0)


def _norm_inputs(model, x, decode):
    """Untiled pass, recording every clip-wide GroupNorm's (mean, var) per (batch, group)."""
    stats, hooks = {}, []
    for m in model.modules():
        if isinstance(m, cvvae_core.model.layers.GroupNormSiLU):
            def hook(mod, inp, mod_id=id(m)):
                v = inp[0].reshape(inp[0].shape[0], mod.num_groups, -1)
                var, mean = torch.var_mean(v, dim=2, unbiased=False)
                stats[mod_id] = (mean, var)
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.decoder_output(x) if decode else model.encoder_output(x)
    for h in hooks:
        h.remove()
    return stats


@pytest.mark.parametrize("decode", [False, True])
def test_every_norm_uses_the_clip_wide_statistics(model, monkeypatch, decode):
    x = (torch.randn(1, model.latent_channels, 3, 4, 5, generator=torch.Generator().manual_seed(4)) if decode
         else video(1, 9, 32, 40, seed=4))
    want = _norm_inputs(model, x, decode)
    seen = {}
    real = executor.norm_silu

    def spy(t, norm, mean, var, **kw):
        seen.setdefault(id(norm), []).append((mean, var))
        return real(t, norm, mean, var, **kw)
    monkeypatch.setattr(executor, "norm_silu", spy)
    (tiling.decode_latent if decode else tiling.encode_moments)(model, x, tiling.TilingOptions(tile_size=16,
                                                                                               chunk_frames=2))
    assert set(seen) == set(want)
    for key, uses in seen.items():
        for mean, var in uses:  # every piece, the same clip-wide values
            torch.testing.assert_close(mean, want[key][0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(var, want[key][1], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Memory tiers: device budget, host memory, recomputation
# ---------------------------------------------------------------------------------------------
def psnr(out, ref):
    return 10 * math.log10((ref.max() - ref.min()).item() ** 2 / (out - ref).square().mean().item())


def run_reported(model, what, x, **opts):
    """(result, RunReport) of a seamless pass."""
    reports = []
    run = tiling.encode_moments if what == "encode" else tiling.decode_latent
    out = run(model, x, tiling.TilingOptions(report=reports.append, **opts))
    (report,) = reports
    return out, report


def clip(model, what, latent_frames):
    if what == "encode":
        return video(1, 4 * latent_frames - 3, 32, 40, seed=5)
    return torch.randn(1, model.latent_channels, latent_frames, 4, 6, generator=torch.Generator().manual_seed(5))


# Device budgets (bytes) that hold one 24 px x 3-frame piece and part of the layer outputs: the
# schedule needs 2.1-2.7 MB (encode) / 4.2-5.2 MB (decode) with every output in host memory / on the
# device (these tiny convolutions run through a column buffer on CPU: planner.conv_workspace).
BUDGET = {"encode": 2_400_000, "decode": 4_700_000}


@pytest.mark.parametrize("what", ["encode", "decode"])
def test_a_device_budget_splits_the_stores_exactly(model, what):
    x = clip(model, what, 3)
    ref = model.encoder_output(x) if what == "encode" else model.decoder_output(x)
    out, report = run_reported(model, what, x, tile_size=24, chunk_frames=3, memory_budget=BUDGET[what])
    assert psnr(out, ref) >= 100
    stores = len(executor.Program((model.encoder if what == "encode" else model.decoder).layers(),
                                  x.shape).steps) - 1
    assert 0 < len(report.plan.host) < stores, report.describe()  # some on the device, some in host memory
    assert report.device_peak <= BUDGET[what]
    est = report.estimate
    assert abs(est.total - report.device_peak) <= 0.1 * report.device_peak
    assert abs(est.host - report.host_peak) <= 0.1 * report.host_peak
    assert "in host memory" in report.describe()


@pytest.mark.parametrize("what", ["encode", "decode"])
def test_a_longer_clip_keeps_to_the_device_budget(sd_model, what):
    """A longer clip moves more layer outputs to host memory; the device stays within its budget."""
    budget = BUDGET[what] + (600_000 if what == "decode" else 0)
    hosts = []
    for frames in (2, 5):
        _, report = run_reported(sd_model, what, clip(sd_model, what, frames), tile_size=24, chunk_frames=3,
                                 memory_budget=budget)
        assert report.device_peak <= budget and report.estimate.total <= budget
        hosts.append(report.host_peak)
    assert hosts[1] > 1.3 * hosts[0], hosts


@pytest.mark.parametrize("what", ["encode", "decode"])
def test_recomputing_layer_outputs_is_exact_and_as_estimated(model, what):
    x = clip(model, what, 3)
    ref = model.encoder_output(x) if what == "encode" else model.decoder_output(x)
    opts = dict(tile_size=24, chunk_frames=3, memory_budget=int(1.5 * BUDGET[what]))  # recomputing takes work room
    out, report = run_reported(model, what, x, recompute=True, **opts)
    assert psnr(out, ref) >= 100
    prog = executor.Program((model.encoder if what == "encode" else model.decoder).layers(), x.shape)
    assert report.plan.recompute >= {s.name for s in prog.steps if prog.free_to_recompute(s)} != set()
    assert abs(report.estimate.host - report.host_peak) <= 0.1 * report.host_peak


def test_short_host_memory_makes_the_plan_recompute(sd_model):
    x = clip(sd_model, "decode", 5)
    free = tiling.plan_for(sd_model, tiling.DECODE, x.shape, tiling.TilingOptions(memory_budget=BUDGET["decode"]))
    assert not free.recompute
    host = tiling.estimate_memory(sd_model, tiling.DECODE, x.shape, free).host
    short_host = int(0.8 * host)
    opts = tiling.TilingOptions(memory_budget=BUDGET["decode"], host_memory_budget=short_host)
    short = tiling.plan_for(sd_model, tiling.DECODE, x.shape, opts)
    assert short.recompute and "recomputed" in short.describe()
    assert tiling.estimate_memory(sd_model, tiling.DECODE, x.shape, short).host <= short_host
    out, report = run_reported(sd_model, "decode", x, memory_budget=BUDGET["decode"], host_memory_budget=short_host)
    assert report.plan == short and psnr(out, sd_model.decoder_output(x)) >= 100


def test_automatic_pieces_under_a_device_budget(sd_model):
    """No sizes given: pieces from a share of the budget, stores placed around them."""
    x = clip(sd_model, "encode", 5)
    out, report = run_reported(sd_model, "encode", x, memory_budget=1_000_000)
    assert report.plan.piece_bytes == int(1_000_000 * planner.PIECE_SHARE) and report.plan.host
    assert report.device_peak <= 1_000_000
    assert psnr(out, sd_model.encoder_output(x)) >= 100


def test_the_whole_clip_plan_is_the_untiled_pass(model):
    x = video(1, 5, 24, 32, seed=4)
    out = tiling._seamless(model, x, tiling.TilingOptions(), tiling.ENCODE, tiling.Plan(), None)
    assert torch.equal(out, model.encoder_output(x))
    # one piece per layer streamed: the same to rounding
    one_piece = tiling.encode_moments(model, x, tiling.TilingOptions(tile_size=64, chunk_frames=8))
    torch.testing.assert_close(one_piece, out, atol=EXACT, rtol=0)


class _Unknown(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("insert", ["unknown", "norm_before_attention"])
def test_a_layer_the_engine_does_not_know_is_refused_before_any_work(sd_model, monkeypatch, insert):
    layers = list(sd_model.encoder.layers())
    if insert == "unknown":
        layers.insert(3, ("extra", _Unknown()))
        match = "'extra' \\(_Unknown\\) has no handler"
    else:
        at = [n for n, _ in layers].index("mid.attn_1")
        layers.insert(at, ("norm_extra", sd_model.encoder.norm_out))
        match = "must be followed by a convolution"
    monkeypatch.setattr(sd_model.encoder, "layers", lambda: iter(layers))
    ran = []
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: ran.append(1))
    with pytest.raises(UnsupportedLayerError, match=match):
        tiling.encode_moments(sd_model, video(1, 5, 16, 16), tiling.TilingOptions(tile_size=8, chunk_frames=2))
    assert not ran


def test_pieces_cover_each_output_once():
    cover = torch.zeros(7, 30, 41, dtype=torch.int32)
    boxes = executor.pieces((1, 1, 7, 30, 41), (3, 8, 16))
    for (a, z), (r0, r1), (c0, c1) in boxes:
        cover[a:z, r0:r1, c0:c1] += 1
        assert z - a <= 3 and r1 - r0 <= 8 and c1 - c0 <= 16
    assert torch.all(cover == 1)
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes)  # time-major: frames fill in order


# ---------------------------------------------------------------------------------------------
# Official mode against a plain re-statement of CVVAEModel.tiled_encode / tiled_decode
# ---------------------------------------------------------------------------------------------
def _blend_v(a, b, n):
    w = (torch.arange(n).view(1, 1, 1, -1, 1) / n)
    b[:, :, :, :n, :] = (1 - w) * a[:, :, :, -n:, :] + w * b[:, :, :, :n, :]
    return b


def _blend_h(a, b, n):
    w = (torch.arange(n).view(1, 1, 1, 1, -1) / n)
    b[:, :, :, :, :n] = (1 - w) * a[:, :, :, :, -n:] + w * b[:, :, :, :, :n]
    return b


def _official_spatial(fn, x, tile, stride, overlap, out_stride):
    rows = []
    for i in range(0, x.shape[3], stride):
        cols = []
        for j in range(0, x.shape[4], stride):
            cols.append(fn(x[:, :, :, i:i + tile, j:j + tile]))
            if j + tile >= x.shape[4]:
                break
        rows.append(cols)
        if i + tile >= x.shape[3]:
            break
    result = []
    for i, cols in enumerate(rows):
        for j, t in enumerate(cols):
            if i > 0:
                t = _blend_v(rows[i - 1][j], t, overlap)
            if j > 0:
                t = _blend_h(cols[j - 1], t, overlap)
    for i, cols in enumerate(rows):
        for j, t in enumerate(cols):
            if i < len(rows) - 1:
                t = t[:, :, :, :out_stride, :]
            if j < len(cols) - 1:
                t = t[:, :, :, :, :out_stride]
            cols[j] = t
        result.append(torch.cat(cols, dim=4))
    return torch.cat(result, dim=3)


def official_reference(model, x, p, r, f, decode):
    lat = p // 8
    if decode:
        stride, overlap, out_stride, step = round(lat * (1 - r)), round(p * r), p - round(p * r), f // 4
        fn, size = model.decoder, lat
    else:
        stride, overlap, out_stride, step = round(p * (1 - r)), round(lat * r), lat - round(lat * r), f
        fn, size = model.encoder, p
    out = []
    for n in range(max(1, math.ceil((x.shape[2] - 1) / step))):
        y = _official_spatial(fn, x[:, :, n * step:(n + 1) * step + 1], size, stride, overlap, out_stride)
        out.append(y if n == 0 else y[:, :, 1:])
    return torch.cat(out, dim=2)


def test_official_mode_equals_the_official_algorithm(model):
    x = video(1, 9, 80, 128, seed=7)  # 2 x 2 tiles of 72 px, 2 chunks
    opts = tiling.TilingOptions(mode="official", tile_size=72, chunk_frames=4)
    with torch.no_grad():
        enc_ref = official_reference(model, x, 72, 0.2222, 4, decode=False)
        z = enc_ref[:, :model.latent_channels]
        dec_ref = official_reference(model, z, 72, 0.2222, 4, decode=True)
    torch.testing.assert_close(tiling.encode_moments(model, x, opts), enc_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiling.decode_latent(model, z, opts), dec_ref, atol=1e-6, rtol=0)
    # and it is a different function from the untiled model (why seamless exists)
    assert (enc_ref - model.encoder_output(x)).abs().max() > 1e-2


def test_official_mode_rejects_tile_sizes_the_official_code_misaligns(model):
    with pytest.raises(InputError, match="multiple of 72"):
        tiling.encode_moments(model, video(1, 5, 64, 64), tiling.TilingOptions(mode="official", tile_size=64))


# ---------------------------------------------------------------------------------------------
# Out of memory, cancellation, progress
# ---------------------------------------------------------------------------------------------
def _fail_above(monkeypatch, max_voxels):
    """Simulate the allocator failing whenever a 3-D convolution gets more than ``max_voxels``
    (frames x height x width) of input; record the input sizes it was given."""
    sizes = []
    real = torch.nn.functional.conv3d

    def conv3d(x, *args, **kw):
        sizes.append(tuple(x.shape[2:]))
        if x.shape[2:].numel() > max_voxels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(x, *args, **kw)
    monkeypatch.setattr(torch.nn.functional, "conv3d", conv3d)
    return sizes


def test_out_of_memory_retries_with_smaller_pieces(sd_model, monkeypatch):
    x = video(1, 9, 16, 24, seed=8)
    ref = sd_model.encoder_output(x)
    sizes = _fail_above(monkeypatch, 4 * 18 * 26)  # conv_in input (time- and space-padded) up to 4 frames fits
    out = tiling.encode_moments(sd_model, x, tiling.TilingOptions(chunk_frames=16))
    first = [t for t, h, w in sizes if (h, w) == (18, 26)]
    # the whole clip (9 frames + 2 causal padding) failed, then shorter chunks, until chunks that fit ran
    failed = [i for i, t in enumerate(first) if t > 4]
    assert first[0] == 11 and len(failed) >= 2 and max(first[failed[-1] + 1:]) <= 4
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)


def test_out_of_memory_at_the_floor_says_what_to_lower(sd_model, monkeypatch):
    _fail_above(monkeypatch, 0)  # nothing fits
    with pytest.raises(OutOfMemoryError, match="Lower the resolution"):
        tiling.encode_moments(sd_model, video(1, 5, 16, 16), tiling.TilingOptions(chunk_frames=8))
    with pytest.raises(OutOfMemoryError, match="official mode"):
        monkeypatch.setattr(sd_model.encoder, "forward",
                            lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
        tiling.encode_moments(sd_model, video(1, 5, 16, 16), tiling.TilingOptions(mode="official"))


@pytest.mark.parametrize("mode", ["seamless", "official"])
def test_cancellation_stops_within_one_piece(sd_model, mode):
    seen = []
    opts = tiling.TilingOptions(mode=mode, tile_size=72 if mode == "official" else 24, chunk_frames=4,
                                progress=lambda done, total: seen.append((done, total)),
                                cancel=lambda: len(seen) >= 3)
    with pytest.raises(CancelledError):
        tiling.encode_moments(sd_model, video(1, 9, 80, 128), opts)
    assert len(seen) == 3 and seen[-1][1] > 3  # asked after the 3rd of many pieces: not one more ran


def test_progress_is_monotone_and_ends_at_the_total(sd_model):
    seen = []
    opts = tiling.TilingOptions(tile_size=24, chunk_frames=4, progress=lambda d, t: seen.append((d, t)))
    tiling.encode_moments(sd_model, video(1, 9, 32, 48), opts)
    done = [d for d, _ in seen]
    assert len(done) > 50 and done == sorted(done) and done[-1] == tiling.PROGRESS_UNITS
    assert all(t == tiling.PROGRESS_UNITS for _, t in seen)


def _count_work(monkeypatch):
    """Count the multiply-adds of every convolution, linear map and attention as it runs."""
    work = [0]
    F = torch.nn.functional

    def conv(real):
        def run(x, weight, *args, **kw):
            y = real(x, weight, *args, **kw)
            work[0] += y.numel() * weight[0].numel()
            return y
        return run

    def linear(x, weight, *args, **kw):
        y = real_linear(x, weight, *args, **kw)
        work[0] += y.numel() * weight.shape[1]
        return y

    def sdpa(q, k, v, *args, **kw):
        work[0] += 2 * q.numel() * k.shape[-2]
        return real_sdpa(q, k, v, *args, **kw)
    real_linear, real_sdpa = F.linear, F.scaled_dot_product_attention
    for name in ("conv2d", "conv3d"):
        monkeypatch.setattr(F, name, conv(getattr(F, name)))
    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return work


# The progress fraction after each piece against the fraction of the work actually done, in
# whole thousandths: within 2 % at every step.
PROGRESS_TOL = 0.02


@pytest.mark.parametrize("what,tile,chunk,frames", [
    ("encode", 24, 4, 9),    # spatial tiles, a 1-frame last chunk
    ("decode", 16, 4, 13),   # the temporal attention's two parts, upsamplers
    ("decode", 64, 8, 13),   # whole frames, unequal chunks
])
def test_progress_tracks_the_work_done(sd_model, monkeypatch, what, tile, chunk, frames):
    x = video(1, frames, 32, 48, seed=3)
    if what == "decode":
        x = sd_model.encode(x)
    work = _count_work(monkeypatch)
    seen = []
    opts = tiling.TilingOptions(tile_size=tile, chunk_frames=chunk,
                                progress=lambda d, t: seen.append((d / t, work[0])))
    (tiling.encode_moments if what == "encode" else tiling.decode_latent)(sd_model, x, opts)
    assert seen[-1][0] == 1.0
    for reported, done in seen:
        assert abs(reported - done / work[0]) <= PROGRESS_TOL, [(round(r, 3), round(d / work[0], 3)) for r, d in seen]


def test_options_are_checked():
    for mode in ("fast", "none"):  # untiled is tiling=None, not a mode
        with pytest.raises(InputError, match="mode"):
            tiling.TilingOptions(mode=mode)
    with pytest.raises(InputError, match="multiple of 8"):
        tiling.TilingOptions(tile_size=100)


def test_model_api_routes_through_the_engine(sd_model):
    x = video(1, 5, 24, 32, seed=9)
    z = sd_model.encode(x, tiling=tiling.TilingOptions(tile_size=16, chunk_frames=2))
    assert z.dtype == torch.float32 and z.device.type == "cpu"
    torch.testing.assert_close(z, sd_model.encode(x), atol=EXACT, rtol=0)
    y = sd_model.decode(z, tiling=tiling.TilingOptions(tile_size=16, chunk_frames=4))
    assert y.shape == (1, 3, 5, 24, 32) and y.device.type == "cpu"
