"""Node logic against a minimal stand-in for ComfyUI (tests/comfy_stub), with a tiny random CV-VAE."""
import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from pack_loader import ROOT, load_pack  # noqa: E402

pack = load_pack()
import comfy.model_management as mm  # noqa: E402  (the stand-in)
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from cvvae_pack import cvvae_core  # noqa: E402
from cvvae_pack.cvvae_core.tiling import DECODE  # noqa: E402
from cvvae_pack.nodes import comfy_vae, nodes  # noqa: E402

TINY = cvvae_core.CVVAEConfig(variant="sd", latent_channels=4, base_channels=8, channel_mult=(1, 2, 2, 2),
                              blocks_per_level=1, norm_groups=4)
TINY_SD3 = cvvae_core.CVVAEConfig(variant="sd3", latent_channels=16, base_channels=8, channel_mult=(1, 2, 2, 2),
                                  blocks_per_level=1, norm_groups=4, scaling_factor=1.5305, shift_factor=0.0609)


def run(node, **kw):
    return node.execute(**kw).args


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    """A tiny SD-variant model in models/vae and an SD3-variant one in models/cvvae."""
    torch.manual_seed(0)
    base = Path(folder_paths.models_dir)
    sd = cvvae_core.save_model(cvvae_core.CVVAE(TINY), base / "vae" / "tiny_cvvae.safetensors")
    sd3 = cvvae_core.save_model(cvvae_core.CVVAE(TINY_SD3), base / "cvvae" / "tiny_cvvae_sd3.safetensors")
    from safetensors.torch import save_file
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(base / "vae" / "image_vae.safetensors"))
    return {"sd": sd, "sd3": sd3}


@pytest.fixture
def vae(models):
    return run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="auto")[0]


@pytest.fixture(autouse=True)
def reset_stub():
    mm.interrupt_processing = False
    mm.LOADS.clear()
    mm.EMPTY_CACHE_CALLS.clear()
    comfy.utils.UPDATES.clear()
    yield
    mm.interrupt_processing = False


def frames(n, h=16, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


# Registration ------------------------------------------------------------------------------------
def test_registers_through_v3_entrypoint_only():
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS"), "NODE_CLASS_MAPPINGS would make ComfyUI ignore comfy_entrypoint"
    ext = asyncio.run(pack.comfy_entrypoint())
    ids = [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())]
    assert ids == ["CVVAELoader", "CVVAEVideoEncode", "CVVAEVideoDecode", "CVVAELatentAdapter", "CVVAESyntheticVideo",
                   "CVVAETuneSVDOutputLayer", "CVVAEApplySVDOutputLayer"]


def test_every_input_has_a_tooltip_and_nodes_share_one_menu(models):
    for node in nodes.NODES:
        s = node.define_schema()
        assert s.category.split("/")[0] == "CV-VAE", s.node_id
        assert s.description, s.node_id
        for i in s.inputs:
            assert i.tooltip and len(i.tooltip) > 15, f"{s.node_id}.{i.id} has no tooltip"


def test_old_comfyui_logs_one_line_and_loads_nothing(caplog):
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "comfy_api" or k.startswith("comfy_api.")}
    sys.modules["comfy_api"] = None  # makes `import comfy_api...` fail as on ComfyUI < 0.3.48
    try:
        spec = importlib.util.spec_from_file_location("cvvae_pack_old", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        with caplog.at_level(logging.INFO):
            spec.loader.exec_module(mod)
    finally:
        del sys.modules["comfy_api"]
        sys.modules.update(saved)
    assert not hasattr(mod, "comfy_entrypoint") and not hasattr(mod, "NODE_CLASS_MAPPINGS")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "0.3.48" in lines[0] and "update ComfyUI" in lines[0], lines


# Loader ------------------------------------------------------------------------------------------
def test_loader_lists_vae_and_cvvae_folders_and_builtin_only_when_present(models, monkeypatch, tmp_path):
    names = nodes.model_choices()
    assert "tiny_cvvae.safetensors" in names and "tiny_cvvae_sd3.safetensors" in names
    assert names[0] == nodes.BUILTIN_NAME  # the pack ships its demo model
    monkeypatch.setattr(cvvae_core.io.builtin, "WEIGHTS_DIR", tmp_path / "missing")
    assert nodes.BUILTIN_NAME not in nodes.model_choices()
    builtin = cvvae_core.save_model(cvvae_core.CVVAE(TINY), tmp_path / "builtin.safetensors")
    monkeypatch.setattr(nodes, "builtin_path", lambda: str(builtin))
    assert nodes.model_choices()[0] == nodes.BUILTIN_NAME
    vae = run(nodes.CVVAELoader, model_name=nodes.BUILTIN_NAME)[0]
    assert vae.latent_channels == 4


def test_loader_returns_a_comfy_vae_loaded_once_per_file(models, caplog):
    with caplog.at_level(logging.WARNING):
        a = run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="auto")[0]
    assert "No VAE weights detected" not in caplog.text
    b = run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="auto")[0]
    assert a is b
    import comfy.sd
    assert isinstance(a, comfy.sd.VAE)
    assert (a.latent_dim, a.latent_channels, a.vae_dtype) == (3, 4, torch.float32)
    assert a.spacial_compression_decode() == 8 and a.spacial_compression_encode() == 8
    assert a.temporal_compression_decode() == 4
    assert a.upscale_index_formula == (4, 8, 8) and a.downscale_ratio[0](17) == 5
    assert a.patcher.model is a.first_stage_model and a.disable_offload
    half = run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="fp16")[0]
    assert half is not a and half.vae_dtype == torch.float16
    sd3 = run(nodes.CVVAELoader, model_name="tiny_cvvae_sd3.safetensors", dtype="auto")[0]
    assert sd3.latent_channels == 16


def test_loader_wrong_file_gives_the_core_clear_error(models):
    with pytest.raises(cvvae_core.CheckpointError) as e:
        run(nodes.CVVAELoader, model_name="image_vae.safetensors", dtype="auto")
    assert "vae3d" in str(e.value)
    with pytest.raises(FileNotFoundError, match="models/cvvae"):
        run(nodes.CVVAELoader, model_name="missing.safetensors", dtype="auto")


