"""Stand-in for comfy.model_management on a CPU machine, with hooks the tests can drive."""
import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError
LOADS = []            # (patcher, memory_required, force_full_load) of every load_models_gpu call
EMPTY_CACHE_CALLS = []
FREE_MEMORY = 8 * 1024 ** 3
VAE_DTYPE = None      # tests may force a dtype (like --fp16-vae)
interrupt_processing = False


class InterruptProcessingException(Exception):
    pass


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def vae_dtype(device=None, allowed_dtypes=()):
    return VAE_DTYPE or torch.float32  # fp32 on CPU, as ComfyUI does


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def module_size(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    for m in models:
        LOADS.append((m, memory_required, force_full_load))
        m.load()


def soft_empty_cache(force=False):
    EMPTY_CACHE_CALLS.append(force)
