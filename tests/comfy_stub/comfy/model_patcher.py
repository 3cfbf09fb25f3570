"""Stand-in for comfy.model_patcher.ModelPatcher: holds the module and moves it between devices."""
from . import model_management


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        if getattr(model, "device", None) is None:
            model.device = offload_device

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def load(self):
        self.model.to(self.load_device)

    def unload(self):
        self.model.to(self.offload_device)

    def get_free_memory(self, device):
        return model_management.get_free_memory(device)
