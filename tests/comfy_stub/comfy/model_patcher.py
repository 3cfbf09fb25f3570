"""Stand-in for comfy.model_patcher.ModelPatcher: holds the module and moves it between devices.

From ComfyUI 0.33.0 on (``comfy.sd.GENERATION``) a patcher also has ``get_free_memory`` (the global
figure plus what dynamic VRAM could reclaim: ``DYNAMIC_VRAM`` here), and ``deepclone_multigpu``
builds a fresh model through the loader's ``cached_patcher_init`` factory (Select VAE Device onto
another GPU), refusing when the loader set none.
"""
from . import model_management

DYNAMIC_VRAM = 0  # bytes a 0.3x patcher counts as free on top of model_management.get_free_memory


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.cached_patcher_init = None
        self.parent = None
        if getattr(model, "device", None) is None:
            model.device = offload_device

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def load(self):
        self.model.to(self.load_device)

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
