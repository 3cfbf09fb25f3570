"""The ``cvvae`` command (also ``python -m cvvae_core``): the parser, and how a command ends:
its exit status, a one-line error (2), or after Ctrl-C one line on what was kept (130)."""
from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ..errors import CVVAEError
from . import dataset, model, tools, train
from .args import SIZE_RULE, legacy_size_pairs

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def build_parser(prog: str = "cvvae") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="CV-VAE video autoencoder tools", epilog=SIZE_RULE)
    parser.add_argument("--version", action="version", version=f"cvvae_core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (model, dataset, train, tools):
        commands.register(sub)
    parser.set_defaults(interrupted=lambda args: "run the same command again")
    return parser


def main(argv=None, prog: str = "cvvae") -> int:
    """The ``cvvae`` command; ``python -m cvvae_core`` calls it with its own name for usage lines."""
    argv = legacy_size_pairs(sys.argv[1:] if argv is None else list(argv))
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the line the terminal's ^C (or a progress bar) left open
        print(f"interrupted: {args.interrupted(args)}", file=sys.stderr)
        return INTERRUPTED
    except CVVAEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The file system refused (permissions, a full disk, a file where a folder must go): the
        # message names the path, and the fix is the user's, so no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
