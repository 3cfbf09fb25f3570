"""2-D -> 3-D inflation: on one frame the inflated CV-VAE must do what the image VAE does."""
import pytest
import torch
from conftest import randomize_

from cvvae_core.io.image_vae_file import load_image_vae, save_image_vae
from cvvae_core.model.image_vae import ImageVAE, ImageVAEConfig
from cvvae_core.train.inflate import inflate, single_frame_gap
from cvvae_core.data.synthetic import SyntheticConfig, generate_batch

# Stated tolerances, on seeded random weights (randomize_: every norm/bias perturbed, so the mid
# block's tokens vary in mean and scale far more than in a trained VAE):
LATENT_TOL = 1e-4          # encoder: exact up to float32 rounding (measured ~5e-7)
RECON_PSNR_FLOOR = 22.0    # decoder: exact except the fitted temporal-attention branch (measured ~26.7 dB;
                           # on the trained built-in image VAE see test_builtin)


def tiny_image_vae(quant_conv: bool, seed: int = 0) -> ImageVAE:
    cfg = ImageVAEConfig(base_channels=8, channel_mult=(1, 2, 2, 2), blocks_per_level=1, norm_groups=4,
                         norm_eps=1e-5, quant_conv=quant_conv, latent_channels=4)
    torch.manual_seed(seed)
    return randomize_(ImageVAE(cfg), seed).eval()


def frames(n=2, size=32, seed=5):
    return generate_batch(seed, n, SyntheticConfig(frames=1, height=size, width=size)).squeeze(2)


@pytest.mark.parametrize("quant_conv", [False, True])
def test_single_frame_matches_image_vae(quant_conv):
    image_vae = tiny_image_vae(quant_conv)
    if quant_conv:
        # post_quant_conv folds exactly except at the border, where conv_in zero-pads what was its
        # bias; with a zero bias the fold is exact, which isolates the temporal-attention fit.
        with torch.no_grad():
            image_vae.post_quant_conv.bias.zero_()
    model = inflate(image_vae, image_vae.encode(frames(4, seed=9)))
    gap = single_frame_gap(model, image_vae, frames())
    assert gap["latent_max_abs"] < LATENT_TOL, gap
    assert gap["recon_psnr_vs_image_vae"] > RECON_PSNR_FLOOR, gap


def test_temporal_attention_fit_matters():
    """The least-squares init of the temporal branch is what keeps the single-frame decoder close:
    PyTorch's default init of that branch is far off."""
    image_vae = tiny_image_vae(False)
    model = inflate(image_vae)
    fitted = single_frame_gap(model, image_vae, frames())["recon_psnr_vs_image_vae"]
    attn = model.decoder.mid.attn_1
    torch.manual_seed(0)
    for m in (attn.v_t, attn.proj_out_t):
        m.reset_parameters()
    default = single_frame_gap(model, image_vae, frames())["recon_psnr_vs_image_vae"]
    assert fitted > default + 10, (fitted, default)


def test_sd_prefixed_checkpoint_with_quant_conv_loads_and_inflates(tmp_path):
    image_vae = tiny_image_vae(True)
    path = save_image_vae(image_vae, tmp_path / "plain.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:   # keep the metadata: 4 GroupNorm groups is not inferable
        sd, meta = {"first_stage_model." + k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    sd["model.diffusion_model.x.weight"] = torch.zeros(1)   # a full SD checkpoint carries a UNet too
    save_file(sd, str(tmp_path / "sd.safetensors"), metadata=meta)
    loaded = load_image_vae(tmp_path / "sd.safetensors")
    assert loaded.config.quant_conv and loaded.config.base_channels == 8
    model = inflate(loaded)
    gap = single_frame_gap(model, loaded, frames())
    # quant_conv folds exactly into the encoder.
    assert gap["latent_max_abs"] < LATENT_TOL, gap


def test_a_cvvae_file_or_folder_is_refused_with_what_to_give(tiny_model, tmp_path):
    import cvvae_core
    from cvvae_core.errors import CheckpointNotFoundError, ForeignCheckpointError

    with pytest.raises(ForeignCheckpointError, match="is a CV-VAE .*'builtin' for the built-in image VAE"):
        load_image_vae(cvvae_core.save_model(tiny_model, tmp_path / "video.safetensors"))
    with pytest.raises(ForeignCheckpointError, match="is a CV-VAE release folder, not an image VAE file"):
        load_image_vae(cvvae_core.save_model(tiny_model, tmp_path / "release"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="is a folder without diffusion_pytorch_model.safetensors"):
        load_image_vae(tmp_path / "empty")
    load_image_vae(save_image_vae(tiny_image_vae(False), tmp_path / "image.safetensors"))  # an image VAE loads
