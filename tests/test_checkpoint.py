"""Loading and saving in the official layouts, and every bad checkpoint the loader must explain."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import cvvae_core
from cvvae_core.io.checkpoint import to_official
from conftest import video


def official_sd(model):
    return to_official(model.state_dict(), model.config)


# Two models built or loaded differently hold the same weights, but CPU kernels may take other
# code paths on them (memory alignment, layout) and round the last bit differently: 2.4e-7 (sd) and
# 4.6e-7 (sd3) were seen on one CPU on these latents (magnitude ~1). 1e-5 is 20-40x that, and far
# below what any real loading bug gives (one swapped, transposed or missing tensor moves the latent
# by 1e-2 or more). The weights themselves must be equal bit for bit.
OUTPUT_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def assert_same_model(a, b):
    assert a.config == b.config
    wa, wb = a.state_dict(), b.state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k
    x = video(t=5, h=16, w=24)
    torch.testing.assert_close(a.encode(x), b.encode(x), **OUTPUT_TOLERANCE)


def test_release_folder_round_trip(tiny_model, tmp_path):
    folder = cvvae_core.save_model(tiny_model, tmp_path / "vae3d")
    assert (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["_class_name"] == {"sd": "CVVAEModel", "sd3": "CVVAESD3Model"}[tiny_model.variant]
    assert_same_model(tiny_model, cvvae_core.load_model(folder))


def test_file_keys_are_the_official_ones(tiny_model, tmp_path):
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    assert set(load_file(str(path))) == set(official_sd(tiny_model))


def test_parent_folder_of_a_release(tiny_model, tmp_path):
    cvvae_core.save_model(tiny_model, tmp_path / "release" / "vae3d_sd3")
    assert_same_model(tiny_model, cvvae_core.load_model(tmp_path / "release"))


def test_parent_folder_with_several_releases_asks_which(tiny_model, tmp_path):
    cvvae_core.save_model(tiny_model, tmp_path / "release" / "vae3d")
    cvvae_core.save_model(tiny_model, tmp_path / "release" / "vae3d_v1-1")
    with pytest.raises(cvvae_core.CheckpointNotFoundError, match="vae3d, vae3d_v1-1"):
        cvvae_core.load_model(tmp_path / "release")
    assert_same_model(tiny_model, cvvae_core.load_model(tmp_path / "release", subfolder="vae3d_v1-1"))


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae.", "model.vae."])
def test_prefixed_single_file(tiny_model, tmp_path, prefix):
    sd = {prefix + k: v.contiguous() for k, v in official_sd(tiny_model).items()}
    sd["model.diffusion_model.out.0.weight"] = torch.zeros(2)  # other parts of a bundle are ignored
    # the tiny test config uses 8 norm groups, which shapes cannot tell: keep the pack's metadata
    save_file(sd, str(tmp_path / "bundle.safetensors"), metadata=saved_metadata(tiny_model, tmp_path))
    assert_same_model(tiny_model, cvvae_core.load_model(tmp_path / "bundle.safetensors"))


def saved_metadata(model, tmp_path):
    from safetensors import safe_open

    with safe_open(str(cvvae_core.save_model(model, tmp_path / "meta.safetensors")), "pt") as f:
        return f.metadata()


def test_fp16_file_loads_into_requested_dtype(tiny_model, tmp_path):
    path = cvvae_core.save_model(tiny_model, tmp_path / "half.safetensors", dtype=torch.float16)
    model = cvvae_core.load_model(path)
    assert model.dtype == torch.float32
    assert cvvae_core.load_model(path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_variant_comes_from_keys_not_file_name(tiny_model, tmp_path):
    wrong = "vae3d_sd3.safetensors" if tiny_model.variant == "sd" else "vae3d.safetensors"
    path = cvvae_core.save_model(tiny_model, tmp_path / wrong)
    assert cvvae_core.load_model(path).variant == tiny_model.variant


# Bad checkpoints ---------------------------------------------------------------------------
def _save(sd, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_model, tmp_path):
    sd = official_sd(tiny_model)
    first = sorted(sd)[0]
    sd.pop(first)
    sd["decoder.extra.weight"] = torch.zeros(3)
    shaped = "encoder.conv_out.bias"
    sd[shaped] = torch.zeros(5)
    with pytest.raises(cvvae_core.CheckpointKeyError) as err:
        cvvae_core.load_model(_save(sd, tmp_path / "bad.safetensors", saved_metadata(tiny_model, tmp_path)))
    msg = str(err.value)
    assert "1 missing" in msg and first in msg
    assert "1 unexpected" in msg and "decoder.extra.weight" in msg
    assert "wrong shape" in msg and shaped in msg


def image_vae_sd(latent=4):
    """Key/shape skeleton of a 2-D SD image VAE in the LDM layout."""
    return {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
            "decoder.conv_in.weight": torch.zeros(8, latent, 3, 3), "quant_conv.weight": torch.zeros(8, 8, 1, 1),
            "post_quant_conv.weight": torch.zeros(latent, latent, 1, 1)}


@pytest.mark.parametrize("latent,family", [(4, "SD1.x"), (16, "SD3")])
def test_image_vae_is_recognised(tmp_path, latent, family):
    sd = {"first_stage_model." + k: v for k, v in image_vae_sd(latent).items()}
    with pytest.raises(cvvae_core.ForeignCheckpointError, match=f"{family}.*image VAE.*not CV-VAE"):
        cvvae_core.load_model(_save(sd, tmp_path / "sd_vae.safetensors"))


def test_unet_checkpoint_is_recognised(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    with pytest.raises(cvvae_core.ForeignCheckpointError, match="diffusion model"):
        cvvae_core.load_model(_save(sd, tmp_path / "unet.safetensors"))


def test_quant_conv_hint(tiny_model, tmp_path):
    sd = official_sd(tiny_model)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 1, 1, 1)
    with pytest.raises(cvvae_core.CheckpointKeyError, match="quant_conv"):
        cvvae_core.load_model(_save(sd, tmp_path / "q.safetensors", saved_metadata(tiny_model, tmp_path)))


def test_truncated_file(tiny_model, tmp_path):
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(cvvae_core.CheckpointCorruptError, match="truncated or corrupt"):
        cvvae_core.load_model(path)


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"<!DOCTYPE html><html>Sign in</html>", "HTML"),
                                           (b"\x07garbage-bytes-not-a-model", "truncated or corrupt")])
def test_not_a_weights_file(tmp_path, content, match):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(cvvae_core.CheckpointCorruptError, match=match):
        cvvae_core.load_model(path)


def test_pickle_refused_unless_opted_in(tiny_model, tmp_path):
    # a release folder with the .bin weights of older diffusers versions; config.json holds the norm groups
    folder = cvvae_core.save_model(tiny_model, tmp_path / "vae3d")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    path = folder / "diffusion_pytorch_model.bin"
    torch.save({"state_dict": {k: v.clone() for k, v in official_sd(tiny_model).items()}}, str(path))
    with pytest.raises(cvvae_core.PickleRefusedError, match="allow_pickle=True"):
        cvvae_core.load_model(folder)
    assert_same_model(tiny_model, cvvae_core.load_model(folder, allow_pickle=True))


def test_pickle_with_code_is_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, str(path))
    with pytest.raises(cvvae_core.CheckpointCorruptError, match="weights-only"):
        cvvae_core.load_model(path, allow_pickle=True)


def test_missing_path(tmp_path):
    with pytest.raises(cvvae_core.CheckpointNotFoundError):
        cvvae_core.load_model(tmp_path / "nope.safetensors")
    with pytest.raises(cvvae_core.CheckpointNotFoundError, match="holds no"):
        cvvae_core.load_model(tmp_path)


def test_loaded_weights_live_in_fresh_aligned_memory(tiny_model, tmp_path):
    """Parameters must not stay views of the file: those are unaligned, and a rewrite of the file
    in place (a training run saving over it) would change the model under the user's hands."""
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    model = cvvae_core.load_model(path)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(4096)  # zero the last tensors' bytes in place
    with open(path, "r+b") as f:
        f.write(data)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loads_into_the_requested_dtype_with_one_cast(tiny_model, tmp_path):
    path = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
    model = cvvae_core.load_model(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, tiny_model.state_dict()[k].half()), k


