"""Stand-in for comfy_api.latest.io: schema objects plus the V1 node info ComfyUI derives from them."""
from __future__ import annotations

from dataclasses import dataclass, field


def _prune(d):
    return {k: v for k, v in d.items() if v is not None}


class Input:
    io_type = None

    def __init__(self, id, display_name=None, optional=False, tooltip=None, **extra):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.extra = extra

    def as_dict(self):
        return _prune({"display_name": self.display_name, "optional": self.optional or None,
                       "tooltip": self.tooltip, **self.extra})


class Output:
    io_type = None

    def __init__(self, id=None, display_name=None, tooltip=None):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _type(name, input_base=Input):
    in_cls = type("Input", (input_base,), {"io_type": name})
    out_cls = type("Output", (Output,), {"io_type": name})
    return type(name.title(), (), {"io_type": name, "Input": in_cls, "Output": out_cls})


class _WidgetInput(Input):
    def __init__(self, id, display_name=None, optional=False, tooltip=None, default=None, **extra):
        super().__init__(id, display_name, optional, tooltip, **extra)
        self.default = default

    def as_dict(self):
        return _prune({**super().as_dict(), "default": self.default})


Int = _type("INT", _WidgetInput)
Float = _type("FLOAT", _WidgetInput)
Boolean = _type("BOOLEAN", _WidgetInput)
String = _type("STRING", _WidgetInput)
Image = _type("IMAGE")
Latent = _type("LATENT")
Vae = _type("VAE")
Model = _type("MODEL")
ClipVision = _type("CLIP_VISION")


class Combo:
    io_type = "COMBO"

    class Input(_WidgetInput):
        io_type = "COMBO"

        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, default=None, **extra):
            super().__init__(id, display_name, optional, tooltip, default, **extra)
            self.options = list(options or [])

        def as_dict(self):
            return {**super().as_dict(), "options": self.options}


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False


class NodeOutput:
    def __init__(self, *args, ui=None):
        self.args = args
        self.ui = ui

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        return cls.define_schema()

    @classmethod
    def GET_NODE_INFO_V1(cls) -> dict:
        """What ComfyUI's /object_info serves for this node (the fields the workflow checks use)."""
        s = cls.GET_SCHEMA()
        inp = {"required": {}}
        for i in s.inputs:
            inp.setdefault("optional" if i.optional else "required", {})[i.id] = [i.io_type, i.as_dict()]
        return {"input": inp, "input_order": {k: list(v) for k, v in inp.items()},
                "output": [o.io_type for o in s.outputs],
                "output_name": [o.display_name or o.io_type for o in s.outputs],
                "name": s.node_id, "display_name": s.display_name, "category": s.category,
                "description": s.description, "output_node": s.is_output_node}
