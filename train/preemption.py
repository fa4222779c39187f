"""Stopping on request: SIGTERM (sent before preemption, and by torchrun when it is stopped) or SIGUSR1
(slurm's `--signal`), and the death of the launcher: torchrun, or one that names itself in HARMONY_LAUNCHER
(make compare).

The handler only records the request; the trainer reads it once per step, all ranks agree on it in
the step's one host-synchronising all-reduce, finish that step together, rank 0 writes a checkpoint
at it, and every rank exits with EXIT_PREEMPTED. A signal may arrive twice (from slurm and again
from torchrun, which forwards it): that is one request.
"""

import os
import signal

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early on request, checkpoint written; run again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_ENV = "HARMONY_LAUNCHER"  # set by a launcher that starts the trainer in a session of its own


def watched_launcher():
    """The name of the process that launched this one in a session of its own (nobody signals us when it is
    killed, so we watch it), or None."""
    return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else os.environ.get(LAUNCHER_ENV) or None


class StopRequest:
    def __init__(self):
        self.signal_name = None
        self.launcher = watched_launcher()
        self.launcher_pid = os.getppid() if self.launcher else None
        self.previous = {number: signal.signal(number, self._handle) for number in STOP_SIGNALS}

    def _handle(self, number, frame):
        self.signal_name = signal.Signals(number).name

    @property
    def reason(self):
        """Why this process should stop after the current step, or None."""
        if self.signal_name:
            return f"received {self.signal_name}"
        if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            return f"{self.launcher}, which launched this process, has gone"
        return None

    def restore(self):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