# Core VAE nodes' view ------------------------------------------------------------------------------
def test_core_encode_is_framewise_and_4d_decode_is_per_frame_image_decode(vae):
    imgs = frames(3, 20, 27)  # core crops to 16x24
    lat = vae.encode(imgs)
    assert lat.shape == (3, 4, 2, 3)  # one image latent per frame, like an SD VAE
    single = vae.encode(imgs[:1])
    assert single.shape == (1, 4, 2, 3)  # what SVD_img2vid_Conditioning needs
    torch.testing.assert_close(single, lat[:1])
    out = vae.decode(lat)
    assert out.shape == (3, 16, 24, 3) and 0 <= out.min() and out.max() <= 1
    model = vae.cvvae_model
    one = ((model.decode(lat[1:2].unsqueeze(2))[:, :, 0] + 1) / 2).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out[1:2], one)  # each latent frame decoded as a 1-frame video (an image)
    assert vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2).shape == (3, 16, 24, 3)
    assert vae.encode_tiled(imgs).shape == (3, 4, 2, 3)
    assert all(force for _, _, force in mm.LOADS) and all(mem > 0 for _, mem, _ in mm.LOADS)


def test_core_decode_of_a_5d_latent_is_a_video_decode(vae):
    lat = torch.randn(1, 4, 3, 2, 3)
    out = vae.decode(lat)
    assert out.shape == (1, 9, 16, 24, 3)  # [B, T, H, W, C]: core VAEDecode flattens to 9 frames


def record_decode_calls(vae, monkeypatch) -> list:
    """Wrap the first stage's decode; returns the list of output_buffer arguments it receives."""
    buffers, decode = [], vae.first_stage_model.decode

    def spy(z, output_buffer=None, **kw):
        buffers.append(output_buffer)
        return decode(z, output_buffer=output_buffer, **kw)
    monkeypatch.setattr(vae.first_stage_model, "decode", spy)
    return buffers


def reference_video(vae, lat):
    return ((vae.cvvae_model.decode(lat) + 1) / 2).clamp(0, 1).movedim(1, -1)


# ComfyUI generations (comfy.sd.GENERATION in the stand-in): 0.3x and newer read comfy_has_chunked_io,
# 0.8.0 does not. The CV-VAE asks for chunked io when ComfyUI's output lives on another device than
# the model (GPU decode, output in CPU RAM): the stand-in runs on CPU, so the tests move the "output
# device" away.
GENERATIONS = {"comfy-0.33-chunked": ("0.33", "cuda"), "comfy-0.38-chunked": ("0.38", "cuda"),
               "comfy-0.33-same-device": ("0.33", "cpu"), "comfy-0.8": ("0.8", "cuda")}


@pytest.fixture(params=list(GENERATIONS))
def generation(request, monkeypatch):
    """Whether the stand-in ComfyUI takes its chunked-io branch for the CV-VAE in this case."""
    import comfy.sd
    version, output_device = GENERATIONS[request.param]
    monkeypatch.setattr(comfy.sd, "GENERATION", version)
    monkeypatch.setattr(mm, "intermediate_device", lambda: torch.device(output_device))
    return comfy.sd.since("0.33") and output_device != "cpu"


def test_chunked_io_is_asked_for_only_when_the_output_is_on_another_device(vae, generation):
    assert vae.first_stage_model.comfy_has_chunked_io == (mm.intermediate_device() != vae.cvvae_model.device)


def test_core_decode_of_a_5d_latent_with_and_without_chunked_io(vae, monkeypatch, generation):
    """Chunked: ComfyUI preallocates the output and the CV-VAE fills it in place (no second full
    copy); otherwise ComfyUI gets a returned tensor. Same pixels either way."""
    buffers = record_decode_calls(vae, monkeypatch)
    lat = torch.randn(2, 4, 3, 2, 3)
    out = vae.decode(lat)
    assert out.shape == (2, 9, 16, 24, 3)
    torch.testing.assert_close(out, reference_video(vae, lat))
    if generation:
        assert len(buffers) == 1 and buffers[0].shape == vae.first_stage_model.decode_output_shape(lat.shape)
        # the result IS ComfyUI's preallocated buffer, filled in place
        assert out.untyped_storage().data_ptr() == buffers[0].untyped_storage().data_ptr()
    else:
        assert buffers == [None]


def test_batched_core_decode_fills_each_slice_of_the_output(vae, monkeypatch, generation):
    """Free memory for two images at a time: ComfyUI hands out slices [0:2] and [2:3] of its output."""
    lat = torch.randn(3, 4, 2, 3)
    monkeypatch.setattr(mm, "FREE_MEMORY", 2 * vae.memory_used_decode(lat.unsqueeze(2).shape, vae.vae_dtype))
    buffers = record_decode_calls(vae, monkeypatch)
    out = vae.decode(lat)
    assert [None if b is None else b.shape[0] for b in buffers] == ([2, 1] if generation else [None, None])
    torch.testing.assert_close(out, reference_video(vae, lat.unsqueeze(2))[:, 0])


def test_core_encode_with_and_without_chunked_io(vae, monkeypatch, generation):
    devices, encode = [], vae.first_stage_model.encode

    def spy(x, device=None):
        devices.append(device)
        return encode(x, device=device)
    monkeypatch.setattr(vae.first_stage_model, "encode", spy)
    imgs = frames(2)
    lat = vae.encode(imgs)
    assert devices == ([vae.device] if generation else [None])
    ref = vae.cvvae_model.encode(imgs.movedim(-1, 1).unsqueeze(2) * 2 - 1)[:, :, 0]
    torch.testing.assert_close(lat, ref)


def test_decode_output_shape_is_what_decode_returns(vae):
    stage = vae.first_stage_model
    lat = torch.randn(1, 4, 4, 3, 5)
    assert tuple(stage.decode(lat).shape) == stage.decode_output_shape(lat.shape) == (1, 3, 13, 24, 40)


def test_memory_estimates_grow_with_frames_and_dtype(vae):
    a = vae.memory_used_decode((1, 4, 2, 8, 8), torch.float32)
    assert vae.memory_used_decode((1, 4, 5, 8, 8), torch.float32) > 2 * a
    # the model runs in the dtype it was built in: half the activations (and no float32 column buffers
    # on CPU); the float32 output (on this one-device host) stays
    half = run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="fp16")[0]
    assert 0 < half.memory_used_decode((1, 4, 2, 8, 8), torch.float16) < a / 2
    assert vae.memory_used_decode((3, 4, 8, 8), torch.float32) > 0
    assert vae.memory_used_encode((1, 3, 9, 64, 64), torch.float32) > vae.memory_used_encode((1, 3, 1, 64, 64),
                                                                                             torch.float32)


