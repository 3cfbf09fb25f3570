"""Stand-in for comfy_api.latest: ComfyExtension and the subset of `io` the pack uses."""
from . import io  # noqa: F401


class ComfyExtension:
    async def on_load(self):
        pass

    async def get_node_list(self):
        return []
