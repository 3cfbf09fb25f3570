"""Every example workflow checked against the node schemas: the pack's nodes from their own
define_schema() (through the ComfyUI stand-in), core nodes from a snapshot of a real server, once per
ComfyUI version with a snapshot (the workflows must load in all of them)."""
import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from pack_loader import ROOT, load_pack  # noqa: E402
import workflow_check  # noqa: E402

load_pack()
from cvvae_pack.nodes import nodes  # noqa: E402

WORKFLOW_DIR = ROOT / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
EXPECTED = {"01_cvvae_video_reconstruction_builtin", "02_svd_img2vid_cvvae", "03_sd15_txt2img_cvvae",
            "04_sd3_txt2img_cvvae_sd3", "05_image_framewise_core_vae", "06_decode_saved_video_latent",
            "07_svd_tune_output_layer_cvvae", "08_svd_img2vid_tuned_layer_cvvae"}


VERSIONS = workflow_check.snapshot_versions()
NEWEST = VERSIONS[-1]


def object_info(version=NEWEST):
    info = workflow_check.core_object_info(version)
    for node in nodes.NODES:
        info[node.define_schema().node_id] = node.GET_NODE_INFO_V1()
    return info


def load(path):
    return json.loads(Path(path).read_text())


def test_the_workflows_are_all_there():
    assert {p.stem for p in WORKFLOWS} == EXPECTED