@pytest.mark.parametrize("node,what", [("CVVAEVideoEncode", "encode"), ("CVVAEVideoDecode", "decode")])
def test_node_memory_request_and_engine_plan_come_from_one_estimate(vae, monkeypatch, node, what):
    """The bytes a node asks ComfyUI to free are the engine's own estimate of the plan it then runs."""
    from cvvae_pack.cvvae_core.tiling import runner as tiling
    from cvvae_pack.nodes import runtime
    estimates, plans = [], []
    real_estimate, real_seamless = tiling.estimate_memory, tiling._seamless

    def estimate(model, direction, shape, plan, *args, **kw):
        result = real_estimate(model, direction, shape, plan, *args, **kw)
        estimates.append((direction.name, tuple(shape), plan, result.total))
        return result

    def seamless(model, x, opts, direction, plan, group):
        plans.append(plan)
        return real_seamless(model, x, opts, direction, plan, group)
    monkeypatch.setattr(tiling, "estimate_memory", estimate)
    monkeypatch.setattr(tiling, "_seamless", seamless)
    imgs = frames(9, 32, 40)
    lat = {"samples": vae.cvvae_model.encode(runtime.images_to_video(imgs))}
    kwargs = dict(images=imgs, frame_policy="error") if what == "encode" else dict(samples=lat)
    mm.LOADS.clear()
    run(getattr(nodes, node), vae=vae, tiling="auto", **kwargs)
    (_, requested, _), = mm.LOADS
    assert plans, "the engine ran"
    mine = [e for e in estimates if e[0] == what]
    assert (what, mine[0][1], plans[0], requested) in mine  # the request: the estimate of the plan that ran


# Video nodes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiling", ["auto", "none"])
def test_video_roundtrip_pads_and_drops_the_padding_again(vae, tiling):
    imgs = frames(7, 20, 27)
    (lat,) = run(nodes.CVVAEVideoEncode, vae=vae, images=imgs, frame_policy="pad", tiling=tiling)
    assert lat["samples"].shape == (1, 4, 3, 3, 4)
    rec = lat[nodes.ADJUSTMENT_KEY]
    assert (rec["padded_frames"], rec["padded_height"], rec["padded_width"]) == (2, 4, 5)
    (out,) = run(nodes.CVVAEVideoDecode, vae=vae, samples=lat, tiling=tiling)
    assert out.shape == (7, 20, 27, 3) and 0 <= out.min() and out.max() <= 1
    assert comfy.utils.UPDATES and comfy.utils.UPDATES[-1][0] == comfy.utils.UPDATES[-1][1]
    assert mm.EMPTY_CACHE_CALLS, "soft_empty_cache after each pass"


def test_video_encode_trim_and_error_policies(vae):
    (lat,) = run(nodes.CVVAEVideoEncode, vae=vae, images=frames(7), frame_policy="trim")
    assert lat["samples"].shape == (1, 4, 2, 2, 3)
    (out,) = run(nodes.CVVAEVideoDecode, vae=vae, samples=lat)
    assert out.shape == (5, 16, 24, 3)
    with pytest.raises(cvvae_core.FrameCountError, match="1\\+4k|pad"):
        run(nodes.CVVAEVideoEncode, vae=vae, images=frames(7), frame_policy="error")
    (lat,) = run(nodes.CVVAEVideoEncode, vae=vae, images=frames(5), frame_policy="pad")
    assert nodes.ADJUSTMENT_KEY not in lat  # nothing padded, nothing recorded


def test_video_encode_matches_the_core_model(vae):
    imgs = frames(5)
    (lat,) = run(nodes.CVVAEVideoEncode, vae=vae, images=imgs, tiling="none", frame_policy="error")
    ref = vae.cvvae_model.encode(imgs.movedim(-1, 0).unsqueeze(0) * 2 - 1)
    torch.testing.assert_close(lat["samples"], ref)


def test_cancel_stops_the_pass_and_frees_cache(vae):
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        run(nodes.CVVAEVideoEncode, vae=vae, images=frames(5), tiling="auto")
    assert mm.EMPTY_CACHE_CALLS
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": torch.randn(1, 4, 2, 2, 3)}, tiling="none")


def test_out_of_memory_says_what_to_do(vae, monkeypatch):
    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(vae.cvvae_model, "decode", boom)
    with pytest.raises(cvvae_core.OutOfMemoryError, match="tiling"):
        run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": torch.randn(1, 4, 2, 2, 3)}, tiling="none")
    assert True in mm.EMPTY_CACHE_CALLS


def test_automatic_plan_on_a_gpu_is_sized_from_comfyuis_free_memory(monkeypatch, comfy_version):
    """Once ComfyUI has loaded the model, an automatic seamless plan takes its budget from what
    ComfyUI reports free: the patcher's figure where it has one (0.33 and newer: it counts reclaimable
    dynamic VRAM too), else the global one; given budgets, other modes and CPU keep theirs."""
    from cvvae_pack.nodes import runtime
    from cvvae_pack.cvvae_core.tiling.planner import FREE_MEMORY_SHARE

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 10 << 30)
    monkeypatch.setattr(comfy.model_patcher, "DYNAMIC_VRAM", 2 << 30)
    planned = []
    monkeypatch.setattr(runtime.tiling, "plan_for", lambda model, d, shape, opts, **kw: planned.append(opts))
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cuda", 0), torch.device("cpu"))
    free = (10 << 30) if comfy_version == "0.8" else (12 << 30)
    cases = [("cuda", runtime.engine_options(), int(free * FREE_MEMORY_SHARE)),
             ("cuda", runtime.engine_options(memory_budget=1 << 30), 1 << 30),
             ("cuda", runtime.engine_options(mode="official"), None),
             ("cpu", runtime.engine_options(), None)]
    for device, opts, budget in cases:
        settled = runtime.settle(None, DECODE, (1, 4, 2, 2, 3), opts, patcher, torch.device(device), runtime.Tiling())
        assert settled is opts and opts.memory_budget == budget, (device, opts.mode)
    assert len(planned) == 3  # every seamless plan is made before the pass (official needs none)


