"""`python -m flux_sharded` and the flux-sharded command: a stop signal that arrives while the
command line is still being imported ends the process at once with one line (interrupt.py)."""

import sys

from . import interrupt


def run() -> None:
    interrupt.exit_while_starting()
    if sys.argv[1:2] == ["serve"]:  # its own command: the one-shot command's options stay as they are
        serve()
        return
    from .cli import main  # click, and through the library modules numpy: a second or more

    main(prog_name="flux-sharded")


def serve() -> None:
    """`flux-sharded serve ...`, with the serve extra (FastAPI, uvicorn) installed."""
    try:
        from .serve import main
    except ModuleNotFoundError as error:
        if error.name not in SERVE_PACKAGES:
            raise
        sys.stderr.write(f"Error: flux-sharded serve needs {error.name}, which is not installed; install the serve "
                         "extra: pip install 'flux-sharded[serve]'\n")
        sys.exit(2)
    main(args=sys.argv[2:], prog_name="flux-sharded serve")


SERVE_PACKAGES = ("fastapi", "uvicorn", "starlette", "python_multipart")


if __name__ == "__main__":
    run()
