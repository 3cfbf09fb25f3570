"""The networks: CV-VAE layers and model, the SD-family image VAE, and the frame/size policy.

Nothing here reads files or tiles: files are :mod:`cvvae_core.io`, tiling is :mod:`cvvae_core.tiling`."""
from .cvvae import CVVAE, sample_posterior
from .frames import FrameAdjustment, FramedLatent
from .image_vae import ImageVAE, ImageVAEConfig

__all__ = ["CVVAE", "sample_posterior", "FrameAdjustment", "FramedLatent", "ImageVAE", "ImageVAEConfig"]
