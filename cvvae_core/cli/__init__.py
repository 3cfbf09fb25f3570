"""The command line ``cvvae`` / ``python -m cvvae_core``: one module per group of subcommands."""