def test_saved_files_get_the_usual_permissions(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        single = cvvae_core.save_model(tiny_model, tmp_path / "m.safetensors")
        folder = cvvae_core.save_model(tiny_model, tmp_path / "vae3d")
    finally:
        os.umask(old)
    for path in (single, folder / "config.json", folder / "diffusion_pytorch_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_builtin_name_loads_the_shipped_model_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = cvvae_core.load_model("builtin")
    assert model.variant == "sd" and model.dtype == torch.float32
    (tmp_path / "builtin").mkdir()  # a local folder of that name is reached as ./builtin
    with pytest.raises(cvvae_core.CheckpointNotFoundError, match="holds no"):
        cvvae_core.load_model("./builtin")


def test_builtin_weights_resaved_as_pt_load_with_their_config(tmp_path):
    """torch.save of the built-in weights loses the metadata; its shapes name the shipped model, whose
    GroupNorm group count (8, which 32 cannot stand in for) comes back from there."""
    builtin = cvvae_core.load_model("builtin", dtype=torch.float32)
    torch.save(official_sd(builtin), tmp_path / "resaved.pt")
    model = cvvae_core.load_model(tmp_path / "resaved.pt", allow_pickle=True)
    assert model.config.norm_groups == 8
    assert_same_model(model, builtin)


def test_resaved_pt_of_an_unknown_size_says_what_it_is(tiny_model, tmp_path):
    torch.save(official_sd(tiny_model), tmp_path / "resaved.pt")  # 16 channels at level 0: 32 groups cannot be
    with pytest.raises(cvvae_core.CheckpointKeyError, match="CV-VAE .* saved without its configuration"):
        cvvae_core.load_model(tmp_path / "resaved.pt", allow_pickle=True)


def test_official_sd3_names_map_to_internal_and_back_by_one_table():
    from conftest import tiny_config
    from cvvae_core.io import keymap

    model = cvvae_core.CVVAE(tiny_config("sd3"))
    internal, official = model.state_dict(), official_sd(model)
    levels = model.config.num_levels
    assert {keymap.ldm_name(k, levels) for k in official} == set(internal)
    assert {keymap.diffusers_name(k, levels) for k in internal} == set(official)
    # diffusers counts decoder levels from the top
    assert keymap.ldm_name("decoder.up_blocks.0.resnets.0.conv1.weight", levels) == \
        f"decoder.up.{levels - 1}.block.0.conv1.weight"
