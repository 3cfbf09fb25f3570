import sys

from .cli.main import main

sys.exit(main(prog="python -m cvvae_core"))
