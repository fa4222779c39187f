"""`make pretrain`'s launcher: torchrun (torch.distributed.run) in this process, ending with the trainers'
own exit code and message instead of torchrun's ChildFailedError report.

    python -m train.launch --standalone --nproc_per_node=2 -m train.pretrain --config harmony/demo

Every rank prints its own error in one line before it exits (a config a resume refuses, a checkpoint that
needs run.trust_unverified_checkpoint=true); torchrun's report would repeat it inside a 20-line traceback.
The exit code is the first failed rank's (a rank that checkpointed on request exits EXIT_PREEMPTED, 75);
stopped by a signal torchrun forwards (SIGTERM, SIGUSR1, ...), it exits 128 + the signal, as a shell does.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(failure):
    """A failed rank's exit code as a shell gives it: 128 + the signal for one killed by a signal."""
    return failure.exitcode if failure.exitcode > 0 else 128 + (-failure.exitcode or signal.SIGABRT)


def main(argv=None):
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        print(f"training stopped: rank {rank} exited with code {failure.exitcode} (its message is above)",
              file=sys.stderr, flush=True)
        raise SystemExit(exit_code(failure)) from None
    except SignalException as stop:  # torchrun forwarded it to the trainers and waited for them
        print(f"training stopped by {stop.sigval.name}; the trainers' messages above say where it stands",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.sigval) from None


if __name__ == "__main__":
    main()
