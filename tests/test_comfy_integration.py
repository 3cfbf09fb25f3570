"""The pack inside a REAL ComfyUI, headless on 127.0.0.1 (skipped when no ComfyUI checkout is given).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/its/python] pytest tests/test_comfy_integration.py -s

Starts ComfyUI with a temporary base directory (the checkout is not modified), the pack linked into
its custom_nodes, and models from the checkout's models/ folder. Then:
  * the pack's nodes are served, with the schema the CI stand-in derives (same inputs/types/order);
  * the core node snapshot the CI workflow checks use for this ComfyUI version
    (tests/comfy_stub/object_info_core_<version>.json) still matches it;
  * every example workflow that needs no external model is converted to an API prompt and run
    through the HTTP API; outputs are checked (frame counts, sizes);
  * core VAE Decode/Encode (tiled too) and, where ComfyUI has it, Select VAE Device ("default")
    give the pack's own nodes' frames; prompts without the optional disk_spill input stay valid;
  * the SVD swap workflow runs end to end when a (random-weight) SVD checkpoint is available
    (COMFYUI_SVD_CKPT = its file name in models/checkpoints, default random_svd.safetensors;
    shared/tools/make_random_svd.py writes one), at 64x64, 5 frames, 1 step;
  * every workflow loads in the real frontend in headless Chromium with no missing node types
    (needs node + playwright-core + chromium and COMFY_BROWSER_TOOL, default
    ../shared/tools/comfy_browser.mjs; skipped, with the reason printed, when node, playwright-core
    or Chromium is missing), and the frontend's own UI->API conversion equals the one the CI uses.
If the built-in model's weights are not installed, a tiny random CV-VAE stands in for it.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "comfy_stub"))
import workflow_check  # noqa: E402
from comfy_server import ROOT, ComfyServer, copy_example_image  # noqa: E402

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
BUILTIN = "builtin (small demo model)"
if not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").exists():
    reason = ("real-ComfyUI integration test skipped: set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON "
              "to a python with its requirements) to run it")
    sys.__stderr__.write(reason + "\n")
    pytest.skip(reason, allow_module_level=True)

WORKFLOWS = {p.stem: p for p in sorted((ROOT / "example_workflows").glob("*.json"))}
NO_DOWNLOAD = ["01_cvvae_video_reconstruction_builtin", "05_image_framewise_core_vae"]  # 06: see the saved-latent test
RESULTS = {}


def note(msg):
    sys.__stderr__.write(f"[integration] {msg}\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    cvvae_dir = base / "cvvae_models"
    cvvae_dir.mkdir()
    # A tiny random CV-VAE for when the built-in weights are not installed (written with the pack's torch).
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import cvvae_core as c; torch.manual_seed(0); "
            "cfg = c.CVVAEConfig(variant='sd', base_channels=8, channel_mult=(1, 2, 2, 2), blocks_per_level=1, "
            "norm_groups=4); c.save_model(c.CVVAE(cfg), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(cvvae_dir / "tiny_random_cvvae.safetensors")],
                   check=True)
    srv = ComfyServer(COMFYUI_DIR, base, cvvae_dir)
    t0 = time.time()
    srv.start()
    note(f"ComfyUI started in {time.time() - t0:.0f}s on {srv.url} (python {srv.python})")
    copy_example_image(srv)
    yield srv
    srv.stop()
    note("ComfyUI stopped")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def cvvae_overrides(object_info):
    """Run every Load CV-VAE on the built-in model (workflows that name a release file, e.g. the SVD
    swap's vae3d_v1-1, cannot download it here), or on a tiny random CV-VAE without the weights."""
    options = object_info["CVVAELoader"]["input"]["required"]["model_name"][1]["options"]
    if BUILTIN in options:
        return {("CVVAELoader", "model_name"): BUILTIN}
    note("built-in weights not installed: the tiny random CV-VAE stands in for them")
    return {("CVVAELoader", "model_name"): "tiny_random_cvvae.safetensors"}


def test_pack_loads_and_serves_the_stub_schema(server, object_info):
    log = server.log_text()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "CV-VAE" in l), log[-3000:]
    from pack_loader import load_pack
    load_pack()
    from cvvae_pack.nodes import nodes
    for node in nodes.NODES:
        stub = node.GET_NODE_INFO_V1()
        live = object_info[stub["name"]]
        assert live["category"] == stub["category"] and live["output"] == stub["output"]
        assert live["input_order"] == stub["input_order"]
        for sec, inputs in stub["input"].items():
            for name, (kind, opts) in inputs.items():
                lkind, lopts = live["input"][sec][name]
                assert lkind == kind and lopts.get("tooltip") == opts.get("tooltip"), (stub["name"], name)
                assert lopts.get("default") == opts.get("default"), (stub["name"], name)
                if name != "model_name":
                    assert lopts.get("options") == opts.get("options"), (stub["name"], name)


