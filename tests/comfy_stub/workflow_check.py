"""Check UI-format (litegraph) workflows against node schemas, and convert them to API prompts.

Node schemas are /object_info entries: for the pack's nodes derived from their define_schema()
(through the stand-in's GET_NODE_INFO_V1, or taken from a live server), for core nodes from
object_info_core_<ComfyUI version>.json (a snapshot of a real server per supported version, since
core schemas change between versions). Widget values map onto widget inputs in order, as the
frontend does: an INT/FLOAT/COMBO with control_after_generate carries one extra value, a combo with
an upload flag carries one extra "upload" value, and a V3 dynamic combo (COMFY_DYNAMICCOMBO_V3, e.g.
SaveVideo's `format` since ComfyUI 0.3x) is followed by the widgets of its selected option, named
"<combo>.<input>". Optional widgets with no saved value (inputs added by a newer ComfyUI, hidden
widgets) keep their default, which the frontend also sends.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "file_upload")
MODEL_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# Combos listing files on the user's machine: any file name of the right kind is valid.
FILE_INPUTS = {("CheckpointLoaderSimple", "ckpt_name"): MODEL_EXTS, ("ImageOnlyCheckpointLoader", "ckpt_name"): MODEL_EXTS,
               ("CVVAELoader", "model_name"): MODEL_EXTS + ("builtin (small demo model)",),
               ("CVVAEApplySVDOutputLayer", "layer_name"): (".safetensors",),
               ("LoadImage", "image"): (".png", ".jpg", ".jpeg", ".webp"), ("LoadLatent", "latent"): (".latent",)}
SNAPSHOT_PREFIX = "object_info_core_"


class UnknownComfyVersionError(LookupError):
    """No core-node snapshot for a ComfyUI version."""


def snapshot_versions() -> list[str]:
    """ComfyUI versions with a core-node snapshot, oldest first."""
    names = [p.stem[len(SNAPSHOT_PREFIX):] for p in HERE.glob(SNAPSHOT_PREFIX + "*.json")]
    return sorted(names, key=lambda v: tuple(int(x) for x in v.split(".")))


def snapshot_path(version: str) -> Path:
    return HERE / f"{SNAPSHOT_PREFIX}{version}.json"


def core_object_info(version: str) -> dict:
    """The core node schemas of ComfyUI ``version`` (one of :func:`snapshot_versions`)."""
    path = snapshot_path(version)
    if not path.exists():
        raise UnknownComfyVersionError(
            f"no core-node snapshot for ComfyUI {version} (have {snapshot_versions()}); with that ComfyUI "
            f"running, write one: COMFYUI_DIR=<its checkout> COMFY_URL=<its url> python tests/test_comfy_integration.py --snapshot")
    data = json.loads(path.read_text())
    data.pop("_comment", None)
    return data


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ordered_inputs(inputs: dict, order: dict | None = None) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of an /object_info ``input`` section in the frontend's order: required,
    then optional; ``order`` is the node's input_order (a dynamic combo's options have none: the
    order of their dicts)."""
    out = []
    for sec in ("required", "optional"):
        specs = inputs.get(sec, {})
        for name in (order or {}).get(sec, list(specs)):
            out.append((name, specs[name], sec == "optional"))
    return out


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """Top-level widget inputs (a dynamic combo's nested widgets depend on its value: see widget_values)."""
    return [(name, spec) for name, spec, _ in ordered_inputs(info["input"], info.get("input_order")) if is_widget(spec)]


def socket_type(info: dict, name: str):
    for sec in ("required", "optional"):
        spec = info["input"].get(sec, {}).get(name)
        if spec is not None:
            return "COMBO" if isinstance(spec[0], list) else spec[0]
    return None


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 else {}


def widget_default(spec):
    """What the frontend puts in a widget that has no saved value (None: no default known)."""
    opts = _options(spec)
    if "default" in opts:
        return opts["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else None
    if spec[0] == "COMBO" and opts.get("options"):
        return opts["options"][0]
    if spec[0] == DYNAMIC_COMBO and opts.get("options"):
        return opts["options"][0]["key"]
    return None


def _selected_option(spec, value) -> dict | None:
    return next((o for o in _options(spec).get("options", []) if o.get("key") == value), None)


def widget_values(node: dict, info: dict) -> tuple[list[tuple[str, list, object]], list[str]]:
    """(full name, spec, value) of every widget the frontend builds for ``node``, filled from its
    widgets_values in order, and problems found. A dynamic combo's selected option adds its widgets
    right after it, named "<combo>.<input>" (recursively); unselected options add nothing."""
    values = node.get("widgets_values") or []
    problems, filled = [], []
    if isinstance(values, dict):  # saved by name (some V3 nodes); spec None = not a top-level widget
        specs = dict(widget_inputs(info))
        return [(name, specs.get(name), value) for name, value in values.items()], []
    pos = 0

    def fill(inputs, prefix):
        nonlocal pos
        for name, spec, optional in inputs:
            if not is_widget(spec):
                continue
            full = prefix + name
            if pos < len(values):
                value = values[pos]
                pos += 1
                opts = _options(spec)
                pos += bool(opts.get("control_after_generate")) + any(opts.get(f) for f in UPLOAD_FLAGS)
            elif optional or _options(spec).get("hidden"):
                # Saved by an older ComfyUI that lacked this input, or a hidden widget: the default.
                value = widget_default(spec)
                if value is None:
                    continue
            else:
                problems.append(f"no widget value for '{full}'")
                continue
            filled.append((full, spec, value))
            if spec[0] == DYNAMIC_COMBO:
                option = _selected_option(spec, value)
                if option is not None:
                    fill(ordered_inputs(option.get("inputs", {})), full + ".")

    fill(ordered_inputs(info["input"], info.get("input_order")), "")
    if pos < len(values):
        problems.append(f"{len(values) - pos} widget value(s) left over: {values[pos:]}")
    return filled, problems


def map_widgets(node: dict, info: dict) -> tuple[dict, list[str]]:
    """{input name: value} from widgets_values (dynamic combo widgets as "<combo>.<input>"), and problems found."""
    filled, problems = widget_values(node, info)
    return {name: value for name, _, value in filled}, problems


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
    if kind == DYNAMIC_COMBO:
        keys = [o.get("key") for o in opts.get("options", [])]
        return None if value in keys else f"{name}={value!r} not one of {keys}"
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
        filled, p = widget_values(node, info)
        problems += [f"{where}: {x}" for x in p]
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec, value in filled:
            if spec is not None and name not in linked:
                err = check_value(t, name, spec, value)
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
