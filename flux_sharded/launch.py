"""torchrun, ending as a shell expects: `python -m flux_sharded.launch [torchrun options] -m flux_sharded ...`.

torchrun (torch.distributed.run) passes the terminal's Ctrl-C on to its workers, each of which
stops quietly (the main one prints how to continue) and exits 130; then torchrun raises torch's
`SignalException` itself: a traceback after the workers' clean lines, and exit code 1. When a
worker refuses a setting (its one `Error:` line, exit 2), torchrun adds a `ChildFailedError`
traceback and exits 1 too. This entry point runs torchrun's own `main` with the same arguments and
ends those two cases with the exit code they mean instead: 128 + the signal (130 for Ctrl-C), or
the exit code of the worker that failed first (not of those torchrun then stopped), whose Error: line
is the only one printed when the others say the same (distributed.record_failure). Everything
else is torchrun's.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile

from .distributed import FAILURE_FOLDER_VARIABLE, first_failure
from .interrupt import STOP_SIGNALS


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv` (default: the command line); returns the exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # The workers inherit this: the first of them to fail records it there (distributed.record_failure).
    with tempfile.TemporaryDirectory(prefix="flux-sharded-launch-") as folder:
        os.environ[FAILURE_FOLDER_VARIABLE] = folder
        try:
            torchrun(argv)
        except SignalException as error:  # torchrun already passed it on to the workers
            return 128 + int(error.sigval)
        except ChildFailedError as error:  # the first failed worker printed its Error: line
            first = first_failure()
            if first is not None:
                return first["exit_code"]
            rank, code = _first_failed(error.failures)
            print(_failure_line(rank, code), file=sys.stderr)  # it could say nothing itself (SIGKILL)
            return code
        finally:
            del os.environ[FAILURE_FOLDER_VARIABLE]
    return 0


def _first_failed(failures: dict) -> tuple[int, int]:
    """The rank and exit code (128 + the signal, for one killed) of the worker that failed first,
    when none recorded its failure (a worker killed, SIGKILL by the kernel's out-of-memory killer
    say, or one that failed outside our command line); torchrun then stops the rest (SIGTERM: exit
    code -15, or 143 from a worker that stops quietly), which is not what went wrong, whereas a
    SIGKILL (-9) is. torchrun's timestamps count whole seconds: ties go to the lower rank."""
    def stopped(code: int) -> bool:
        return -code in STOP_SIGNALS or code - 128 in STOP_SIGNALS

    rank, failure = sorted(failures.items(), key=lambda item: (stopped(item[1].exitcode), item[1].timestamp,
                                                                item[0]))[0]
    code = failure.exitcode
    return rank, code if code > 0 else 128 + -code


def _failure_line(rank: int, code: int) -> str:
    if code > 128 and code - 128 in set(signal.Signals):
        name = signal.Signals(code - 128).name
        why = " (the kernel's out-of-memory killer sends it when the machine runs out of RAM)" \
            if name == "SIGKILL" else ""
        return (f"Error: process {rank} was killed by {name}{why}; the run folder keeps what was finished: run "
                "the same launch with --resume and the run folder to continue")
    return f"Error: process {rank} exited with code {code} without saying why; its output above may tell"


if __name__ == "__main__":
    sys.exit(main())