def test_templates_browser_lists_the_workflows_once(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("ComfyUI-CV-VAE", [])) == sorted(WORKFLOWS), templates


@pytest.fixture(scope="module")
def comfy_version(server):
    return server.get("/system_stats")["system"]["comfyui_version"]


def test_core_snapshot_still_matches(object_info, comfy_version):
    """The snapshot of this ComfyUI version, which the CI workflow checks use, matches the live schemas."""
    for name, snap in workflow_check.core_object_info(comfy_version).items():
        live = object_info.get(name)
        assert live is not None, f"core node {name} missing"
        assert live["input_order"] == snap["input_order"] and live["output"] == snap["output"], name


@pytest.mark.parametrize("name", NO_DOWNLOAD)
def test_no_download_workflow_runs(server, object_info, name):
    prompt = workflow_check.to_api(json.loads(WORKFLOWS[name].read_text()), object_info, cvvae_overrides(object_info))
    t0 = time.time()
    entry = server.run_prompt(prompt, timeout=600)
    files = server.output_files(entry)
    took = time.time() - t0
    files = [f for f in files if f.suffix != ".latent"]
    assert files and all(f.exists() for f in files), entry["outputs"]
    if name.startswith("01"):
        import av
        with av.open(str(files[0])) as c:
            stream = c.streams.video[0]
            n = sum(1 for _ in c.decode(stream))
            size = (stream.codec_context.width, stream.codec_context.height)
        assert (n, size) == (17, (64, 64)), (n, size)
        RESULTS[name] = f"{files[0].name}: {n} frames {size[0]}x{size[1]}, {took:.1f}s"
    else:
        import struct
        head = files[0].read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        size = struct.unpack(">II", head[16:24])  # IHDR width, height
        assert size == (256, 256)
        RESULTS[name] = f"{files[0].name}: {size[0]}x{size[1]}, {took:.1f}s"
    note(f"{name}: {RESULTS[name]}")


def test_svd_swap_workflow_runs_end_to_end(server, object_info):
    ckpt = os.environ.get("COMFYUI_SVD_CKPT", "random_svd.safetensors")
    options = object_info["ImageOnlyCheckpointLoader"]["input"]["required"]["ckpt_name"][0]
    if ckpt not in options:
        pytest.skip(f"no SVD checkpoint {ckpt!r} in models/checkpoints (shared/tools/make_random_svd.py writes one)")
    overrides = {("ImageOnlyCheckpointLoader", "ckpt_name"): ckpt, ("SVD_img2vid_Conditioning", "width"): 64,
                 ("SVD_img2vid_Conditioning", "height"): 64, ("SVD_img2vid_Conditioning", "video_frames"): 5,
                 ("KSampler", "steps"): 1, **cvvae_overrides(object_info)}
    prompt = workflow_check.to_api(json.loads(WORKFLOWS["02_svd_img2vid_cvvae"].read_text()), object_info, overrides)
    t0 = time.time()
    entry = server.run_prompt(prompt, timeout=900)
    took = time.time() - t0
    import av
    counts = {}
    for f in server.output_files(entry):
        with av.open(str(f)) as c:
            s = c.streams.video[0]
            counts[f.parent.name + "/" + f.name] = (sum(1 for _ in c.decode(s)), s.codec_context.width,
                                                    s.codec_context.height)
    per_frame = [v for k, v in counts.items() if "per_frame" in k]
    as_video = [v for k, v in counts.items() if "cvvae_video" in k]
    assert per_frame == [(5, 64, 64)], counts       # core VAE Decode: one image per SVD frame
    assert as_video == [(17, 64, 64)], counts       # adapter + Video Decode: 1 + 4*(5-1) frames
    RESULTS["02_svd_img2vid_cvvae"] = f"{counts}, {took:.1f}s"
    note(f"02_svd_img2vid_cvvae: {RESULTS['02_svd_img2vid_cvvae']}")


