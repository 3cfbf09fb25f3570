"""Tuning SVD's output layer (cvvae_core.train.svd_head) and its nodes, against the ComfyUI stand-in's
tiny SVD-like model and CLIP vision model, with a tiny random CV-VAE."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy_stub"))
from pack_loader import load_pack  # noqa: E402

load_pack()
import comfy.model_management as mm  # noqa: E402  (the stand-in)
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
from comfy.clip_vision import ClipVisionModel  # noqa: E402
from comfy.model_base import SVD_img2vid  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from cvvae_pack import cvvae_core  # noqa: E402
from cvvae_pack.cvvae_core.train import svd_head  # noqa: E402
from cvvae_pack.nodes import nodes, svd_tuning  # noqa: E402

TINY = cvvae_core.CVVAEConfig(variant="sd", latent_channels=4, base_channels=8, channel_mult=(1, 2, 2, 2),
                              blocks_per_level=1, norm_groups=4)
FRAMES, SIZE = 5, 64


def svd_patcher(seed=0):
    torch.manual_seed(seed)
    return comfy.model_patcher.ModelPatcher(SVD_img2vid().eval(), "cpu", "cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    cvvae_core.save_model(cvvae_core.CVVAE(TINY), Path(folder_paths.models_dir) / "vae" / "tiny_svd_cvvae.safetensors")
    return nodes.CVVAELoader.execute(model_name="tiny_svd_cvvae.safetensors", dtype="auto").args[0]


@pytest.fixture(scope="module")
def clip_vision():
    torch.manual_seed(1)
    return ClipVisionModel()


@pytest.fixture(scope="module")
def images():
    """Three clips of 5 frames (the last is held out)."""
    return torch.cat([nodes.synthetic_clip(FRAMES, SIZE, SIZE, seed=k) for k in range(3)])


def tune(model, clip_vision, vae, images, name, **kw):
    args = dict(model=model, clip_vision=clip_vision, vae=vae, name=name, images=images, steps=4, learning_rate=1e-2,
                batch_size=1, frames=FRAMES, width=SIZE, height=SIZE, seed=0, heldout_clips=1, resume=False)
    args.update(kw)
    return svd_tuning.CVVAETuneSVDOutputLayer.execute(**args).args


def random_examples(model, n=2, frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [svd_head.Example(torch.randn(frames, 4, 8, 8, generator=g),
                             svd_head.Conditioning(torch.randn(1, 16, generator=g), torch.randn(1, 4, 8, 8, generator=g)))
            for _ in range(n)]


# The objective and the loop -----------------------------------------------------------------------

def test_loss_on_a_fixed_batch_decreases_and_only_the_head_learns():
    model = svd_patcher().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = svd_head.HeadTuner(model, svd_head.HeadTuneConfig(learning_rate=3e-2, steps=40), "cpu")
    batch = random_examples(model)
    start = tuner.evaluate(batch, tuner.heads())
    assert start["base"] == pytest.approx(start["tuned"])
    result = svd_head.tune(tuner, lambda step: batch, batch)
    assert result.heldout_after < 0.9 * result.heldout_before
    assert result.heldout_before == pytest.approx(start["base"])
    # The model itself is untouched and got no gradients; only the copy of out.2 moved.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(tuner.weight.detach(), before["diffusion_model.out.2.weight"])
    assert tuner.weight.grad is not None and tuner.bias.grad is not None


def test_trunk_runs_without_autograd():
    model = svd_patcher().model
    tuner = svd_head.HeadTuner(model, svd_head.HeadTuneConfig(), "cpu")
    batch = random_examples(model, n=1)
    x0, x, sigma, kwargs = tuner.noisy_batch(batch, torch.tensor([1.0]), [torch.randn_like(batch[0].latent)])
    feats = tuner.features(x, sigma, kwargs)
    assert feats.shape == (2, model.diffusion_model.out[2].in_channels, 8, 8)
    assert not feats.requires_grad and feats.grad_fn is None
    # The head applied to the features is the model's own output.
    torch.testing.assert_close(tuner.denoised(feats, x, sigma), model.apply_model(x, sigma, **kwargs))


def test_edm_weight_and_sigmas():
    s = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(svd_head.edm_loss_weight(s, 1.0), (s ** 2 + 1) / s ** 2)
    g = torch.Generator().manual_seed(0)
    ln = svd_head.sample_sigmas(20000, 0.7, 1.6, g).log()
    assert abs(float(ln.mean()) - 0.7) < 0.05 and abs(float(ln.std()) - 1.6) < 0.05


def test_identical_seeds_give_identical_losses_and_resume_continues_exactly():
    model = svd_patcher().model
    batches = lambda step: random_examples(model, n=1, seed=step)  # noqa: E731
    cfg = svd_head.HeadTuneConfig(learning_rate=1e-2, steps=6, seed=3)
    a = svd_head.tune(svd_head.HeadTuner(model, cfg, "cpu"), batches, [])
    b = svd_head.tune(svd_head.HeadTuner(model, cfg, "cpu"), batches, [])
    assert a.losses == b.losses
    # Stopped after 3 steps, saved, resumed: the same losses as the run that never stopped.
    tuner = svd_head.HeadTuner(model, cfg, "cpu")
    calls = iter(range(100))
    part = svd_head.tune(tuner, batches, [], interrupted=lambda: next(calls) >= 3)
    assert part.interrupted and part.step == 3 and len(part.losses) == 3
    path = Path(folder_paths.models_dir) / "resume_core.safetensors"
    svd_head.save_head(path, tuner, svd_head.file_meta(model, cfg, part, 5, 64, 64, "test"))
    saved = svd_head.load_head(path)
    resumed = svd_head.HeadTuner(model, cfg, "cpu")
    svd_head.restore(resumed, saved)
    rest = svd_head.tune(resumed, batches, [], start=saved.meta["steps_done"], losses=saved.meta["losses"])
    assert [s for s, _ in rest.losses] == [s for s, _ in a.losses]
    torch.testing.assert_close(torch.tensor([v for _, v in rest.losses]), torch.tensor([v for _, v in a.losses]))


def test_head_file_round_trips():
    model = svd_patcher().model
    cfg = svd_head.HeadTuneConfig(learning_rate=1e-2, steps=2)
    tuner = svd_head.HeadTuner(model, cfg, "cpu")
    result = svd_head.tune(tuner, lambda step: random_examples(model, n=1), [])
    path = Path(folder_paths.models_dir) / "round_trip.safetensors"
    svd_head.save_head(path, tuner, svd_head.file_meta(model, cfg, result, 5, 64, 64, "test"))
    head = svd_head.load_head(path)
    assert torch.equal(head.weight, tuner.weight.detach()) and torch.equal(head.bias, tuner.bias.detach())
    assert head.meta["steps_done"] == 2 and head.meta["frames"] == 5 and head.meta["losses"] == [list(p) for p in result.losses]
    assert path.stat().st_size < 64 * 1024
    svd_head.check_identity(head.meta, model)
    restored = svd_head.HeadTuner(model, cfg, "cpu")
    svd_head.restore(restored, head)
    for name, p in (("weight", tuner.weight), ("bias", tuner.bias)):
        mine = restored.optimizer.state[restored.weight if name == "weight" else restored.bias]
        theirs = tuner.optimizer.state[p]
        torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"])
        torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"])


# Nodes ----------------------------------------------------------------------------------------------

def test_tune_node_writes_a_layer_the_apply_node_patches(vae, clip_vision, images):
    model = svd_patcher()
    name, curve, report = tune(model, clip_vision, vae, images, "node_head", steps=3)
    assert name == "node_head.safetensors"
    assert name in folder_paths.get_filename_list(svd_tuning.HEAD_FOLDER)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= float(curve.min()) and float(curve.max()) <= 1
    assert "held-out denoising loss on 1 clips" in report and "before" in report and "after" in report
    head = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, name))
    assert head.meta["steps_done"] == 3 and head.meta["heldout_before"] > 0

    base_sd = {k: v.clone() for k, v in model.model.state_dict().items()}
    patched = svd_tuning.CVVAEApplySVDOutputLayer.execute(model=model, layer_name=name).args[0]
    assert patched is not model and patched.model is model.model   # a clone, no copy of the UNet
    mm.load_models_gpu([patched])
    changed = {k for k, v in patched.model_state_dict().items() if not torch.equal(v, base_sd[k])}
    assert changed == {"diffusion_model.out.2.weight", "diffusion_model.out.2.bias"}
    torch.testing.assert_close(patched.model_state_dict()["diffusion_model.out.2.weight"], head.weight)
    mm.load_models_gpu([model])   # the base model again: unpatched
    assert all(torch.equal(v, base_sd[k]) for k, v in model.model.state_dict().items())


def test_node_losses_repeat_with_the_same_seed(vae, clip_vision, images):
    model = svd_patcher()
    first = tune(model, clip_vision, vae, images, "seed_a")[2]
    second = tune(model, clip_vision, vae, images, "seed_b")[2]
    a = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "seed_a.safetensors")).meta
    b = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "seed_b.safetensors")).meta
    assert a["losses"] == b["losses"] and a["heldout_after"] == b["heldout_after"]
    assert first.replace("seed_a", "seed_b") == second
    other = tune(model, clip_vision, vae, images, "seed_c", seed=1)
    c = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "seed_c.safetensors")).meta
    assert c["losses"] != a["losses"] and other


def test_cancel_keeps_the_last_state_and_resume_continues(vae, clip_vision, images, monkeypatch):
    model = svd_patcher()
    tune(model, clip_vision, vae, images, "whole", steps=4)
    whole = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "whole.safetensors"))

    def cancel_after_two(text):
        if text.startswith("step 2/"):
            mm.interrupt_processing = True
    monkeypatch.setattr(svd_tuning.runtime, "show_progress_text", cancel_after_two)
    with pytest.raises(mm.InterruptProcessingException):
        tune(model, clip_vision, vae, images, "cancelled", steps=4)
    assert not mm.interrupt_processing
    part = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "cancelled.safetensors"))
    assert part.meta["steps_done"] == 2 and part.meta["losses"] == whole.meta["losses"][:2]

    monkeypatch.setattr(svd_tuning.runtime, "show_progress_text", lambda text: None)
    tune(model, clip_vision, vae, images, "cancelled", steps=4, resume=True)
    done = svd_head.load_head(folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "cancelled.safetensors"))
    assert done.meta["steps_done"] == 4
    torch.testing.assert_close(torch.tensor(done.meta["losses"]), torch.tensor(whole.meta["losses"]))
    torch.testing.assert_close(done.weight, whole.weight)


def test_apply_refuses_wrong_files_and_models(vae, clip_vision, images):
    model = svd_patcher()
    tune(model, clip_vision, vae, images, "for_model_0", steps=1)
    other = svd_patcher(seed=5)   # same architecture, other weights
    with pytest.raises(ValueError, match="tuned on another base model"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=other, layer_name="for_model_0.safetensors")
    wider = comfy.model_patcher.ModelPatcher(SVD_img2vid(channels=16).eval(), "cpu", "cpu")
    with pytest.raises(ValueError, match="shape"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=wider, layer_name="for_model_0.safetensors")
    not_svd = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), "cpu", "cpu")
    with pytest.raises(ValueError, match="expected a Stable Video Diffusion img2vid MODEL"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=not_svd, layer_name="for_model_0.safetensors")
    folder = Path(folder_paths.get_folder_paths(svd_tuning.HEAD_FOLDER)[0])
    save_file({"weight": torch.zeros(4, 32, 3, 3)}, str(folder / "lora.safetensors"))
    with pytest.raises(ValueError, match="expected format"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=model, layer_name="lora.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=model, layer_name="broken.safetensors")
    with pytest.raises(FileNotFoundError, match="not in models/cvvae_svd_heads"):
        svd_tuning.CVVAEApplySVDOutputLayer.execute(model=model, layer_name="missing.safetensors")


def test_tune_node_checks_inputs_before_work(vae, clip_vision, images):
    model = svd_patcher()
    with pytest.raises(ValueError, match="1\\+4k"):
        tune(model, clip_vision, vae, images, "bad", frames=6)
    with pytest.raises(ValueError, match="multiple of 64"):
        tune(model, clip_vision, vae, images, "bad", width=96)
    with pytest.raises(ValueError, match="expected a Stable Video Diffusion"):
        tune(comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), "cpu", "cpu"), clip_vision, vae, images, "bad")
    with pytest.raises(ValueError, match="give 'data'"):
        tune(model, clip_vision, vae, None, "bad")
    assert folder_paths.get_full_path(svd_tuning.HEAD_FOLDER, "bad.safetensors") is None


def test_resume_refuses_a_file_of_another_model(vae, clip_vision, images):
    tune(svd_patcher(), clip_vision, vae, images, "resume_other", steps=1)
    with pytest.raises(ValueError, match="resume: .*tuned on another base model.*turn resume off"):
        tune(svd_patcher(seed=5), clip_vision, vae, images, "resume_other", steps=2, resume=True)
    tune(svd_patcher(seed=5), clip_vision, vae, images, "resume_other", steps=1, resume=False)
