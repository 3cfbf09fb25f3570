"""In a REAL ComfyUI process: tune SVD's output layer for a few steps with the pack's tuning node on
ComfyUI's own SVD_img2vid (a random-weight checkpoint is enough), apply it with the Apply node, and
check that the patched model's state dict differs from the base only in ``out.2`` and that loading
the base model again removes the patch. Not collected by pytest (a ComfyUI with SVD takes ~12 GB, so
it runs alone, with ComfyUI's python):

    PATH/TO/ComfyUI-venv/bin/python tests/real_comfy_svd_apply.py --comfy-dir PATH/TO/ComfyUI \\
        --ckpt PATH/TO/random_svd.safetensors
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--comfy-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--bf16", action="store_true", help="UNet in bf16 (half the memory; CPU default is fp32)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.comfy_dir).resolve()))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths

    folder_paths.models_dir = tempfile.mkdtemp(prefix="svd_apply_models_")
    spec = importlib.util.spec_from_file_location("cvvae_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["cvvae_pack"] = pack
    spec.loader.exec_module(pack)
    from cvvae_pack.nodes import nodes, svd_tuning

    options = {"dtype": torch.bfloat16} if args.bf16 else {}
    t0 = time.time()
    model, _, _, clip_vision = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=False, output_clip=False,
                                                                     output_clipvision=True,
                                                                     model_options=options)
    print(f"ComfyUI {getattr(comfy, '__version__', '')} loaded {type(model.model).__name__} in {time.time() - t0:.0f}s")
    vae = nodes.CVVAELoader.execute(model_name=nodes.BUILTIN_NAME, dtype="auto").args[0]
    images = torch.cat([nodes.synthetic_clip(5, 64, 64, seed=k) for k in range(2)])
    with torch.inference_mode():   # as ComfyUI runs nodes
        name, _, report = svd_tuning.CVVAETuneSVDOutputLayer.execute(
            model=model, clip_vision=clip_vision, vae=vae, name="real_check", images=images, steps=2,
            learning_rate=1e-3, frames=5, width=64, height=64, heldout_clips=1, resume=False).args
    print(report)

    base = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    patched = svd_tuning.CVVAEApplySVDOutputLayer.execute(model=model, layer_name=name).args[0]
    mm.load_models_gpu([patched])
    after = patched.model.state_dict()
    changed = sorted(k for k, v in after.items() if not torch.equal(v, base[k]))
    print("keys that differ from the base:", changed)
    assert changed == ["diffusion_model.out.2.bias", "diffusion_model.out.2.weight"], changed
    mm.load_models_gpu([model])
    left = sorted(k for k, v in model.model.state_dict().items() if not torch.equal(v, base[k]))
    assert not left, f"still patched after loading the base model: {left}"
    try:
        wrong = svd_tuning.CVVAEApplySVDOutputLayer.execute(model=vae.patcher, layer_name=name)
    except ValueError as e:
        print("non-SVD MODEL refused:", e)
    else:
        raise AssertionError(f"a VAE patcher was accepted: {wrong}")
    print("OK")


if __name__ == "__main__":
    main()
