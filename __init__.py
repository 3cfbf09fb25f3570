"""CV-VAE nodes for ComfyUI (video VAE whose latents match SD's / SD3's image VAE).

Registers through ComfyUI's node API v3 (``comfy_api.latest``: ``comfy_entrypoint``). This module
deliberately defines no NODE_CLASS_MAPPINGS: ComfyUI ignores ``comfy_entrypoint`` when it exists.
"""
import logging

MIN_COMFYUI_VERSION = "0.3.48"

try:
    from comfy_api.latest import ComfyExtension, io  # noqa: F401  (only checks that the API exists)
except ImportError:
    logging.getLogger("CV-VAE").error(
        "[CV-VAE] not loaded: these nodes need ComfyUI %s or newer (node API comfy_api.latest); "
        "update ComfyUI (git pull, or the Manager's 'Update ComfyUI').", MIN_COMFYUI_VERSION)
else:
    from .nodes import CVVAEExtension

    async def comfy_entrypoint() -> CVVAEExtension:
        return CVVAEExtension()
