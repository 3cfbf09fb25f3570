"""Data: video manifests and clips for training, dataset encoding into latent shards, the latent
dataset that reads them back, and procedurally generated clips."""
