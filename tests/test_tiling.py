"""The tiling/streaming engine (cvvae_core.tiling, cvvae_core.streaming) on tiny CPU models.

Seamless mode is checked in two layers: with the clip-wide GroupNorm statistics of the untiled
pass injected, every tile/chunk split must give the untiled result to float32 rounding (this
proves the time caches, halos, frame order and crops); with the statistics it gathers itself, it
must beat tile-local statistics and stay within the stated tolerance.
"""
import math

import pytest
import torch

import cvvae_core
from cvvae_core import streaming, tiling
from cvvae_core.errors import CancelledError, InputError, OutOfMemoryError
from conftest import randomize_, tiny_config, video

EXACT = 2e-5  # float32 rounding through ~20 layers


def small_model(variant):
    # tinier than conftest's: tile-by-tile runs are many small calls
    cfg = tiny_config(variant, base_channels=8, norm_groups=4)
    return randomize_(cvvae_core.CVVAE(cfg)).eval()


@pytest.fixture(scope="module", params=["sd", "sd3"])
def model(request):
    """Both variants: they pad differently (zeros vs replicate, Downsample (0,1) vs (1,1))."""
    return small_model(request.param)


@pytest.fixture(scope="module")
def sd_model():
    return small_model("sd")


def clip_stats(model, x, decode):
    """Untiled pass, recording every 5-D GroupNorm's (mean, var) per (batch, group)."""
    stats, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            def hook(mod, inp, out, name=name):
                i = inp[0]
                if i.dim() == 5:
                    var, mean = torch.var_mean(i.reshape(i.shape[0], mod.num_groups, -1), dim=2, unbiased=False)
                    stats[name] = (mean, var)
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        y = model.decode_latent(x) if decode else model.encode_moments(x)
    for h in hooks:
        h.remove()
    return y, stats


@pytest.fixture
def exact_stats(monkeypatch):
    """Make the statistics pass hand over the given clip-wide statistics instead of its own."""
    holder = {}

    def freeze(book):
        book.frozen, book._acc = holder["stats"], {}
    monkeypatch.setattr(streaming.StatsBook, "freeze", freeze)
    return holder


# (tile px, chunk frames): odd tile cores that do not divide the frame, chunks that do not
# divide the clip, single-frame chunks, and whole frames with time chunks only.
SPLITS = [(24, 3), (1024, 1)]


@pytest.mark.parametrize("tile,chunk", SPLITS)
def test_seamless_encode_equals_untiled_given_clip_statistics(model, exact_stats, tile, chunk):
    x = video(1, 9, 32, 40, seed=1)
    ref, exact_stats["stats"] = clip_stats(model, x, decode=False)
    out = tiling.encode_moments(model, x, tiling.TilingOptions(tile_size=tile, chunk_frames=chunk))
    assert out.shape == ref.shape and out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)