def test_video_decode_explains_4d_latents_and_channel_mismatch(vae):
    with pytest.raises(ValueError, match="Latent Adapter"):
        run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": torch.randn(3, 4, 2, 3)})
    with pytest.raises(ValueError, match="16 channels.*vae3d_sd3"):
        run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": torch.randn(1, 16, 2, 2, 3)})


def test_video_nodes_reject_an_image_vae(models):
    import comfy.sd
    image_vae = comfy.sd.VAE(sd={})
    with pytest.raises(ValueError, match="Load CV-VAE"):
        run(nodes.CVVAEVideoEncode, vae=image_vae, images=frames(5))


# Adapter ----------------------------------------------------------------------------------------
def test_adapter_video_to_batch_and_back(vae):
    video = torch.randn(1, 4, 3, 2, 3)
    (batch,) = run(nodes.CVVAELatentAdapter, samples={"samples": video}, mode="auto")
    assert batch["samples"].shape == (3, 4, 2, 3)
    torch.testing.assert_close(batch["samples"][2], video[0, :, 2])
    (back,) = run(nodes.CVVAELatentAdapter, samples=batch, mode="batch_to_video", vae=vae)
    torch.testing.assert_close(back["samples"], video)


def test_adapter_pads_and_trims_to_a_target_count():
    svd = {"samples": torch.randn(14, 4, 2, 3)}
    (v,) = run(nodes.CVVAELatentAdapter, samples=svd, mode="batch_to_video", target_frames=5)
    assert v["samples"].shape == (1, 4, 5, 2, 3)
    torch.testing.assert_close(v["samples"][0, :, 4], svd["samples"][4])
    (b,) = run(nodes.CVVAELatentAdapter, samples={"samples": torch.randn(1, 4, 3, 2, 3)}, mode="video_to_batch",
               target_frames=14)
    assert b["samples"].shape == (14, 4, 2, 3)
    torch.testing.assert_close(b["samples"][13], b["samples"][2])


def test_adapter_checks_channels_and_mode(vae):
    with pytest.raises(ValueError, match="16 channels.*uses 4"):
        run(nodes.CVVAELatentAdapter, samples={"samples": torch.randn(14, 16, 2, 3)}, mode="auto", vae=vae)
    with pytest.raises(ValueError, match="have 4 or 16"):
        run(nodes.CVVAELatentAdapter, samples={"samples": torch.randn(14, 12, 2, 3)}, mode="auto")
    with pytest.raises(ValueError, match="already a video"):
        run(nodes.CVVAELatentAdapter, samples={"samples": torch.randn(1, 4, 3, 2, 3)}, mode="batch_to_video")


def test_svd_batch_decodes_as_one_video_with_4x_frames(vae):
    """What the README promises: adapter + Video Decode turns T latent frames into 1+4(T-1) frames."""
    svd = {"samples": torch.randn(5, 4, 2, 3)}
    (per_frame,) = [vae.decode(svd["samples"])]
    assert per_frame.shape[0] == 5
    (video,) = run(nodes.CVVAELatentAdapter, samples=svd, mode="batch_to_video")
    (out,) = run(nodes.CVVAEVideoDecode, vae=vae, samples=video)
    assert out.shape == (17, 16, 24, 3)


def test_padding_record_survives_the_adapter_round_trip_only_while_shapes_match(vae):
    (lat,) = run(nodes.CVVAEVideoEncode, vae=vae, images=frames(6), frame_policy="pad")
    (b,) = run(nodes.CVVAELatentAdapter, samples=lat, mode="auto")
    (v,) = run(nodes.CVVAELatentAdapter, samples=b, mode="auto")
    assert run(nodes.CVVAEVideoDecode, vae=vae, samples=v)[0].shape[0] == 6
    (v4,) = run(nodes.CVVAELatentAdapter, samples=b, mode="auto", target_frames=4)
    assert run(nodes.CVVAEVideoDecode, vae=vae, samples=v4)[0].shape[0] == 13  # changed: record ignored


def test_synthetic_clip():
    (clip,) = run(nodes.CVVAESyntheticVideo, width=24, height=16, frames=5, seed=3)
    assert clip.shape == (5, 16, 24, 3) and 0 <= clip.min() and clip.max() <= 1
    assert not torch.equal(clip[0], clip[4])
    torch.testing.assert_close(run(nodes.CVVAESyntheticVideo, width=24, height=16, frames=5, seed=3)[0], clip)
    assert not torch.equal(run(nodes.CVVAESyntheticVideo, width=24, height=16, frames=5, seed=4)[0], clip)


def test_cvvae_model_folder_is_registered():
    paths, exts = folder_paths.folder_names_and_paths["cvvae"]
    assert os.path.join(folder_paths.models_dir, "cvvae") in paths and ".safetensors" in exts


