"""Several processes, on one machine or many, under `accelerate launch` or `torchrun`.

Each process runs the three stages on its share of the images (whole batches, contiguous, in
order, as accelerate's `PartialState.split_between_processes` shares them: see `share`), then every
process's report is gathered on the main process, which writes one report. Processes exchange only small Python
objects, so coordination always uses the gloo backend (`PartialState(cpu=True)`), on CPU and
GPU machines alike; the GPUs a process computes on are chosen by `--gpus-per-process`.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    index: int  # rank over every process of every machine
    count: int
    local_index: int = 0  # rank among the processes of this machine

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of its machine: it prepares what lives on this machine's disks (the
        downloaded weights, the run folder), which other machines may not share."""
        return self.local_index == 0

    @property
    def several(self) -> bool:
        return self.count > 1


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_launcher() -> None:
    """Refuse `accelerate launch --num_processes N` (N > 1) that started one process: without
    --multi_gpu (or a config saying so) accelerate uses its one-process launcher, which sets its
    ACCELERATE_* variables but no WORLD_SIZE, and drops --num_processes without a word. Only the
    launcher's own command line still says what was asked, so it is read from the parent process."""
    if launched_processes() > 1 or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    asked = _asked_processes(_parent_command_line())
    if asked > 1:
        from .errors import SettingsError

        raise SettingsError(
            f"accelerate launch was given --num_processes {asked} but started one process: on a machine without "
            "GPUs (or without --multi_gpu) it uses its one-process launcher; add --multi_gpu "
            f"(accelerate launch --multi_gpu --num_processes {asked} -m flux_sharded ...), or torchrun --nproc_per_node "
            f"{asked} -m flux_sharded ..."
        )


def _parent_command_line() -> list[str]:
    import psutil

    try:
        return psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):  # gone, or not ours to read: nothing to say
        return []


def _asked_processes(command: list[str]) -> int:
    """--num_processes N (or --num-processes, or =N) among the launcher's options, before -m or the script."""
    for position, word in enumerate(command):
        if word == "-m" or word.endswith(".py"):
            break
        name, _, value = word.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (command[position + 1] if position + 1 < len(command) else "")
            return int(value) if value.isdigit() else 1
    return 1


# Set by flux_sharded.launch for its workers: a folder of this machine's launch, where the first
# process to fail records its failure (first_failure), so that the launch prints one Error line and
# exits with that process's code, not torchrun's choice among the processes it then stopped.
FAILURE_FOLDER_VARIABLE = "FLUX_SHARDED_FAILURE_FOLDER"
_FIRST_FAILURE = "first-failure.json"


def record_failure(process_index: int, exit_code: int, message: str) -> bool:
    """Record this process's failure if it is the launch's first (under flux_sharded.launch only);
    returns whether the process should print its message: it is the first, or it says something
    else than the first (`message` without the process's prefix). Without the launcher: True."""
    folder = os.environ.get(FAILURE_FOLDER_VARIABLE)
    if not folder:
        return True
    path = Path(folder) / _FIRST_FAILURE
    record = path.with_name(f".{_FIRST_FAILURE}.{os.getpid()}")
    try:
        record.write_text(json.dumps({"process": process_index, "exit_code": exit_code, "message": message}))
        os.link(record, path)  # all or nothing, and only once: a link fails where the name exists
        return True
    except FileExistsError:
        first = first_failure()
        return first is None or first.get("message") != message
    except OSError:  # the launch's folder is gone or full: say it, as without the launcher
        return True
    finally:
        record.unlink(missing_ok=True)


def first_failure() -> dict | None:
    """The failure record_failure recorded first under flux_sharded.launch ({"process", "exit_code",
    "message"}), or None."""
    folder = os.environ.get(FAILURE_FOLDER_VARIABLE)
    try:
        return json.loads((Path(folder) / _FIRST_FAILURE).read_text()) if folder else None
    except (OSError, ValueError):
        return None


