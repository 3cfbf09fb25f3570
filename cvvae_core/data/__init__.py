"""Data: the one manifest grammar (:mod:`.manifest`), training clips (:mod:`.clips`), dataset
encoding into latent shards (:mod:`.encode`), the dataset that reads them back
(:mod:`.latent_dataset`), procedurally generated clips (:mod:`.synthetic`), and what
every DataLoader worker does when it starts (:mod:`.workers`)."""
