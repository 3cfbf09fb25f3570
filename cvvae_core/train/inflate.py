"""2-D -> 3-D inflation: a CV-VAE initialised from an image VAE, as in the paper (§3.3).

Every 2-D kernel becomes a 3-D kernel that, on a single frame, computes exactly what the 2-D
kernel computed:

* encoder convolutions are causal and pad time by repeating the first frame in front, so for
  T = 1 every time tap sees the same frame; the 2-D kernel goes to the *last* tap (zeros
  elsewhere), which for longer clips means "look at the current frame", the natural causal start;
  the stride-2 time downsample is treated the same way, so latent frame i starts as the image
  latent of frame 4i;
* decoder convolutions pad time symmetrically with zeros, so only the *centre* tap sees data at
  T = 1: the 2-D kernel goes there;
* a time-doubling upsample has two output blocks (earlier, later frame); the 2-D kernel goes into
  both, at the centre tap, so each latent frame starts out decoded into identical frames;
* 1x1 shortcuts are unsqueezed; norms, attention projections and the per-frame 2-D ``conv2`` are
  copied as they are;
* an image VAE's ``quant_conv`` (1x1 after the encoder) folds exactly into the encoder's
  ``conv_out``; ``post_quant_conv`` folds into the decoder's ``conv_in`` exactly in the interior
  and approximately at the border, where ``conv_in`` zero-pads a tensor that was ``post_quant``'s
  bias, not zero.

The decoder mid-block's temporal attention (SD variant) has no 2-D counterpart and cannot be the
identity: the block computes ``x + T(y)`` with ``y = proj_out(S(x))`` and, for one frame,
``T(y) = proj_out_t(v_t(LayerNorm(y)))``. LayerNorm removes each token's mean and scale, which no
linear map restores, so ``proj_out_t`` is fitted by least squares to give back ``y`` on calibration
frames (``v_t`` = identity, LayerNorm affine = identity; ``q_t``/``k_t`` keep PyTorch's default init).
That is the one place where the inflated model differs from the image VAE on a single frame;
:func:`single_frame_gap` measures it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.synthetic import SyntheticConfig, generate_batch
from ..metrics import psnr
from ..model.cvvae import CVVAE
from ..model.image_vae import ImageVAE
from ..spec import CVVAEConfig

TEMPORAL_ATTN = "decoder.mid.attn_1."
TEMPORAL_NAMES = ("norm_t", "q_t", "k_t", "v_t", "proj_out_t")


def video_config(image_cfg, **overrides) -> CVVAEConfig:
    """The CV-VAE (SD variant) configuration mirroring an image VAE's architecture."""
    d = dict(variant="sd", latent_channels=image_cfg.latent_channels, in_channels=image_cfg.in_channels,
             base_channels=image_cfg.base_channels, channel_mult=image_cfg.channel_mult,
             blocks_per_level=image_cfg.blocks_per_level, norm_groups=image_cfg.norm_groups,
             scaling_factor=image_cfg.scaling_factor, shift_factor=image_cfg.shift_factor)
    d.update(overrides)
    return CVVAEConfig(**d)


def _folded_image_state(image_vae: ImageVAE) -> dict:
    """The image VAE's state dict with quant_conv/post_quant_conv folded into the neighbouring convs."""
    sd = {k: v.detach().float().clone() for k, v in image_vae.state_dict().items()}
    if not image_vae.config.quant_conv:
        return sd
    q, bq = sd.pop("quant_conv.weight")[:, :, 0, 0], sd.pop("quant_conv.bias")
    w, b = sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"]
    sd["encoder.conv_out.weight"] = torch.einsum("oi,ichw->ochw", q, w)
    sd["encoder.conv_out.bias"] = q @ b + bq
    p, bp = sd.pop("post_quant_conv.weight")[:, :, 0, 0], sd.pop("post_quant_conv.bias")
    w, b = sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"]
    sd["decoder.conv_in.weight"] = torch.einsum("oihw,ij->ojhw", w, p)
    sd["decoder.conv_in.bias"] = b + torch.einsum("oihw,i->o", w, bp)
    return sd