def test_snapshots_cover_the_oldest_and_newest_tested_comfyui():
    assert {"0.8.0", "0.33.0"} <= set(VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_node_schemas(path, version):
    wf = load(path)
    assert wf.get("version") == 0.4 and "nodes" in wf and "links" in wf, "not a UI-format (litegraph) workflow"
    assert workflow_check.validate(wf, object_info(version)) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_names_its_model_files_in_a_note(path):
    wf = load(path)
    notes = " ".join(str(v) for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote") for v in n["widgets_values"])
    files = [v for n in wf["nodes"] if n["type"] in ("CVVAELoader", "CheckpointLoaderSimple", "ImageOnlyCheckpointLoader")
             for v in n["widgets_values"][:1]]
    assert files and notes
    for f in files:
        assert f.split("(")[0].strip() in notes, f"model file {f!r} not named in the note"


def test_cvvae_is_the_vae_everywhere_a_vae_is_used():
    for path in WORKFLOWS:
        wf = load(path)
        by_id = {n["id"]: n for n in wf["nodes"]}
        vae_links = [l for l in wf["links"] if l[5] == "VAE"]
        assert vae_links, path.stem
        assert all(by_id[l[1]]["type"] == "CVVAELoader" for l in vae_links), path.stem


@pytest.mark.parametrize("version", VERSIONS)
def test_validator_catches_broken_workflows(version):
    """The checks can fail: a wrong link type, an unknown node, a bad combo value, a missing input."""
    info = object_info(version)
    good = load(WORKFLOW_DIR / "02_svd_img2vid_cvvae.json")
    assert workflow_check.validate(good, info) == []

    wf = copy.deepcopy(good)
    vae_link = next(l for l in wf["links"] if l[5] == "VAE")
    vae_link[2] = 1  # CVVAELoader has one output
    assert any("no such output" in p for p in workflow_check.validate(wf, info))

    wf = copy.deepcopy(good)
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    latent_in = next(i for i in ks["inputs"] if i["name"] == "latent_image")
    model_link = next(l for l in wf["links"] if l[5] == "MODEL" and l[3] == ks["id"])
    next(l for l in wf["links"] if l[0] == latent_in["link"])[2] = 0  # CONDITIONING into LATENT
    assert any("wants LATENT but gets CONDITIONING" in p for p in workflow_check.validate(wf, info)), model_link

    wf = copy.deepcopy(good)
    next(n for n in wf["nodes"] if n["type"] == "CVVAELatentAdapter")["widgets_values"][0] = "sideways"
    assert any("'sideways' not one of" in p for p in workflow_check.validate(wf, info))

    wf = copy.deepcopy(good)
    next(n for n in wf["nodes"] if n["type"] == "CVVAEVideoDecode")["type"] = "CVVAEVideoDecodeOld"
    assert any("unknown node type" in p for p in workflow_check.validate(wf, info))

    wf = copy.deepcopy(good)
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"] = ks["widgets_values"][:3]
    assert any("no widget value" in p for p in workflow_check.validate(wf, info))

    wf = copy.deepcopy(good)
    dec = next(n for n in wf["nodes"] if n["type"] == "VAEDecode")
    next(i for i in dec["inputs"] if i["name"] == "vae")["link"] = None
    assert any("required input 'vae'" in p for p in workflow_check.validate(wf, info))


@pytest.mark.parametrize("version", VERSIONS)
def test_api_conversion_of_the_reconstruction_workflow(version):
    prompt = workflow_check.to_api(load(WORKFLOW_DIR / "01_cvvae_video_reconstruction_builtin.json"), object_info(version))
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    assert by_type["CVVAEVideoEncode"]["frame_policy"] == "pad"
    assert by_type["CVVAESyntheticVideo"] == {"width": 64, "height": 64, "frames": 17, "seed": 0}
    assert isinstance(by_type["CVVAEVideoDecode"]["samples"], list)
    assert "MarkdownNote" not in by_type


# What the real frontends send for the saved SaveVideo/CreateVideo widgets (dumped with
# app.graphToPrompt() in headless Chromium; the integration test re-checks this equality live).
FRONTEND_VIDEO_INPUTS = {
    "0.8.0": ({"fps": 8}, {"filename_prefix": "cvvae/reconstruction", "format": "auto", "codec": "auto"}),
    # 0.33: `format` is a dynamic combo whose option carries a nested `format.codec`; `codec` is a hidden
    # optional widget and CreateVideo gained an optional `bit_depth`: both keep their defaults.
    "0.33.0": ({"fps": 8, "bit_depth": 8}, {"filename_prefix": "cvvae/reconstruction", "format": "auto",
                                            "format.codec": "auto", "codec": "auto"}),
}


@pytest.mark.parametrize("version", sorted(FRONTEND_VIDEO_INPUTS))
def test_api_conversion_matches_the_frontend_for_video_nodes(version):
    prompt = workflow_check.to_api(load(WORKFLOW_DIR / "01_cvvae_video_reconstruction_builtin.json"), object_info(version))
    by_type = {v["class_type"]: {k: x for k, x in v["inputs"].items() if not isinstance(x, list)}
               for v in prompt.values()}
    assert (by_type["CreateVideo"], by_type["SaveVideo"]) == FRONTEND_VIDEO_INPUTS[version]


def test_dynamic_combo_widgets_follow_the_selected_option():
    """A dynamic combo's value picks which nested widgets come next, recursively (0.33 SaveVideo:
    format -> format.codec -> format.codec.encoding -> crf, color_space)."""
    info = object_info("0.33.0")
    node = {"id": 1, "type": "SaveVideo", "inputs": [],
            "widgets_values": ["clip", "mp4", "h264", "re-encode", 18.0, "sRGB", "auto"]}
    values, problems = workflow_check.map_widgets(node, info["SaveVideo"])
    assert problems == []
    assert values == {"filename_prefix": "clip", "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 18.0,
                      "format.codec.encoding.color_space": "sRGB", "codec": "auto"}
    node["widgets_values"] = ["clip", "mov", "auto"]
    wf = {"nodes": [node], "links": []}
    assert any("'mov' not one of" in p for p in workflow_check.validate(wf, info))
    node["widgets_values"] = ["clip", "webm", "h264"]  # webm offers auto/av1 only
    assert any("format.codec='h264' not one of" in p for p in workflow_check.validate(wf, info))
    node["widgets_values"] = ["clip", "mp4", "h264", "re-encode", 99.0, "sRGB"]
    assert any("crf=99.0 outside" in p for p in workflow_check.validate(wf, info))


def test_unknown_comfyui_version_says_how_to_snapshot_it():
    with pytest.raises(workflow_check.UnknownComfyVersionError, match="--snapshot"):
        workflow_check.core_object_info("0.0.1")
