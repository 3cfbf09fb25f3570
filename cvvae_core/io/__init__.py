"""Files: checkpoints in the official layouts, image VAE files, the built-in weights, and video files."""
