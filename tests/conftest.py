import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cvvae_core  # noqa: E402

# CI machines have 2 cores; CVVAE_TEST_THREADS=1 runs the suite single-threaded (kernels then take
# other code paths and reduce in another order: no test may depend on that).
torch.set_num_threads(int(os.environ.get("CVVAE_TEST_THREADS", min(2, torch.get_num_threads()))))


def tiny_config(variant: str = "sd", **kw) -> "cvvae_core.CVVAEConfig":
    """A four-level CV-VAE small enough for CPU tests, with the released structure."""
    base = dict(variant=variant, latent_channels=4 if variant == "sd" else 16, base_channels=16,
                channel_mult=(1, 2, 2, 2), blocks_per_level=1, norm_groups=8)
    base.update(kw)
    return cvvae_core.CVVAEConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm affines and biases included) a non-trivial seeded value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): thread
    start-up costs more than it gains on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["sd", "sd3"])
def variant(request):
    return request.param


@pytest.fixture
def tiny_model(variant):
    torch.manual_seed(0)
    return randomize_(cvvae_core.CVVAE(tiny_config(variant))).eval()


def video(b=1, t=5, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
