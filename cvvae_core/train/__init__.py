"""Training: configuration, losses, the trainer and its run loop, inflation from an image VAE, LPIPS,
the paper's compatibility measure, and plots of a run."""