def test_svd_tuning_workflows_run_end_to_end(server, object_info):
    """07 tunes the output layer (2 steps, 64x64, 5 frames) and writes it to models/cvvae_svd_heads;
    08 applies it and gives 97 frames through the adapter and Video Decode (64x64, 1 step)."""
    ckpt = os.environ.get("COMFYUI_SVD_CKPT", "random_svd.safetensors")
    options = object_info["ImageOnlyCheckpointLoader"]["input"]["required"]["ckpt_name"][0]
    if ckpt not in options:
        pytest.skip(f"no SVD checkpoint {ckpt!r} in models/checkpoints (shared/tools/make_random_svd.py writes one)")
    overrides = {("ImageOnlyCheckpointLoader", "ckpt_name"): ckpt, **cvvae_overrides(object_info)}
    tune = workflow_check.to_api(json.loads(WORKFLOWS["07_svd_tune_output_layer_cvvae"].read_text()), object_info,
                                 {**overrides, ("CVVAETuneSVDOutputLayer", "resume"): False})
    t0 = time.time()
    entry = server.run_prompt(tune, timeout=1800)
    took_tune = time.time() - t0
    heads = sorted((server.base / "models" / "cvvae_svd_heads").glob("*.safetensors"))
    assert [h.name for h in heads] == ["svd_cvvae_head.safetensors"], heads
    from safetensors import safe_open
    with safe_open(str(heads[0]), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k not in ("format", "target")}
        assert list(f.get_tensor("head.weight").shape) == [4, 320, 3, 3]
    assert meta["steps_done"] == 2 and meta["frames"] == 5 and meta["heldout_before"] > 0 and meta["heldout_after"] > 0
    assert saved(server, entry, "images", "cvvae/svd_head_loss"), entry["outputs"]
    note(f"07: held-out loss {meta['heldout_before']:.4f} -> {meta['heldout_after']:.4f}, losses {meta['losses']}, "
         f"{took_tune:.1f}s")

    generate = workflow_check.to_api(json.loads(WORKFLOWS["08_svd_img2vid_tuned_layer_cvvae"].read_text()),
                                     object_info, overrides)
    t0 = time.time()
    entry = server.run_prompt(generate, timeout=1800)
    took = time.time() - t0
    import av
    counts = []
    for f in server.output_files(entry):
        with av.open(str(f)) as c:
            s = c.streams.video[0]
            counts.append((sum(1 for _ in c.decode(s)), s.codec_context.width, s.codec_context.height))
    assert counts == [(97, 64, 64)], counts    # 25 latent frames -> 1 + 4 * 24
    RESULTS["07/08 SVD tuning"] = f"tune {took_tune:.1f}s, generate {counts} {took:.1f}s"
    note(f"08: {counts}, {took:.1f}s")


def saved(server, entry, key, prefix) -> list[Path]:
    """The files an output node with ``prefix`` wrote under ``key`` ("images", "latents"), in order."""
    import re
    subfolder, name = prefix.rsplit("/", 1)
    return sorted(server.base / f.get("type", "output") / f.get("subfolder", "") / f["filename"]
                  for out in entry["outputs"].values() for f in out.get(key, [])
                  if f.get("subfolder") == subfolder and re.fullmatch(re.escape(name) + r"_\d+_\.\w+", f["filename"]))


def png_frames(paths):
    import av
    import numpy as np
    frames = []
    for p in paths:
        with av.open(str(p)) as c:
            frames.append(next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.int16))
    return np.stack(frames)


def latent_tensor(path):
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