# Core VAE nodes run the exact engine ---------------------------------------------------------------
def core_decode_tiled(vae, latent, tile_size, overlap, temporal_size, temporal_overlap):
    """nodes.py VAEDecodeTiled.decode as written in ComfyUI 0.8.0 and 0.33.0 (pixel sizes -> latent units)."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    if temporal_size < temporal_overlap * 2:
        temporal_overlap = temporal_overlap // 2
    tc = vae.temporal_compression_decode()
    temporal_size = max(2, temporal_size // tc)
    temporal_overlap = max(1, min(temporal_size // 2, temporal_overlap // tc))
    c = vae.spacial_compression_decode()
    images = vae.decode_tiled(latent, tile_x=tile_size // c, tile_y=tile_size // c, overlap=overlap // c,
                              tile_t=temporal_size, overlap_t=temporal_overlap)
    return images.reshape(-1, *images.shape[-3:]) if images.dim() == 5 else images


@pytest.fixture
def engine_runs(monkeypatch):
    """Every seamless engine run: (direction, input shape, plan)."""
    from cvvae_pack.cvvae_core.tiling import runner
    runs, real = [], runner._seamless

    def seamless(model, x, opts, direction, plan, group):
        runs.append((direction.name, tuple(x.shape), plan))
        return real(model, x, opts, direction, plan, group)
    monkeypatch.setattr(runner, "_seamless", seamless)
    return runs


@pytest.fixture(params=["0.8", "0.33", "0.38"])
def comfy_version(request, monkeypatch):
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "GENERATION", request.param)
    return request.param


def test_core_tiled_decode_is_the_exact_engine_with_comfys_sizes_as_pieces(vae, engine_runs, comfy_version):
    lat = torch.randn(1, 4, 5, 4, 6)
    out = core_decode_tiled(vae, lat, tile_size=64, overlap=16, temporal_size=8, temporal_overlap=4)
    assert out.shape == (17, 32, 48, 3)
    # the same frames as CV-VAE Video Decode untiled (the node the pack ships), to float rounding
    (ref,) = run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat}, tiling="none")
    torch.testing.assert_close(out, ref)
    # ... and it ran in pieces: ComfyUI's 64-px tiles and 8-frame (2 latent frames) chunks
    assert [(d, plan.tile, plan.chunk) for d, _, plan in engine_runs] == [("decode", 64, 8)]


def test_core_tiled_decode_of_a_frames_batch_is_framewise(vae, engine_runs, comfy_version):
    lat = torch.randn(3, 4, 4, 6)
    out = core_decode_tiled(vae, lat, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8)
    torch.testing.assert_close(out, vae.decode(lat))  # core VAE Decode: each latent frame an image
    assert out.shape == (3, 32, 48, 3) and engine_runs[0][1] == (3, 4, 1, 4, 6)


def test_core_tiled_encode_is_the_exact_engine_and_matches_core_encode(vae, engine_runs, comfy_version):
    imgs = frames(3, 32, 48)
    lat = vae.encode_tiled(imgs, tile_x=64, tile_y=64, overlap=64, tile_t=64, overlap_t=8)
    assert lat.shape == (3, 4, 4, 6)
    torch.testing.assert_close(lat, vae.encode(imgs))  # frame-wise, like core VAE Encode
    ref = vae.cvvae_model.encode(imgs.movedim(-1, 1).unsqueeze(2) * 2 - 1)[:, :, 0]
    torch.testing.assert_close(lat, ref)
    assert ("encode", (3, 3, 1, 32, 48)) in [(d, s) for d, s, _ in engine_runs]


def test_newest_comfy_can_encode_a_frames_batch_as_one_video(vae, monkeypatch):
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "GENERATION", "0.38")
    imgs = frames(5)
    (ref,) = run(nodes.CVVAEVideoEncode, vae=vae, images=imgs, tiling="none", frame_policy="error")
    torch.testing.assert_close(vae.encode(imgs, not_video=False), ref["samples"])
    torch.testing.assert_close(vae.encode_tiled(imgs, tile_x=64, tile_t=8, not_video=False), ref["samples"])


def test_overlap_is_ignored_with_one_info_line(vae, caplog, monkeypatch):
    monkeypatch.setattr(comfy_vae, "_overlap_noted", False)
    lat = torch.randn(1, 4, 2, 2, 3)
    with caplog.at_level(logging.INFO, logger="CV-VAE"):
        a = vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=2, tile_t=2, overlap_t=1)
        b = vae.decode_tiled(lat, tile_x=8, tile_y=8, overlap=0, tile_t=2)
    notes = [r for r in caplog.records if "overlap" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and "exact" in notes[0].getMessage()
    torch.testing.assert_close(a, b)


def test_core_decode_request_is_the_estimate_of_the_plan_it_runs(vae, engine_runs, comfy_version):
    from cvvae_pack.cvvae_core import tiling
    lat = torch.randn(1, 4, 3, 4, 5)
    vae.decode(lat)
    (direction, shape, plan), = engine_runs
    requested = mm.LOADS[0][1]
    assert requested == tiling.estimate_memory(vae.cvvae_model, tiling.DECODE, shape, plan, vae.output_device).total
    assert requested == vae.memory_used_decode(lat.shape, vae.vae_dtype)


def raise_oom_once(monkeypatch, stage, method):
    """Make the first stage's untiled ``method`` run out of device memory once, as a GPU would."""
    calls, real = [], getattr(stage, method)

    def once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(stage, method, once)
    return calls


def test_out_of_memory_fallback_of_core_decode_is_the_exact_engine(vae, engine_runs, comfy_version, monkeypatch):
    lat = torch.randn(1, 4, 1, 40, 40)
    expected = reference_video(vae, lat)
    raise_oom_once(monkeypatch, vae.first_stage_model, "decode")
    out = vae.decode(lat)
    torch.testing.assert_close(out, expected)
    # 0.8.0 and 0.33.0 tile at 256 px; the newest raises that to preferred_decode_tile: here the
    # whole 320-px frame fits the free memory
    tile = 320 if comfy_version == "0.38" else 256
    assert [(d, p.tile) for d, _, p in engine_runs] == [("decode", tile)]


def test_out_of_memory_fallback_of_core_encode_is_the_exact_engine(vae, engine_runs, comfy_version, monkeypatch):
    imgs = frames(2, 32, 48)
    expected = vae.encode(imgs)
    engine_runs.clear()
    raise_oom_once(monkeypatch, vae.first_stage_model, "encode")
    torch.testing.assert_close(vae.encode(imgs), expected)
    assert [(d, p.tile) for d, _, p in engine_runs] == [("encode", 256)]


def test_newest_comfy_skips_the_untiled_attempt_that_would_not_fit(vae, engine_runs, monkeypatch):
    """Less free memory than the reliable estimate: straight to the engine, with the tile
    preferred_decode_tile picks for that memory (never below ComfyUI's 256 px), same frames."""
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "GENERATION", "0.38")
    lat = torch.randn(1, 4, 1, 40, 40)
    expected = reference_video(vae, lat)
    engine_runs.clear()
    stage = vae.first_stage_model
    free = vae.memory_used_decode(lat.shape, vae.vae_dtype) // 3
    monkeypatch.setattr(mm, "FREE_MEMORY", free)
    monkeypatch.setattr(stage, "decode", lambda *a, **k: pytest.fail("the untiled attempt was made"))
    out = vae.decode(lat)
    torch.testing.assert_close(out, expected)
    with stage.serving(vae, DECODE, lat.shape):
        preferred = stage.preferred_decode_tile(free, vae.vae_dtype)
    assert [p.tile for _, _, p in engine_runs] == [8 * max(32, preferred)]


