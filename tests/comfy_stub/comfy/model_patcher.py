"""Stand-in for comfy.model_patcher.ModelPatcher: holds the module and moves it between devices.

From ComfyUI 0.33.0 on (``comfy.sd.GENERATION``) a patcher also has ``get_free_memory`` (the global
figure plus what dynamic VRAM could reclaim: ``DYNAMIC_VRAM`` here), and ``deepclone_multigpu``
builds a fresh model through the loader's ``cached_patcher_init`` factory (Select VAE Device onto
another GPU), refusing when the loader set none.

Weight patches (``add_patches``; the ``"set"`` and ``"diff"`` kinds) are written into the shared
model when a patcher loads and undone when another patcher of the same model loads or ``unpatch_model``
runs, as ComfyUI's ``load_models_gpu`` does: clones share one model and never copy it.
"""
import torch

from . import model_management

DYNAMIC_VRAM = 0  # bytes a 0.3x patcher counts as free on top of model_management.get_free_memory


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.cached_patcher_init = None
        self.parent = None
        self.patches = {}    # key -> [(strength_patch, patch, strength_model, offset, function)]
        self.backup = {}
        if getattr(model, "device", None) is None:
            model.device = offload_device

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def load(self):
        self.patch_model()
        self.model.to(self.load_device)

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in model_sd:
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
                added.append(key)
        return added

    def model_state_dict(self, filter_prefix=None):
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        current = getattr(self.model, "_stub_patched_by", None)
        if current is self:
            return self.model
        if current is not None:
            current.unpatch_model()
        sd = self.model.state_dict()
        with torch.no_grad():
            for key, entries in self.patches.items():
                weight = sd[key]
                self.backup[key] = weight.detach().clone()
                for strength, patch, strength_model, _, _ in entries:
                    kind, value = patch if isinstance(patch, tuple) and isinstance(patch[0], str) else ("diff", (patch,))
                    if strength_model != 1.0:
                        weight.mul_(strength_model)
                    if kind == "set":
                        weight.copy_(value[0])
                    elif kind == "diff":
                        weight.add_(strength * value[0].to(weight.device, weight.dtype))
                    else:
                        raise NotImplementedError(f"stand-in ModelPatcher: patch kind {kind}")
        self.model._stub_patched_by = self
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        sd = self.model.state_dict()
        with torch.no_grad():
            for key, value in self.backup.items():
                sd[key].copy_(value)
        self.backup = {}
        if getattr(self.model, "_stub_patched_by", None) is self:
            self.model._stub_patched_by = None

    def unload(self):
        self.model.to(self.offload_device)

    def is_dynamic(self):
        return False

    @property
    def get_free_memory(self):
        from . import sd
        if not sd.since("0.33"):
            raise AttributeError("ModelPatcher.get_free_memory is new in ComfyUI 0.33")
        return lambda device: model_management.get_free_memory(device) + DYNAMIC_VRAM

    def clone(self, model=None):
        n = ModelPatcher(self.model if model is None else model, self.load_device, self.offload_device, self.size)
        n.cached_patcher_init, n.parent = self.cached_patcher_init, self
        n.patches = {k: list(v) for k, v in self.patches.items()}
        return n

    def deepclone_multigpu(self, new_load_device=None):
        if self.cached_patcher_init is None:
            raise RuntimeError(f"Cannot create multigpu deepclone of {type(self.model).__name__}: the loader that "
                               "produced this model does not support multigpu (cached_patcher_init is not initialized).")
        model_management.unload_model_and_clones(self)
        factory, args = self.cached_patcher_init[:2]
        n = self.clone(model=factory(*args).model)
        if new_load_device is not None:
            n.load_device = new_load_device
        return n