def test_core_tiled_nodes_and_a_saved_latent_give_the_video_decode_frames(server, object_info):
    """Core VAE Decode (Tiled) with ComfyUI's tiles (64 px, 8 frames) gives CV-VAE Video Decode's
    untiled frames; VAE Encode (Tiled) gives VAE Encode's latents; a 5-D video latent survives core
    Save Latent -> Load Latent (workflow 06) and decodes to the same frames."""
    import numpy as np
    model = cvvae_overrides(object_info)[("CVVAELoader", "model_name")]
    vae, clip = ["1", 0], ["2", 0]
    prompt = {
        "1": {"class_type": "CVVAELoader", "inputs": {"model_name": model, "dtype": "auto"}},
        "2": {"class_type": "CVVAESyntheticVideo", "inputs": {"width": 192, "height": 128, "frames": 17, "seed": 0}},
        "3": {"class_type": "CVVAEVideoEncode", "inputs": {"vae": vae, "images": clip, "frame_policy": "error",
                                                           "tiling": "none", "tile_size": 0, "chunk_frames": 0}},
        "4": {"class_type": "CVVAEVideoDecode", "inputs": {"vae": vae, "samples": ["3", 0], "tiling": "none",
                                                           "tile_size": 0, "chunk_frames": 0}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "check/video_decode"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "check/video_latent"}},
        "7": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": vae, "tile_size": 64,
                                                         "overlap": 16, "temporal_size": 8, "temporal_overlap": 4}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "check/core_tiled"}},
        "9": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": clip, "vae": vae, "tile_size": 64, "overlap": 16,
                                                         "temporal_size": 8, "temporal_overlap": 4}},
        "10": {"class_type": "VAEEncode", "inputs": {"pixels": clip, "vae": vae}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0],
                                                      "filename_prefix": "check/core_encode_tiled"}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "check/core_encode"}},
    }
    selector = "SelectVAEDevice" in object_info  # ComfyUI 0.33 and newer: the pack's VAE through it
    if selector:
        prompt["13"] = {"class_type": "SelectVAEDevice", "inputs": {"vae": vae, "device": "default"}}
        prompt["14"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["13", 0]}}
        prompt["15"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "check/selected"}}
    entry = server.run_prompt(prompt, timeout=900)
    video = png_frames(saved(server, entry, "images", "check/video_decode"))
    tiled = png_frames(saved(server, entry, "images", "check/core_tiled"))
    assert video.shape == tiled.shape == (17, 128, 192, 3)
    tiled_diff = int(np.abs(video - tiled).max())
    assert tiled_diff <= 1, f"core tiled decode {tiled_diff}/255 away from Video Decode"  # 8-bit rounding only
    if selector:
        selected = png_frames(saved(server, entry, "images", "check/selected"))
        assert selected.shape == video.shape and int(np.abs(selected - video).max()) <= 1
    enc_tiled = latent_tensor(saved(server, entry, "latents", "check/core_encode_tiled")[0])
    enc = latent_tensor(saved(server, entry, "latents", "check/core_encode")[0])
    assert enc.shape == (17, 4, 16, 24)  # frame-wise, like an SD VAE
    assert float((enc_tiled - enc).abs().max()) < 1e-4

    (latent_file,) = saved(server, entry, "latents", "check/video_latent")
    assert tuple(latent_tensor(latent_file).shape) == (1, 4, 5, 16, 24)  # saved as the 5-D video latent
    shutil.copy(latent_file, server.base / "input" / latent_file.name)
    later = workflow_check.to_api(json.loads(WORKFLOWS["06_decode_saved_video_latent"].read_text()), object_info,
                                  {**cvvae_overrides(object_info), ("LoadLatent", "latent"): latent_file.name})
    decode = next(k for k, v in later.items() if v["class_type"] == "CVVAEVideoDecode")
    later["99"] = {"class_type": "SaveImage", "inputs": {"images": [decode, 0], "filename_prefix": "check/from_saved"}}
    entry = server.run_prompt(later, timeout=900)
    again = png_frames(saved(server, entry, "images", "check/from_saved"))
    assert again.shape == video.shape and int(np.abs(again - video).max()) <= 1
    RESULTS["core tiled + saved latent"] = (f"core VAE Decode (Tiled) 64 px / 8 frames vs Video Decode untiled: max "
                                            f"{tiled_diff}/255; Save->Load Latent decode: max "
                                            f"{int(np.abs(again - video).max())}/255")
    note(RESULTS["core tiled + saved latent"])