def test_preferred_decode_tile_grows_with_free_memory(vae):
    stage = vae.first_stage_model
    assert stage.preferred_decode_tile(1 << 40, torch.float32) == 0  # asked outside VAE.decode: no opinion
    shape = (1, 4, 3, 32, 32)
    with stage.serving(vae, DECODE, shape):
        small = stage.preferred_decode_tile(vae.memory_used_decode(shape, None) // 2, torch.float32)
        large = stage.preferred_decode_tile(1 << 40, torch.float32)
    assert 8 <= small < large == 32  # the whole 256-px frame when it fits


# Bad input: a clear error or a documented adjustment, never a wrong picture ----------------------
def test_a_latent_of_another_family_stops_core_decodes_with_one_line(vae, comfy_version):
    sd3_latent = torch.randn(1, 16, 2, 2, 3)
    for call in (lambda: core_decode_tiled(vae, sd3_latent, 64, 16, 8, 4), lambda: vae.decode(sd3_latent),
                 lambda: vae.decode(sd3_latent[:, :, 0])):
        with pytest.raises(cvvae_core.ChannelMismatchError, match="16 channels.*vae3d_sd3") as e:
            call()
        assert "\n" not in str(e.value)
    assert not mm.LOADS, "nothing is loaded for a latent the model cannot take"


def test_tile_sizes_off_the_grid_are_rounded_down_and_logged(vae, engine_runs, caplog):
    imgs = frames(1, 32, 48)
    with caplog.at_level(logging.INFO, logger="CV-VAE"):
        lat = vae.encode_tiled(imgs, tile_x=100, tile_y=100, overlap=0)
    assert engine_runs[-1][2].tile == 96 and "using 96 px" in caplog.text
    torch.testing.assert_close(lat, vae.encode(imgs))


def test_temporal_size_below_one_latent_frame_is_raised_to_one(vae, engine_runs):
    lat = torch.randn(1, 4, 3, 2, 3)
    out = vae.decode_tiled(lat, tile_x=8, tile_y=8, tile_t=0)  # 0: ComfyUI asked for no chunking
    assert engine_runs[-1][2].chunk is None
    torch.testing.assert_close(vae.decode_tiled(lat, tile_x=8, tile_y=8, tile_t=1), out)
    imgs = frames(5)
    torch.testing.assert_close(vae.encode_tiled(imgs, tile_x=64, tile_t=2, not_video=False),
                               vae.encode(imgs, not_video=False))
    assert engine_runs[-2][2].chunk == 4  # two frames asked, one latent frame's worth (4) used


# Loading --------------------------------------------------------------------------------------------
def test_the_loader_builds_the_model_once_in_its_working_dtype(models, monkeypatch):
    from cvvae_pack.nodes import comfy_vae as cv
    built, real = [], cv.load_model

    def spy(path, device=None, dtype=None, **kw):
        built.append(dtype)
        return real(path, device=device, dtype=dtype, **kw)
    monkeypatch.setattr(cv, "load_model", spy)
    monkeypatch.setattr(mm, "VAE_DTYPE", torch.bfloat16)  # like --bf16-vae
    vae = run(nodes.CVVAELoader, model_name="tiny_cvvae_sd3.safetensors", dtype="auto")[0]
    assert built == [torch.bfloat16] and vae.vae_dtype == torch.bfloat16
    assert {p.dtype for p in vae.first_stage_model.parameters()} == {torch.bfloat16}


# ComfyUI 0.38 semantics --------------------------------------------------------------------------------
def test_out_of_memory_reaches_comfyui_as_its_oom_after_the_engines_own_fallback(vae, comfy_version, monkeypatch):
    """The engine first retries with smaller plans; what still runs out of memory is raised as a
    torch.OutOfMemoryError, so ComfyUI's own fallback (0.8: ``except OOM_EXCEPTION``, newer:
    ``raise_non_oom``) takes over: it asks for tiles, which fit here."""
    from cvvae_pack.cvvae_core.tiling import runner
    attempts, real = [], runner._seamless

    def seamless(model, x, opts, direction, plan, group):
        attempts.append(opts.tile_size)
        if opts.tile_size is None:  # only ComfyUI's tiled fallback (given sizes) fits
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, x, opts, direction, plan, group)
    monkeypatch.setattr(runner, "_seamless", seamless)
    lat = torch.randn(1, 4, 2, 8, 8)
    out = vae.decode(lat)
    torch.testing.assert_close(out, reference_video(vae, lat))
    untiled = [a for a in attempts if a is None]
    assert len(untiled) > 1, "the engine's own smaller plans ran before ComfyUI's fallback"
    assert attempts[len(untiled):] and None not in attempts[len(untiled):]
    monkeypatch.setattr(runner, "_seamless", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")))
    with pytest.raises(cvvae_core.OutOfMemoryError, match="tiling") as e:
        run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat}, tiling="auto")
    assert isinstance(e.value, mm.OOM_EXCEPTION) and "\n" not in str(e.value)
    if comfy_version != "0.8":
        assert mm.is_oom(e.value)


@pytest.mark.parametrize("call", ["decode", "decode_tiled", "encode", "encode_tiled"])
def test_every_vae_method_comfyui_calls_takes_unknown_keywords(vae, comfy_version, call):
    """A newer ComfyUI passes more keywords (an open pull request adds term_pbar_desc= to decode and
    the tiled encode); they are accepted, and only those the base class takes are handed on."""
    lat, imgs = torch.randn(1, 4, 2, 2, 3), frames(2)
    extra = {"term_pbar_desc": "VAE", "some_future_option": 1}
    calls = {"decode": lambda **k: vae.decode(lat, **k),
             "decode_tiled": lambda **k: vae.decode_tiled(lat, tile_x=8, tile_y=8, **k),
             "encode": lambda **k: vae.encode(imgs, **k),
             "encode_tiled": lambda **k: vae.encode_tiled(imgs, tile_x=64, tile_y=64, **k)}
    torch.testing.assert_close(calls[call](**extra), calls[call]())
    stage = vae.first_stage_model
    assert stage.decode(lat, **extra).shape == stage.decode_output_shape(lat.shape)
    assert stage.encode(imgs.movedim(-1, 1).unsqueeze(2) * 2 - 1, device=vae.device, **extra).shape == (2, 4, 1, 2, 3)
    assert vae.decode_tiled_3d(lat, tile_x=8, **extra).shape == (1, 3, 5, 16, 24)
    assert vae.encode_tiled_3d(imgs.movedim(-1, 1).unsqueeze(2), tile_x=64, **extra).shape == (2, 4, 1, 2, 3)


