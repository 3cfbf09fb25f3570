"""Data: the one manifest grammar (:mod:`.manifest`), training clips (:mod:`.clips`), dataset
encoding into latent shards (:mod:`.encode`), the dataset that reads them back
(:mod:`.latent_dataset`), and procedurally generated clips (:mod:`.synthetic`)."""