def browser_tool() -> tuple[str | None, str]:
    """(path of comfy_browser.mjs, "") when it can run here, else (None, why not). Looks where the tool
    itself looks: chromium at $CHROMIUM or /usr/bin/chromium, playwright-core next to
    $COMFY_REF/browser-node (default ~/.cache/comfy-host), the tool, or the working directory."""
    tool = os.environ.get("COMFY_BROWSER_TOOL") or str(ROOT.parent / "shared" / "tools" / "comfy_browser.mjs")
    if not Path(tool).exists():
        return None, f"browser tool {tool} not found: set COMFY_BROWSER_TOOL to comfy_browser.mjs"
    node = shutil.which("node")
    if node is None:
        return None, "node (Node.js) is not on PATH; comfy_browser.mjs needs it"
    chromium = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        return None, f"no Chromium at {chromium} (install it, e.g. comfy_host.sh browser-setup, or set CHROMIUM)"
    ref = os.environ.get("COMFY_REF") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfy-host")
    bases = [str(Path(ref) / "browser-node" / "package.json"), str(Path(tool).parent / "package.json"),
             str(Path.cwd() / "package.json")]
    probe = ("const {createRequire} = require('module');"
             "process.exit(process.argv.slice(1).some(b => { try { createRequire(b).resolve('playwright-core');"
             " return true; } catch { return false; } }) ? 0 : 1);")
    if subprocess.run([node, "-e", probe, *bases], capture_output=True, timeout=60).returncode != 0:
        return None, ("npm package playwright-core not found (comfy_host.sh browser-setup installs it into "
                      f"$COMFY_REF/browser-node; looked for {bases})")
    return tool, ""


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_loads_in_the_real_frontend(server, object_info, name, tmp_path):
    tool, why_not = browser_tool()
    if tool is None:
        note(f"browser {name}: SKIPPED: {why_not}")
        pytest.skip(f"real-frontend check skipped: {why_not}")
    r = subprocess.run(["node", tool, str(WORKFLOWS[name]), "--url", server.url, "--out", str(tmp_path / "shot.png"),
                        "--timeout", "120", "--dump-api", str(tmp_path / "api.json")], capture_output=True, text=True, timeout=300)
    line = (r.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        report = json.loads(line)
    except json.JSONDecodeError:
        report = {"raw": r.stdout[-2000:], "stderr": r.stderr[-2000:]}
    note(f"browser {name}: rc={r.returncode} missing={report.get('missing_node_types')} "
         f"nodes_loaded={report.get('nodes_loaded')}")
    assert r.returncode != 2 and not report.get("missing_node_types"), report
    assert r.returncode == 0, report
    widget_errors = [e for e in report.get("console_errors", []) if "widget" in e.lower()]
    assert not widget_errors, widget_errors
    # The frontend's own UI->API conversion agrees with the one the CI checks and this test use.
    theirs = json.loads((tmp_path / "api.json").read_text())
    ours = workflow_check.to_api(json.loads(WORKFLOWS[name].read_text()), object_info)
    assert {k: v["inputs"] for k, v in theirs.items()} == {k: v["inputs"] for k, v in ours.items()}


def without_tooltips(value):
    """A schema with every "tooltip" dropped, also inside dynamic combo options (wording changes often)."""
    if isinstance(value, dict):
        return {k: without_tooltips(v) for k, v in value.items() if k != "tooltip"}
    if isinstance(value, list):
        return [without_tooltips(v) for v in value]
    return value


if __name__ == "__main__" and "--snapshot" in sys.argv:
    # Write tests/comfy_stub/object_info_core_<version>.json from a running server (COMFY_URL).
    import urllib.request
    url = os.environ.get("COMFY_URL", "http://127.0.0.1:8188")
    live = json.loads(urllib.request.urlopen(url + "/object_info").read())
    version = json.loads(urllib.request.urlopen(url + "/system_stats").read())["system"]["comfyui_version"]
    types = {n["type"] for p in WORKFLOWS.values() for n in json.loads(p.read_text())["nodes"]}
    core = {t: without_tooltips(live[t]) for t in sorted(types) if t in live and not t.startswith("CVVAE")}
    for info in core.values():
        for k in ("output_tooltips", "description", "python_module"):
            info.pop(k, None)
    comment = (f"Snapshot of a real ComfyUI {version} /object_info for the core nodes used by example_workflows/ "
               "(tooltips dropped). Regenerate: COMFYUI_DIR=... COMFY_URL=... python tests/test_comfy_integration.py --snapshot")
    out = workflow_check.snapshot_path(version)
    # Key order kept as served: a dynamic combo option's inputs have no input_order, their order is the dict's.
    out.write_text(json.dumps({"_comment": comment, **core}, indent=1))
    print("wrote", out)