@pytest.mark.parametrize("tile,chunk", SPLITS)
def test_seamless_decode_equals_untiled_given_clip_statistics(model, exact_stats, tile, chunk):
    z = torch.randn(1, model.latent_channels, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    ref, exact_stats["stats"] = clip_stats(model, z, decode=True)
    out = tiling.decode_latent(model, z, tiling.TilingOptions(tile_size=tile, chunk_frames=chunk))
    assert out.shape == ref.shape == (1, 3, 9, 32, 48)
    torch.testing.assert_close(out, ref, atol=EXACT, rtol=0)
    # frames in order, none lost or duplicated: each output frame is closest to its own reference frame
    dist = torch.cdist(out[0].transpose(0, 1).flatten(1), ref[0].transpose(0, 1).flatten(1))
    assert dist.argmin(dim=1).tolist() == list(range(9))


def test_seamless_one_tile_one_chunk_is_the_untiled_pass(model):
    x = video(1, 5, 24, 32, seed=4)
    out = tiling.encode_moments(model, x, tiling.TilingOptions(tile_size=64, chunk_frames=8))
    assert torch.equal(out, model.encode_moments(x))


def test_gathered_statistics_beat_tile_local_ones(model):
    """The statistics pass must bring tiles closer to the untiled result than per-tile norms."""
    x = video(1, 9, 32, 40, seed=5)
    ref = model.encode_moments(x)
    err = {}
    for passes in (0, 1):
        out = tiling.encode_moments(model, x, tiling.TilingOptions(tile_size=24, chunk_frames=4, stats_passes=passes))
        err[passes] = (out - ref).abs().max().item()
    assert err[1] < 0.5 * err[0]
    # Stated tolerance on this random tiny model (noise input, 4 tiles x 3 chunks): max |diff| < 0.3
    # of latents of magnitude ~2; real weights and content are far smoother (see bench/).
    assert err[1] < 0.3


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
    assert (enc_ref - model.encode_moments(x)).abs().max() > 1e-2


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


def test_out_of_memory_retries_with_shorter_chunks(sd_model, monkeypatch):
    x = video(1, 9, 16, 24, seed=8)
    ref = tiling.encode_moments(sd_model, x, tiling.TilingOptions(chunk_frames=4))
    sizes = _fail_above(monkeypatch, 7 * 18 * 26)  # conv_in input (time- and space-padded) up to 7 frames fits
    out = tiling.encode_moments(sd_model, x, tiling.TilingOptions(chunk_frames=16))
    first = [t for t, h, w in sizes if (h, w) == (18, 26)]
    assert first[:3] == [11, 10, 6]  # whole clip failed, then 8-frame chunks, then 4-frame chunks ran
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_out_of_memory_at_the_floor_says_what_to_lower(sd_model, monkeypatch):
    _fail_above(monkeypatch, 0)  # nothing fits
    with pytest.raises(OutOfMemoryError, match="Lower the resolution"):
        tiling.encode_moments(sd_model, video(1, 5, 16, 16), tiling.TilingOptions(chunk_frames=8))
    with pytest.raises(OutOfMemoryError, match="official mode"):
        monkeypatch.setattr(sd_model.encoder, "forward",
                            lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
        tiling.encode_moments(sd_model, video(1, 5, 16, 16), tiling.TilingOptions(mode="official"))


@pytest.mark.parametrize("mode", ["seamless", "official"])
def test_cancellation_stops_within_one_tile(sd_model, mode):
    seen = []
    opts = tiling.TilingOptions(mode=mode, tile_size=72 if mode == "official" else 24, chunk_frames=4,
                                progress=lambda done, total: seen.append((done, total)),
                                cancel=lambda: len(seen) >= 3)
    with pytest.raises(CancelledError):
        tiling.encode_moments(sd_model, video(1, 9, 80, 128), opts)
    assert len(seen) == 3 and seen[-1][1] > 3  # asked after the 3rd of many tiles: not one more ran


def test_progress_reports_every_tile_once_and_ends_at_the_total(sd_model):
    seen = []
    opts = tiling.TilingOptions(tile_size=24, chunk_frames=4, progress=lambda d, t: seen.append((d, t)))
    tiling.encode_moments(sd_model, video(1, 9, 32, 48), opts)
    # (2 statistics passes, the default with spatial tiles, + output pass) x 4 tiles x 3 chunks + the mid-block
    assert len(seen) == 3 * 4 * 3 + 1
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == tiling.PROGRESS_UNITS
    assert all(t == tiling.PROGRESS_UNITS for _, t in seen)


def test_one_statistics_pass_by_default_for_whole_frames(sd_model):
    seen = []
    opts = tiling.TilingOptions(tile_size=64, chunk_frames=4, progress=lambda d, t: seen.append((d, t)))
    tiling.encode_moments(sd_model, video(1, 9, 32, 48), opts)
    assert len(seen) == 2 * 1 * 3 + 1  # (1 statistics pass + output pass) x 1 tile x 3 chunks + the mid-block


def _count_conv_work(monkeypatch):
    """Count the multiply-adds of every real (not meta-device) convolution as it runs."""
    work = [0]

    def counting(real):
        def conv(x, weight, *args, **kw):
            y = real(x, weight, *args, **kw)
            if y.device.type != "meta":
                work[0] += y.numel() * weight[0].numel()
            return y
        return conv
    for name in ("conv2d", "conv3d"):
        monkeypatch.setattr(torch.nn.functional, name, counting(getattr(torch.nn.functional, name)))
    return work


# The progress fraction after each step against the fraction of convolution work actually done.
# The estimate also counts attention and linear layers (small at these sizes) and reports whole
# thousandths: within 2 % of the work at every step.
PROGRESS_TOL = 0.02


@pytest.mark.parametrize("what,tile,chunk,frames", [
    ("encode", 24, 4, 9),    # 2 statistics passes + output pass, spatial tiles, a 1-frame last chunk
    ("decode", 16, 4, 13),   # the whole-sequence middle first, then 2 gathering passes + output pass
    ("decode", 64, 8, 13),   # whole frames: 1 gathering pass + output pass, unequal chunks
])
def test_progress_tracks_the_work_done(sd_model, monkeypatch, what, tile, chunk, frames):
    x = video(1, frames, 32, 48, seed=3)
    if what == "decode":
        x = sd_model.encode(x)
    work = _count_conv_work(monkeypatch)
    seen = []
    opts = tiling.TilingOptions(tile_size=tile, chunk_frames=chunk,
                                progress=lambda d, t: seen.append((d / t, work[0])))
    (tiling.encode_moments if what == "encode" else tiling.decode_latent)(sd_model, x, opts)
    assert seen[-1][0] == 1.0
    for reported, done in seen:
        assert abs(reported - done / work[0]) <= PROGRESS_TOL, [(round(r, 3), round(d / work[0], 3)) for r, d in seen]


def test_tiles_cover_the_frame_once_and_stay_aligned():
    tiles = streaming.make_tiles(72, 200, 48, 16, 8)
    cover = torch.zeros(72, 200, dtype=torch.int32)
    for t in tiles:
        cover[t.r0:t.r1, t.c0:t.c1] += 1
        assert all(v % 8 == 0 for v in (t.r0, t.r1, t.c0, t.c1, t.hr0, t.hc0))
        assert t.r1 - t.r0 <= 48 and t.c1 - t.c0 <= 48
    assert torch.all(cover == 1)


def test_options_are_checked():
    with pytest.raises(InputError, match="mode"):
        tiling.TilingOptions(mode="fast")
    with pytest.raises(InputError, match="multiple of 8"):
        tiling.TilingOptions(tile_size=100)


def test_model_api_routes_through_the_engine(sd_model):
    x = video(1, 5, 24, 32, seed=9)
    z = sd_model.encode(x, tiling=tiling.TilingOptions(mode="none"))
    torch.testing.assert_close(z, sd_model.encode(x), atol=0, rtol=0)
    y = sd_model.decode(z, tiling=tiling.TilingOptions(tile_size=16, chunk_frames=4))
    assert y.shape == (1, 3, 5, 24, 32) and y.device.type == "cpu"
