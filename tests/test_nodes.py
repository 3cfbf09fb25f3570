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
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from cvvae_pack import cvvae_core  # noqa: E402
from cvvae_pack.nodes import comfy_vae, nodes  # noqa: E402

TINY = cvvae_core.CVVAEConfig(variant="sd", latent_channels=4, base_channels=8, channel_mult=(1, 2, 2, 2),
                              blocks_per_level=1, norm_groups=4)
TINY_SD3 = cvvae_core.CVVAEConfig(variant="sd3", latent_channels=16, base_channels=8, channel_mult=(1, 2, 2, 2),
                                  blocks_per_level=1, norm_groups=4, scaling_factor=1.5305, shift_factor=0.0609)


def run(node, **kw):
    return node.execute(**kw).args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up costs more than it gains on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert ids == ["CVVAELoader", "CVVAEVideoEncode", "CVVAEVideoDecode", "CVVAELatentAdapter", "CVVAESyntheticVideo"]


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
    # the model runs in the dtype it was built in: half the activations; the float32 output (on this
    # one-device host) stays
    half = run(nodes.CVVAELoader, model_name="tiny_cvvae.safetensors", dtype="fp16")[0]
    assert a / 2 < half.memory_used_decode((1, 4, 2, 8, 8), torch.float16) < a
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
    # and the memory ComfyUI is asked for by core VAE nodes is the same estimate, untiled
    assert vae.memory_used_decode((1, 4, 3, 4, 5), torch.float32) == real_estimate(
        vae.cvvae_model, tiling.DECODE, (1, 4, 3, 4, 5), tiling.Plan(), vae.output_device, vae.device).total


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
    with pytest.raises(ValueError, match="4 \\(SD/SVD\\) or 16"):
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
