"""The entry of the ``cvvae`` command (also ``python -m cvvae_core``): how a command ends on
SIGINT (Ctrl-C) or SIGTERM, at any moment. Light on purpose: the signal handlers are in place
before torch and the commands (:mod:`cvvae_core.cli.app`) are imported.

While the command starts (imports, arguments, checks) a signal ends it at once with one line;
from the moment it works, the signal becomes a ``KeyboardInterrupt`` that the command turns into
what it keeps (a closed shard, a training state) and one line on how to go on. Either way the exit
status is 130 and there is no traceback."""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from contextlib import contextmanager

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it; SIGTERM too.
INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_while_starting(signum, frame):
    # Nothing has been written yet: end now, without unwinding half-done imports into a traceback.
    os.write(2, b"\ninterrupted: stopped while starting, nothing was written; run the same command again\n")
    os._exit(INTERRUPTED)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def stop_signals():
    """SIGINT and SIGTERM end the starting command (see the module docstring), and the handlers in
    place before are restored after. A signal the caller ignores (``nohup``, a background job)
    stays ignored; off the main thread nothing changes (Python handles signals there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    active = [s for s in STOP_SIGNALS if before[s] is not signal.SIG_IGN]

    def working():
        for s in active:
            signal.signal(s, _interrupt)
    try:
        for s in active:
            signal.signal(s, _stop_while_starting)
        yield working
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def build_parser(prog: str = "cvvae"):
    """The parser of every subcommand (:func:`cvvae_core.cli.app.build_parser`)."""
    return importlib.import_module(".app", __package__).build_parser(prog)


def main(argv=None, prog: str = "cvvae") -> int:
    """The ``cvvae`` command; ``python -m cvvae_core`` calls it with its own name for usage lines."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with stop_signals() as working:
        # Imported here, not above: see the module docstring.
        app = importlib.import_module(".app", __package__)
        return app.run(argv, prog, working)


if __name__ == "__main__":
    sys.exit(main())
