"""Architecture, numerics that can be pinned without the official code, and frame rules."""
from pathlib import Path

import pytest
import torch

import cvvae_core
from cvvae_core.io.checkpoint import to_internal, to_official
from cvvae_core.model.layers import Upsample, causal_conv3d
from conftest import tiny_config, video

DATA = Path(__file__).parent / "data"


def manifest(variant):
    name = {"sd": "v1", "sd3": "sd3"}[variant]
    rows = [line.split("\t") for line in (DATA / f"checkpoint_keys_cvvae_{name}.tsv").read_text().splitlines()[1:]]
    return {key: shape for key, shape, _ in rows}


@pytest.mark.parametrize("preset,expected_params", [("vae3d", 182_446_475), ("vae3d_sd3", 181_892_515)])
def test_preset_state_dict_equals_release_manifest(preset, expected_params):
    cfg = cvvae_core.PRESETS[preset]
    with torch.device("meta"):
        model = cvvae_core.CVVAE(cfg)
    sd = to_official(model.state_dict(), cfg)
    assert {k: str(list(v.shape)) for k, v in sd.items()} == manifest(cfg.variant)
    assert sum(v.numel() for v in sd.values()) == expected_params


def test_sd3_key_translation_round_trips():
    cfg = cvvae_core.SD3
    with torch.device("meta"):
        sd = to_official(cvvae_core.CVVAE(cfg).state_dict(), cfg)
    back = to_official(to_internal(sd, cfg), cfg)
    assert list(back) == list(sd) and all(back[k].shape == sd[k].shape for k in sd)


@pytest.mark.parametrize("frames", [1, 5, 9, 13, 17, 21])
def test_shapes_for_every_1_plus_4k(tiny_model, frames):
    x = video(b=2, t=frames, h=24, w=40)
    z = tiny_model.encode(x)
    c = tiny_model.latent_channels
    assert z.shape == (2, c, 1 + (frames - 1) // 4, 3, 5)
    assert tiny_model.decode(z).shape == x.shape


def test_single_frame_is_the_image_path(tiny_model):
    x = video(b=2, t=1, h=16, w=24)
    mean, logvar = tiny_model.encode_distribution(x)
    assert mean.shape[2] == 1 and logvar.shape == mean.shape
    # a single frame encodes the same alone as within a batch (per-sample normalisation)
    alone = tiny_model.encode(x[1:])
    torch.testing.assert_close(alone, mean[1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["sd", "sd3"])
def test_causal_conv_pads_time_in_front_only(variant):
    torch.manual_seed(0)
    conv = causal_conv3d(2, 3, 3, tiny_config(variant))
    x = torch.randn(1, 2, 6, 5, 7)
    y = conv(x)
    assert y.shape == (1, 3, 6, 5, 7)
    x2 = x.clone()
    x2[:, :, 4:] += 1.0  # change the future
    torch.testing.assert_close(conv(x2)[:, :, :4], y[:, :, :4])
    # frame 0 sees [x0, x0, x0] in time: replicate padding, not zeros
    first = conv(x[:, :, :1].repeat(1, 1, 3, 1, 1))[:, :, 2:3]
    torch.testing.assert_close(y[:, :, :1], first)


def test_spatial_padding_mode_differs_per_variant():
    x = torch.ones(1, 1, 1, 4, 4)
    outs = {}
    for variant in ("sd", "sd3"):
        conv = causal_conv3d(1, 1, 3, tiny_config(variant))
        torch.nn.init.ones_(conv.weight), torch.nn.init.zeros_(conv.bias)
        outs[variant] = conv(x)[0, 0, 0]
    assert torch.all(outs["sd3"] == 27)  # replicate: every tap sees 1
    assert outs["sd"][0, 0] == 12 and outs["sd"][1, 1] == 27  # zeros at the corner: 3 frames x 4 taps


def test_encoder_is_not_causal_as_a_whole(tiny_model):
    # GroupNorm statistics pool over the whole clip, so frame 0 encodes differently with later
    # frames present (as in the official code), even though every convolution is causal.
    x = video(t=9, h=16, w=16)
    alone = tiny_model.encode(x[:, :, :1])
    inside = tiny_model.encode(x)[:, :, :1]
    assert (alone - inside).abs().max() > 1e-3


def test_time_upsample_orders_channel_blocks_and_drops_first_frame():
    up = Upsample(2, time=True, cfg=tiny_config())
    torch.nn.init.zeros_(up.conv.weight)
    with torch.no_grad():
        up.conv.bias.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]))  # block 0 -> 1 (earlier), block 1 -> 2
    y = up(torch.zeros(1, 2, 2, 3, 3))
    assert y.shape == (1, 2, 3, 6, 6)
    assert y[0, 0, :, 0, 0].tolist() == [2.0, 1.0, 2.0]


def test_decode_frame_rule(tiny_model):
    z = torch.randn(1, tiny_model.latent_channels, 3, 2, 2)
    assert tiny_model.decode(z).shape[2] == 9


def test_sample_uses_generator(tiny_model):
    x = video(t=5, h=16, w=16)
    a = tiny_model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = tiny_model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    mean = tiny_model.encode(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)


# Frame policy and bad input -------------------------------------------------------------
def test_wrong_frame_count_names_nearest_valid_counts(tiny_model):
    with pytest.raises(cvvae_core.FrameCountError, match="5 and 9"):
        tiny_model.encode(video(t=8, h=16, w=16))


def test_size_not_multiple_of_8_is_an_error(tiny_model):
    with pytest.raises(cvvae_core.FrameCountError, match="multiples of 8"):
        tiny_model.encode(video(t=5, h=20, w=16))


def test_pad_policy_round_trips_frame_count_and_size(tiny_model):
    x = video(t=7, h=20, w=30)
    enc = tiny_model.encode_framed(x, frame_policy="pad")
    assert isinstance(enc, cvvae_core.FramedLatent)
    assert (enc.adjustment.padded_frames, enc.adjustment.padded_height, enc.adjustment.padded_width) == (2, 4, 2)
    assert enc.latent.shape[2:] == (3, 3, 4)
    assert tiny_model.decode(enc).shape == x.shape


def test_trim_policy_reports_what_it_dropped(tiny_model):
    enc = tiny_model.encode_framed(video(t=8, h=20, w=16), frame_policy="trim")
    assert (enc.adjustment.trimmed_frames, enc.adjustment.trimmed_height) == (3, 4)
    assert tiny_model.decode(enc).shape[2:] == (5, 16, 16)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 5, 16, 16), "5-D"),
    (torch.zeros(1, 4, 5, 16, 16), "channels"),
    (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), "floating point"),
    (torch.full((1, 3, 5, 16, 16), float("nan")), "NaN"),
    (torch.full((1, 3, 5, 16, 16), 200.0), "0..255"),
])
def test_bad_video_input(tiny_model, bad, match):
    with pytest.raises(cvvae_core.InputError, match=match):
        tiny_model.encode(bad)


def test_latent_channel_mismatch_says_which_model(tiny_model):
    other = 16 if tiny_model.latent_channels == 4 else 4
    with pytest.raises(cvvae_core.ChannelMismatchError, match="vae3d"):
        tiny_model.decode(torch.zeros(1, other, 2, 2, 2))


def test_unknown_frame_policy(tiny_model):
    with pytest.raises(ValueError, match="frame_policy"):
        tiny_model.encode_framed(video(t=5, h=16, w=16), frame_policy="crop")
