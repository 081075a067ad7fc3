"""torchrun, ending as a shell expects: `python -m flux_sharded.launch [torchrun options] -m flux_sharded ...`.

torchrun (torch.distributed.run) passes the terminal's Ctrl-C on to its workers, each of which
stops quietly (the main one prints how to continue) and exits 130; then torchrun raises torch's
`SignalException` itself: a traceback after the workers' clean lines, and exit code 1. When a
worker refuses a setting (its one `Error:` line, exit 2), torchrun adds a `ChildFailedError`
traceback and exits 1 too. This entry point runs torchrun's own `main` with the same arguments and
ends those two cases with the exit code they mean instead: 128 + the signal (130 for Ctrl-C), or
the exit code of the worker that failed by itself (not of those torchrun then stopped). Everything
else is torchrun's.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv` (default: the command line); returns the exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as error:  # torchrun already passed it on to the workers
        return 128 + int(error.sigval)
    except ChildFailedError as error:  # each failed worker printed its own Error: line
        # The workers that exited by themselves first; torchrun then stops the rest (SIGTERM: a
        # negative exit code), which is not what went wrong.
        failures = sorted(error.failures.items(), key=lambda item: (item[1].exitcode <= 0, item[1].timestamp, item[0]))
        code = failures[0][1].exitcode
        return code if code > 0 else 128 + (-code or signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