def test_outputs_are_in_comfyuis_intermediate_dtype(vae, comfy_version, monkeypatch):
    """--fp16-intermediates (0.33 and newer): images and latents between nodes are float16, from core
    VAE nodes (tiled too) and the pack's nodes alike; 0.8.0 has no such option (float32)."""
    monkeypatch.setattr(mm, "INTERMEDIATE_DTYPE", torch.float16)
    want = torch.float32 if comfy_version == "0.8" else torch.float16
    lat, imgs = torch.randn(1, 4, 2, 2, 3), frames(5)
    results = {"decode": vae.decode(lat), "decode_tiled": vae.decode_tiled(lat, tile_x=8, tile_y=8),
               "encode": vae.encode(imgs), "encode_tiled": vae.encode_tiled(imgs, tile_x=64, tile_y=64),
               "Video Encode": run(nodes.CVVAEVideoEncode, vae=vae, images=imgs)[0]["samples"],
               "Video Decode": run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat})[0]}
    assert {k: v.dtype for k, v in results.items()} == dict.fromkeys(results, want)


def test_passes_run_in_comfyuis_device_context(vae, comfy_version):
    """0.33 and newer make the VAE's device CUDA's current one (a VAE on a second GPU) around every
    pass: core calls (inside ComfyUI's own context) and the pack's own passes."""
    mm.DEVICE_CONTEXTS.clear()
    lat = torch.randn(1, 4, 2, 2, 3)
    vae.decode_tiled(lat, tile_x=8, tile_y=8)
    run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat})
    if comfy_version == "0.8":
        assert not hasattr(mm, "cuda_device_context") and mm.DEVICE_CONTEXTS == []
    else:
        assert len(mm.DEVICE_CONTEXTS) >= 2 and set(mm.DEVICE_CONTEXTS) == {torch.device(vae.device)}


def test_cancel_reaches_comfyui_as_its_interrupt_in_every_version(vae, comfy_version):
    """ComfyUI's InterruptProcessingException is an Exception in 0.8.0 and a BaseException from 0.33.0
    on; a cancel inside a core VAE call is never taken for an out-of-memory error and retried."""
    assert issubclass(mm.InterruptProcessingException, Exception) == (comfy_version == "0.8")
    for call in (lambda: vae.decode(torch.randn(1, 4, 3, 2, 3)), lambda: vae.encode(frames(2)),
                 lambda: run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": torch.randn(1, 4, 3, 2, 3)})):
        mm.interrupt_processing = True
        with pytest.raises(mm.InterruptProcessingException):
            call()
        assert not mm.interrupt_processing


def test_channels_follow_comfyuis_crop_and_a_grayscale_image_gets_one_line(vae, comfy_version):
    """The pack's VAE keeps ComfyUI's default ``pad_channel_value`` (None): an RGBA image is encoded
    from its RGB, a 1-channel one stops with a one-line error saying RGB."""
    rgba = torch.cat([frames(2), torch.ones(2, 16, 24, 1)], dim=-1)
    assert vae.pad_channel_value is None
    torch.testing.assert_close(vae.encode(rgba), vae.encode(rgba[..., :3]))
    with pytest.raises(cvvae_core.InputError, match="RGB") as e:
        vae.encode(frames(2)[..., :1])
    assert "\n" not in str(e.value)


def test_format_encoded_applies_to_tiled_encodes_too(vae, monkeypatch):
    """0.33 and newer pass what ``encode`` / ``encode_tiled`` return through ``format_encoded`` when a
    VAE sets one; the pack's own encode_tiled does the same."""
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "GENERATION", "0.38")
    imgs = frames(2)
    plain = vae.encode(imgs), vae.encode_tiled(imgs, tile_x=64, tile_y=64)
    assert vae.format_encoded is None
    monkeypatch.setattr(vae, "format_encoded", lambda x: x * 2, raising=False)
    torch.testing.assert_close(vae.encode(imgs), plain[0] * 2)
    torch.testing.assert_close(vae.encode_tiled(imgs, tile_x=64, tile_y=64), plain[1] * 2)


def select_vae_device(vae, device):
    """What core 'Select VAE Device' (ComfyUI 0.33.0, comfy_extras/nodes_multigpu.py) does to a VAE for a
    GPU other than the loaded one: a shallow copy whose patcher is a deep clone on that device."""
    import copy
    vae = copy.copy(vae)
    vae.patcher = vae.patcher.clone()
    vae.patcher = vae.patcher.deepclone_multigpu(new_load_device=device)
    vae.first_stage_model = vae.patcher.model
    vae.device = device
    return vae


def test_select_vae_device_builds_a_fresh_copy_for_the_other_device(vae, monkeypatch):
    """The loader registers ``cached_patcher_init``: Select VAE Device gets a new CV-VAE (not the cached
    one) and every node then runs that copy, with the same result."""
    import comfy.sd
    monkeypatch.setattr(comfy.sd, "GENERATION", "0.33")
    other = torch.device("cpu", 0)  # stands for cuda:1: a device that is not the loader's
    moved = select_vae_device(vae, other)
    assert moved.patcher.load_device == other and moved.device == other
    assert moved.cvvae_model is moved.first_stage_model.cvvae and moved.cvvae_model is not vae.cvvae_model
    assert moved.first_stage_model is not vae.first_stage_model and vae.patcher.load_device != other
    lat = torch.randn(1, 4, 2, 2, 3)
    mm.LOADS.clear()
    (out,) = run(nodes.CVVAEVideoDecode, vae=moved, samples={"samples": lat}, tiling="none")
    assert [p for p, _, _ in mm.LOADS] == [moved.patcher]
    torch.testing.assert_close(out, run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat}, tiling="none")[0])
    torch.testing.assert_close(moved.decode(lat), vae.decode(lat))
    # without the factory ComfyUI refuses with its own clear message (and the node passes the VAE through)
    bare = comfy.model_patcher.ModelPatcher(vae.first_stage_model, vae.device, vae.device)
    with pytest.raises(RuntimeError, match="cached_patcher_init"):
        bare.deepclone_multigpu(new_load_device=other)


