"""`python -m flux_sharded` and the flux-sharded command: a stop signal that arrives while the
command line is still being imported ends the process at once with one line (interrupt.py)."""

from . import interrupt


def run() -> None:
    interrupt.exit_while_starting()
    from .cli import main  # click, and through the library modules numpy: a second or more

    main(prog_name="flux-sharded")


if __name__ == "__main__":
    run()