def local_processes() -> int:
    """How many processes the launcher started on this machine (torchrun's LOCAL_WORLD_SIZE, which
    `accelerate launch` sets too); 1 without a launcher. They share this machine's RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def launcher_command() -> str:
    """The launcher this process runs under, as a command prefix that starts the same processes
    again (empty without one): a printed resume command must repeat it, with the rendezvous options
    a run over several machines needs (torchrun's --nnodes, --node-rank, --master-addr,
    --master-port or --rdzv-*; accelerate launch's --num_machines, --machine_rank,
    --main_process_ip, --main_process_port). The launcher's own options are taken verbatim from
    its command line (this process's parent) when it can be read; else they are rebuilt from the
    variables the launcher set for its processes (the rendezvous as the processes met)."""
    if launched_processes() == 1:
        return ""
    accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by `accelerate launch` for its processes
    launcher = "accelerate launch" if accelerate else "torchrun"
    command = _parent_command_line()
    options = _launcher_options(command, accelerate)
    if options is None:
        options = _options_from_environment(accelerate)
    elif tuple(command[1:3]) == _OUR_LAUNCHER:  # python -m flux_sharded.launch ...
        launcher = "python -m flux_sharded.launch"
    return " ".join([launcher, *map(shlex.quote, options), "-m", "flux_sharded", ""])


# How each launcher appears on its command line: the words after which its options begin.
_OUR_LAUNCHER = ("-m", "flux_sharded.launch")  # torchrun's own main (flux_sharded/launch.py)
_LAUNCHER_STARTS = {
    False: (("torchrun",), ("-m", "torch.distributed.run"), ("-m", "torch.distributed.launch"), _OUR_LAUNCHER),
    True: (("accelerate", "launch"), ("accelerate-launch",), ("-m", "accelerate.commands.launch")),
}
# Options that name how the program is started, replaced by `-m flux_sharded` in the command.
_PROGRAM_FLAGS = ("--no-python", "--no_python", "--module", "-m")


def _launcher_options(command: list[str], accelerate: bool) -> list[str] | None:
    """The launcher's options on its command line, between the launcher and the program it runs
    (`-m flux_sharded` or the flux-sharded script); None when the command is not that launcher's."""
    words = [Path(word).name if position < 2 else word for position, word in enumerate(command)]
    begin = None
    for start in _LAUNCHER_STARTS[accelerate]:
        for position in range(min(len(words), 3)):  # "python -m ...", ".../torchrun", "python .../torchrun"
            if tuple(words[position : position + len(start)]) == start:
                begin = position + len(start)
                break
        if begin is not None:
            break
    if begin is None:
        return None
    for position in range(begin, len(command)):
        word = command[position]
        if word == "flux_sharded" and command[position - 1] in ("-m", "--module") or \
                Path(word).name in ("flux-sharded", "flux_sharded") or word.endswith("flux_sharded/__main__.py"):
            return [option for option in command[begin:position] if option not in _PROGRAM_FLAGS]
    return None


def _options_from_environment(accelerate: bool) -> list[str]:
    world, local = launched_processes(), local_processes() if "LOCAL_WORLD_SIZE" in os.environ else launched_processes()
    machines = world // local
    rendezvous = []
    if machines > 1:  # torchrun sets these for its workers: GROUP_RANK is the machine's rank
        address, port, rank = (os.environ.get(name, "") for name in ("MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"))
        if accelerate:
            rendezvous = ["--num_machines", str(machines), "--machine_rank", rank, "--main_process_ip", address,
                          "--main_process_port", port]
        else:
            rendezvous = ["--nnodes", str(machines), "--node-rank", rank, "--master-addr", address, "--master-port",
                          port]
    if accelerate:
        return ["--multi_gpu", *rendezvous, "--num_processes", str(world)]
    return [*rendezvous, "--nproc-per-node", str(local)]


def restrict_gpus(gpus_per_process: int) -> list[str]:
    """Make local process r see only GPUs rK .. rK+K-1 of those visible to the launcher, so that the
    budget's keys 0..K-1 mean those. Must run before CUDA is initialised in this process."""
    local_index = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    pool = [entry.strip() for entry in visible.split(",")] if visible else None
    first = local_index * gpus_per_process
    chosen = (pool[first : first + gpus_per_process] if pool is not None
              else [str(first + offset) for offset in range(gpus_per_process)])
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen


def current_process() -> Process:
    if launched_processes() == 1:
        return Process(index=0, count=1)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    return Process(index=state.process_index, count=state.num_processes, local_index=state.local_process_index)


def share(process: Process, count: int, batch_size: int = 1) -> list[int]:
    """The positions (0..count-1) of the images this process makes: whole batches of the whole run
    (batch_size images each, the last one shorter), contiguous, in order, the first
    `batches % processes` processes one batch more, as accelerate's `split_between_processes`
    shares the batches. Whole batches, because a batch rounds differently from its images made in
    other groups (by a level in bfloat16): an image's pixels must not depend on the number of
    processes, so that any number of them can resume a run. Computed here: some accelerate versions
    hand a process with nothing to do a copy of the last item (a duplicate image, a duplicate report
    entry); here such a process gets none."""
    batches = -(-count // batch_size)
    per_process, extra = divmod(batches, process.count)
    first = process.index * per_process + min(process.index, extra)
    last = first + per_process + (1 if process.index < extra else 0)
    return list(range(first * batch_size, min(last * batch_size, count)))


def encode_positions(settings, positions: list[int]) -> list[int]:
    """The images (positions over the whole run) whose prompts a share's encode runs on: the first
    image of each distinct prompt of the whole run, in first-seen order, grouped batch_size at a
    time over the whole run, each group that holds a prompt of the share (`positions`). The encode
    stage batches the distinct prompts it is given batch_size at a time, so given these its batches
    are the run's whatever the number of processes: a text encoder's batch can round differently
    from other groupings (on a GPU), and an image must not depend on how the run was split."""
    first: dict[str, int] = {}
    for position, prompt in enumerate(settings.prompts):
        first.setdefault(prompt, position)
    distinct = list(first)
    needed = {settings.prompts[position] for position in positions}
    chosen = []
    for start in range(0, len(distinct), settings.batch_size):
        group = distinct[start : start + settings.batch_size]
        if needed.intersection(group):
            chosen += [first[prompt] for prompt in group]
    return chosen


def gather(process: Process, item):
    """Every process's `item`, in process order, on every process."""
    if not process.several:
        return [item]
    from accelerate.utils import gather_object

    return gather_object([item])


def wait_for_everyone(process: Process) -> None:
    if process.several:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def finish(process: Process) -> None:
    """Wait for every process, then close the process group: a process that exits while its peer
    still holds the gloo connection can be aborted (SIGABRT) during interpreter shutdown."""
    if process.several:
        import torch.distributed

        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
