"""What every DataLoader worker of the package does when it starts."""
from __future__ import annotations

import signal


def leave_sigterm_to_main_process(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM.

    ``kill`` of the process group (a terminal, a job scheduler, a container stop) reaches the
    workers too. A worker that SIGTERM ends makes PyTorch raise its own error in the main process
    while that process is stopping cleanly (closing a shard, saving a step); ignored, the stopping
    is left to the main process, which shuts its workers down. SIGINT needs nothing: a worker
    already exits quietly on it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