def _inflate_tensor(name: str, target: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    if target.shape == src.shape:
        return src
    if target.dim() == 5 and src.dim() == 4:
        kt = target.shape[2]
        if kt == 1:
            return src.unsqueeze(2)
        out = torch.zeros(target.shape, dtype=src.dtype)
        tap = kt - 1 if name.startswith("encoder.") else kt // 2
        blocks = target.shape[0] // src.shape[0]  # 2 for a time-doubling upsample
        out[:, :, tap] = src.repeat(blocks, 1, 1, 1)
        return out
    if target.dim() == 1 and target.shape[0] % src.shape[0] == 0:  # upsample bias, one per block
        return src.repeat(target.shape[0] // src.shape[0])
    raise ValueError(f"cannot inflate {name}: image VAE shape {list(src.shape)} -> video shape {list(target.shape)}")


@torch.no_grad()
def _fit_temporal_projection(model: CVVAE, image_vae: ImageVAE, calibration_latents: torch.Tensor):
    attn = model.decoder.mid.attn_1
    captured = []
    hook = image_vae.decoder.mid.attn_1.proj_out.register_forward_hook(lambda m, i, o: captured.append(o))
    image_vae.decode(calibration_latents.float())
    hook.remove()
    y = captured[0].flatten(2).transpose(1, 2).flatten(0, 1).double()  # [tokens, C]
    c = y.shape[1]
    ln = F.layer_norm(y, (c,), eps=attn.norm_t.eps)
    # Layer-normed tokens sum to zero over channels, so with the bias column all C channels would
    # be linearly dependent: the fit uses C - 1 of them and gives the last weight 0 (the same
    # outputs on any layer-normed input, and a full-rank problem whose solution is unique).
    design = torch.cat([ln[:, :-1], torch.ones(len(ln), 1, dtype=y.dtype)], dim=1)
    fitted = torch.linalg.lstsq(design, y).solution                    # [C, C]
    solution = torch.cat([fitted[:-1], torch.zeros(1, c, dtype=y.dtype), fitted[-1:]])  # [C+1, C]
    attn.norm_t.weight.fill_(1.0)
    attn.norm_t.bias.zero_()
    attn.v_t.weight.copy_(torch.eye(c))
    attn.v_t.bias.zero_()
    attn.proj_out_t.weight.copy_(solution[:c].T.float())
    attn.proj_out_t.bias.copy_(solution[c].float())


def default_calibration_latents(image_vae: ImageVAE, frames: int = 16, size: int = 64) -> torch.Tensor:
    """Image latents of procedurally generated frames (no data needed)."""
    clips = generate_batch(0, 4, SyntheticConfig(frames=frames // 4, height=size, width=size))
    images = clips.transpose(1, 2).flatten(0, 1)
    with torch.no_grad():
        return image_vae.encode(images.to(next(image_vae.parameters()).dtype))


@torch.no_grad()
def inflate(image_vae: ImageVAE, calibration_latents: torch.Tensor | None = None) -> CVVAE:
    """A CV-VAE (SD variant, fp32, CPU) whose single-frame behaviour reproduces ``image_vae``."""
    image_vae = image_vae.float().cpu()
    cfg = video_config(image_vae.config)
    model = CVVAE(cfg)
    src = _folded_image_state(image_vae)
    state = model.state_dict()
    for name, target in state.items():
        if name.startswith(TEMPORAL_ATTN) and name[len(TEMPORAL_ATTN):].split(".")[0] in TEMPORAL_NAMES:
            continue
        if name not in src:
            raise ValueError(f"the image VAE has no tensor for {name}; is it the same architecture family?")
        state[name] = _inflate_tensor(name, target, src[name])
    model.load_state_dict(state)
    if cfg.temporal_attention:
        if calibration_latents is None:
            calibration_latents = default_calibration_latents(image_vae)
        _fit_temporal_projection(model, image_vae, calibration_latents)
    return model.eval()


@torch.no_grad()
def single_frame_gap(model: CVVAE, image_vae: ImageVAE, images: torch.Tensor) -> dict:
    """How far the video model is from the image model on single frames ``[N, 3, H, W]``:
    max |latent difference| and PSNR between the two reconstructions (video model run with T=1)."""
    model, image_vae = model.float().cpu(), image_vae.float().cpu()
    z_img = image_vae.encode(images)
    z_vid = model.encode_distribution(images.unsqueeze(2))[0][:, :, 0]
    x_img = image_vae.decode(z_img)
    x_vid = model.decoder_output(z_img.unsqueeze(2))[:, :, 0]
    return {"latent_max_abs": float((z_img - z_vid).abs().max()),
            "latent_scale": float(z_img.abs().max()),
            "recon_max_abs": float((x_img - x_vid).abs().max()),
            "recon_psnr_vs_image_vae": psnr(x_vid, x_img)}
