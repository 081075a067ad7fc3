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
            return first["exit_code"] if first is not None else _first_exit_code(error.failures)
        finally:
            del os.environ[FAILURE_FOLDER_VARIABLE]
    return 0


def _first_exit_code(failures: dict) -> int:
    """The exit code of the worker that exited by itself first, when none recorded its failure (a
    worker killed, or one that failed outside our command line); torchrun then stops the rest
    (SIGTERM: a negative exit code, or 143 from a worker that stops quietly), which is not what
    went wrong. torchrun's timestamps count whole seconds: ties go to the lower rank."""
    def stopped(code: int) -> bool:
        return code <= 0 or code - 128 in STOP_SIGNALS

    ordered = sorted(failures.items(), key=lambda item: (stopped(item[1].exitcode), item[1].timestamp, item[0]))
    code = ordered[0][1].exitcode
    return code if code > 0 else 128 + -code


if __name__ == "__main__":
    sys.exit(main())
