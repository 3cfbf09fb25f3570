"""Stand-in for comfy.model_management on a CPU machine, with hooks the tests can drive.

What differs between ComfyUI generations (``comfy.sd.GENERATION``) is looked up per access (module
``__getattr__``): 0.8.0 has no ``intermediate_dtype``, ``is_oom`` / ``raise_non_oom`` or
``cuda_device_context``, and its InterruptProcessingException is an Exception; from 0.33.0 on it is a
BaseException (so ``except Exception`` blocks do not swallow a cancel).
"""
import contextlib

import torch

OOM_EXCEPTION = torch.cuda.OutOfMemoryError
LOADS = []            # (patcher, memory_required, force_full_load) of every load_models_gpu call
EMPTY_CACHE_CALLS = []
DEVICE_CONTEXTS = []  # devices entered with cuda_device_context
FREE_MEMORY = 8 * 1024 ** 3
VAE_DTYPE = None      # tests may force a dtype (like --fp16-vae)
INTERMEDIATE_DTYPE = torch.float32  # tests may set float16 (like --fp16-intermediates)
interrupt_processing = False


class _InterruptException(Exception):  # ComfyUI 0.8.0
    pass


class _InterruptBaseException(BaseException):  # ComfyUI 0.33.0 and newer
    pass


_InterruptException.__name__ = _InterruptBaseException.__name__ = "InterruptProcessingException"


def _intermediate_dtype():
    return INTERMEDIATE_DTYPE


def _is_oom(e):
    return isinstance(e, OOM_EXCEPTION)


def _raise_non_oom(e):
    if not _is_oom(e):
        raise e


@contextlib.contextmanager
def _cuda_device_context(device):
    DEVICE_CONTEXTS.append(device)
    yield


_SINCE_033 = {"intermediate_dtype": _intermediate_dtype, "is_oom": _is_oom, "raise_non_oom": _raise_non_oom,
              "cuda_device_context": _cuda_device_context}


def __getattr__(name):
    from . import sd
    if name == "InterruptProcessingException":
        return _InterruptBaseException if sd.since("0.33") else _InterruptException
    if name in _SINCE_033 and sd.since("0.33"):
        return _SINCE_033[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} in ComfyUI {sd.GENERATION}")


def processing_interrupted():
    return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise __getattr__("InterruptProcessingException")()


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


def unload_model_and_clones(model, unload_additional_models=True, all_devices=False):
    model.unload()


def soft_empty_cache(force=False):
    EMPTY_CACHE_CALLS.append(force)
