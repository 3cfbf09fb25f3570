"""Import the pack the way ComfyUI does (its directory as a package, via its __init__.py) against
this stand-in. Usage: ``from pack_loader import load_pack`` once this folder is on sys.path."""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

STUB = Path(__file__).resolve().parent
ROOT = STUB.parents[1]
PACK_NAME = "cvvae_pack"


def load_pack(name=PACK_NAME):
    if name in sys.modules:
        return sys.modules[name]
    if "COMFY_STUB_MODELS" not in os.environ:
        models = tempfile.mkdtemp(prefix="cvvae_stub_models_")
        atexit.register(shutil.rmtree, models, ignore_errors=True)
        os.environ["COMFY_STUB_MODELS"] = models
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
