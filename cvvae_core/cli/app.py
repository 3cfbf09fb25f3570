"""The commands of ``cvvae`` (entered through :mod:`cvvae_core.cli.main`): the parser, and how a
command ends: its exit status, a one-line error (2), or after Ctrl-C one line on what was kept (130)."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from .._version import __version__
from ..errors import CVVAEError
from . import dataset, model, tools, train
from .args import SIZE_RULE, OneLineParser, legacy_size_pairs
from .main import INTERRUPTED, STOP_SIGNALS


def build_parser(prog: str = "cvvae") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description="CV-VAE video autoencoder tools", epilog=SIZE_RULE)
    parser.add_argument("--version", action="version", version=f"cvvae_core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (model, dataset, train, tools):
        commands.register(sub)
    parser.set_defaults(interrupted=lambda args: "run the same command again")
    return parser


def run(argv: list[str], prog: str = "cvvae", working=lambda: None) -> int:
    """Parse ``argv`` and run the command; ``working()`` is called when the work starts (from then
    on SIGINT/SIGTERM raise KeyboardInterrupt, see :mod:`cvvae_core.cli.main`)."""
    parser = build_parser(prog)
    argv = legacy_size_pairs(argv)
    OneLineParser.command_line = argv
    args = parser.parse_args(argv)
    working()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:  # the command has kept what it could: the report is not cut short
                signal.signal(s, signal.SIG_IGN)
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