def test_loader_lists_only_files_it_can_load(models):
    """ComfyUI's model extensions include .pt2 (exported programs), which no weights loader reads."""
    stray = Path(folder_paths.models_dir) / "vae" / "exported.pt2"
    stray.write_bytes(b"not weights")
    try:
        names = nodes.model_choices()
        assert "exported.pt2" not in names and "tiny_cvvae.safetensors" in names
        exts = folder_paths.folder_names_and_paths["cvvae"][1]
        assert ".pt2" not in exts and {".safetensors", ".ckpt", ".pt", ".sft"} <= exts
    finally:
        stray.unlink()


# Memory budgets: exact, official with one warning (auto), or a refusal (seamless) ---------------------
GIB = 2 ** 30


@pytest.fixture
def over_budget(monkeypatch):
    """The engine finds no exact plan within the budgets (as for an SVD clip on a 32 GB machine):
    ``when`` = "request" fails already when asking ComfyUI for room, "loaded" only once the model is
    loaded (the plan made with the free memory). Returns the calls to the planner."""
    from cvvae_pack.cvvae_core.errors import MemoryBudgetError
    from cvvae_pack.cvvae_core.tiling import runner, search
    calls = []

    def setup(when="request"):
        def choose_plan(*args, **kw):
            calls.append(kw)
            if when == "request" or len(calls) > 1:
                raise MemoryBudgetError("no exact plan fits", device_needed=3 * GIB, host_needed=int(41.9 * GIB),
                                        device_budget=None, host_budget=int(25.6 * GIB))
            return real(*args, **kw)
        for module in (search, runner):
            monkeypatch.setattr(module, "choose_plan", choose_plan)
        return calls
    real = search.choose_plan
    return setup


@pytest.fixture
def official_runs(monkeypatch):
    from cvvae_pack.cvvae_core.tiling import runner
    runs, real = [], runner.run_official

    def spy(model, x, direction, opts):
        runs.append((direction.name, tuple(x.shape), opts))
        return real(model, x, direction, opts)
    monkeypatch.setattr(runner, "run_official", spy)
    return runs


@pytest.fixture
def on_node(monkeypatch):
    """ComfyUI executing node "12"; returns what the nodes showed there (progress text)."""
    import comfy_execution.utils
    import server
    monkeypatch.setattr(comfy_execution.utils, "CURRENT", comfy_execution.utils.ExecutionContext("p", "12"))
    server.PromptServer.instance.progress_texts.clear()
    return server.PromptServer.instance.progress_texts


@pytest.mark.parametrize("when", ["request", "loaded"])
def test_auto_falls_back_to_official_with_one_warning_saying_what_exact_needed(vae, over_budget, official_runs,
                                                                             on_node, engine_runs, caplog, when):
    over_budget(when)
    lat = torch.randn(1, 4, 3, 2, 3)
    with caplog.at_level(logging.WARNING, logger="CV-VAE"):
        (out,) = run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat}, tiling="auto")
    assert out.shape == (9, 16, 24, 3)
    assert [(d, s, o.mode) for d, s, o in official_runs] == [("decode", (1, 4, 3, 2, 3), "official")]
    assert engine_runs == []  # no exact pass was started
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and on_node == [(lines[0], "12")]
    assert all(s in lines[0] for s in ("CV-VAE Video Decode", "41.9 GiB", "25.6 GiB", "official", "disk_spill"))
    assert "\n" not in lines[0]


def test_seamless_chosen_refuses_before_any_work_with_one_line(vae, over_budget, official_runs, engine_runs):
    over_budget("request")
    with pytest.raises(cvvae_core.MemoryBudgetError) as e:
        run(nodes.CVVAEVideoEncode, vae=vae, images=frames(5), tiling="seamless")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("CV-VAE Video Encode:") and "41.9 GiB" in msg and "disk_spill" in msg
    assert (e.value.host_needed, e.value.host_budget) == (int(41.9 * GIB), int(25.6 * GIB))
    assert not mm.LOADS and not official_runs and not engine_runs  # nothing loaded, nothing run


def test_disk_spill_names_comfyuis_temp_folder_to_the_engine(vae, monkeypatch, engine_runs):
    from cvvae_pack.cvvae_core.tiling import runner
    seen, real = [], runner.plan_for

    def plan_for(model, direction, shape, opts, *a, **k):
        seen.append(opts.disk_dir)
        return real(model, direction, shape, opts, *a, **k)
    monkeypatch.setattr(runner, "plan_for", plan_for)
    lat = torch.randn(1, 4, 3, 2, 3)
    (spilled,) = run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat}, disk_spill=True)
    folder = os.path.join(folder_paths.get_temp_directory(), "cvvae")
    assert seen and set(seen) == {folder} and os.path.isdir(folder)
    seen.clear()
    (plain,) = run(nodes.CVVAEVideoDecode, vae=vae, samples={"samples": lat})
    assert set(seen) == {None}
    torch.testing.assert_close(spilled, plain)


def test_core_vae_decode_falls_back_like_auto_with_one_warning_per_call(vae, over_budget, official_runs, on_node,
                                                                       comfy_version, monkeypatch, caplog):
    """Core VAE Decode of an SVD frames batch: ComfyUI decodes it in several batches, each a pass; one
    warning for the call, which names the pack's node that can stay exact."""
    over_budget("request")
    lat = torch.randn(3, 4, 2, 3)
    monkeypatch.setattr(mm, "FREE_MEMORY", 1)  # one frame per batch
    with caplog.at_level(logging.WARNING, logger="CV-VAE"):
        out = vae.decode(lat)
        video = vae.decode(torch.randn(1, 4, 3, 2, 3))
    assert out.shape == (3, 16, 24, 3) and video.shape == (1, 9, 16, 24, 3)
    # 0.38 skips the untiled attempt (reliable estimate over free memory): one tiled pass for the batch
    assert len(official_runs) == (2 if comfy_version == "0.38" else 4)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "CV-VAE"]
    assert len(lines) == 2 and [t for t, _ in on_node] == lines  # one per core call
    assert "CV-VAE Video Decode" in lines[0] and "disk_spill" in lines[0]
