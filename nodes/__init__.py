"""ComfyUI glue for CV-VAE: node definitions (API v3) and the VAE adapter. Imports ComfyUI modules."""
from comfy_api.latest import ComfyExtension

from .nodes import NODES, register_model_folder


class CVVAEExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


register_model_folder()

__all__ = ["CVVAEExtension", "NODES"]
