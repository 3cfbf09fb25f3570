"""Check UI-format (litegraph) workflows against node schemas, and convert them to API prompts.

Node schemas are /object_info entries: for the pack's nodes derived from their define_schema()
(through the stand-in's GET_NODE_INFO_V1, or taken from a live server), for core nodes from
object_info_core.json (a snapshot of a real server). Widget values map onto widget inputs in
order, as the frontend does: an INT/FLOAT/COMBO with control_after_generate carries one extra
value, a combo with an upload flag carries one extra "upload" value.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")
MODEL_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# Combos listing files on the user's machine: any file name of the right kind is valid.
FILE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): MODEL_EXTS, ("ImageOnlyCheckpointLoader", "ckpt_name"): MODEL_EXTS,
               ("CVVAELoader", "model_name"): MODEL_EXTS + ("builtin (small demo model)",),
               ("LoadImage", "image"): (".png", ".jpg", ".jpeg", ".webp")}


def core_object_info() -> dict:
    data = json.loads((HERE / "object_info_core.json").read_text())
    data.pop("_comment", None)
    return data


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for sec in ("required", "optional"):
        for name in info.get("input_order", {}).get(sec, []):
            spec = info["input"][sec][name]
            if is_widget(spec):
                out.append((name, spec))
    return out


def socket_type(info: dict, name: str):
    for sec in ("required", "optional"):
        spec = info["input"].get(sec, {}).get(name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], list) else spec[0]
    return None


def map_widgets(node: dict, info: dict) -> tuple[dict, list[str]]:
    """{input name: value} from widgets_values, and problems found."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return dict(values), []
    vals, problems, i = {}, [], 0
    for name, spec in widget_inputs(info):
        if i >= len(values):
            problems.append(f"no widget value for '{name}'")
            break
        vals[name] = values[i]
        i += 1
        opts = spec[1] if len(spec) > 1 else {}
        if opts.get("control_after_generate"):
            i += 1
        if any(opts.get(f) for f in UPLOAD_FLAGS):
            i += 1
    if i < len(values):
        problems.append(f"{len(values) - i} widget value(s) left over: {values[i:]}")
    return vals, problems


def check_value(node_type: str, name: str, spec, value) -> str | None:
    opts = spec[1] if len(spec) > 1 else {}
    kind = spec[0]
    if (node_type, name) in FILE_INPUTS:
        allowed = FILE_INPUTS[(node_type, name)]
        if not (isinstance(value, str) and (value in allowed or value.lower().endswith(allowed))):
            return f"{name}={value!r} is not a file name of the expected kind {allowed}"
        return None
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        return None if value in options else f"{name}={value!r} not one of {options}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{name}={value!r} is not a number of type {kind}"
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"{name}={value!r} outside [{opts.get('min')}, {opts.get('max')}]"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}={value!r} is not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}={value!r} is not a string"
    return None


def validate(workflow: dict, object_info: dict) -> list[str]:
    """Every problem in a UI-format workflow: unknown node types, links whose types do not match the
    schemas, missing required inputs, invalid widget values. Empty list = valid."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = {l[0]: l for l in workflow.get("links", [])}
    for node in nodes.values():
        t = node["type"]
        where = f"node {node['id']} ({t})"
        if t in VIRTUAL:
            continue
        info = object_info.get(t)
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        vals, p = map_widgets(node, info)
        problems += [f"{where}: {x}" for x in p]
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec in widget_inputs(info):
            if name in vals and name not in linked:
                err = check_value(t, name, spec, vals[name])
                if err:
                    problems.append(f"{where}: {err}")
        for name in info["input_order"].get("required", []):
            spec = info["input"]["required"][name]
            if not is_widget(spec) and name not in linked:
                problems.append(f"{where}: required input '{name}' ({spec[0]}) is not connected")
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp.get("link") is None:
                continue
            link = links.get(inp["link"])
            if link is None:
                problems.append(f"{where}: input '{inp['name']}' points at missing link {inp['link']}")
                continue
            _, src_id, src_slot, dst_id, dst_slot, ltype = link[:6]
            want = socket_type(info, inp["name"])
            if want is None:
                problems.append(f"{where}: has no input named '{inp['name']}'")
                continue
            src = nodes.get(src_id)
            if src is None or src["type"] in VIRTUAL:
                problems.append(f"{where}: input '{inp['name']}' linked from missing/virtual node {src_id}")
                continue
            src_info = object_info.get(src["type"])
            if src_info is None:
                continue  # reported as unknown type
            if src_slot >= len(src_info["output"]):
                problems.append(f"{where}: link from {src['type']} slot {src_slot}, which has no such output")
                continue
            have = src_info["output"][src_slot]
            if not (have == want or "*" in (have, want) or (want == "COMBO" and isinstance(have, list))):
                problems.append(f"{where}: input '{inp['name']}' wants {want} but gets {have} from "
                                f"{src['type']} output {src_slot}")
            if ltype not in (have, "*"):
                problems.append(f"{where}: link {link[0]} says type {ltype}, source gives {have}")
            if dst_id != node["id"] or dst_slot != slot:
                problems.append(f"{where}: link {link[0]} ends at node {dst_id} slot {dst_slot}, not here")
    return problems


def to_api(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """API prompt {id: {class_type, inputs}} (no muted/bypassed/virtual nodes support beyond skipping
    Notes). ``overrides`` = {(node type, input name): value} applied to widget values."""
    overrides = overrides or {}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in nodes.values():
        if node["type"] in VIRTUAL or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        inputs, _ = map_widgets(node, info)
        for (t, name), value in overrides.items():
            if t == node["type"] and name in inputs:
                inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
