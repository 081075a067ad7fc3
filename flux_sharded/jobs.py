"""A prompts file whose JSON lines give their own inputs ("image", "mask", "negative_prompt";
prompts.PromptLine): one ordinary run per set of inputs.

The lines are grouped by their inputs (each key a line leaves out is the command line's
--image, --mask or --negative-prompt), and each group is one run exactly as a command of its own
would make it: its own run folder (default OUT/.flux-sharded/run-<hash of its settings>), run.json,
resume and PNG text fields, so that a group's input images are encoded once (one encode_image) and
each image equals the one-piece pipeline's for its own inputs. What ties the runs together:
- each image keeps its index over the whole file (GenerationSettings.indices, so that two runs'
  PNG names never collide) and its seed (--seed + that index, or its line's own);
- the runs go in the order of their first line, through one runner.KeptStages, so that a component
  stays loaded from one run to the next where the plan keeps it (plan.kept_between_calls), as the
  Python API's Model keeps it between calls;
- every run is built and checked (its settings, folders and, for a run that starts, its plan)
  before the first one writes anything;
- the same command again continues the job: a run whose folder holds it already (same settings:
  the folder's name is their hash) is resumed, and one that finished says so and writes nothing.

Reads the inputs (input_images), builds the requests through api.Model; runs nothing itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import api, runner
from .errors import SettingsError
from .input_images import InputImage, parse_saved, read_image
from .prompts import PromptLine, expand
from .rundir import holds_our_run, read_run
from .settings import setting


@dataclass(frozen=True)
class JobRun:
    """One run of a job: the lines it draws and the request that makes their images."""

    number: int  # 1, 2, ... in the order of the runs' first lines
    count: int  # the job's runs
    lines: tuple[PromptLine, ...]
    request: runner.RunRequest

    @property
    def title(self) -> str:
        """"run 2 of 3: lines 4-6, image cat.png": what the log says as the run starts."""
        settings = self.request.settings
        inputs = [f"image {', '.join(_name(text) for text in settings.images)}" if settings.images else "no image"]
        if settings.mask:
            inputs.append(f"mask {_name(settings.mask)}")
        if settings.negative_prompt:
            inputs.append(f"negative prompt {settings.negative_prompt!r}")
        return f"run {self.number} of {self.count}: {_line_numbers(self.lines)}, {', '.join(inputs)}"


@dataclass(frozen=True)
class Job:
    runs: tuple[JobRun, ...]
    command: str  # what continues the whole job: the same command again

    @property
    def resume_command(self) -> str:
        return self.command


def has_inputs(lines: list[PromptLine]) -> bool:
    """Whether some line gives inputs of its own: the prompts make a job, not one run."""
    return any(line.has_inputs for line in lines)


def make_job(model: api.Model, lines: list[PromptLine], seed: int, num_images_per_prompt: int, out_dir: Path,
             run_dir: Path | None, overwrite: bool, settings: dict, command: str,
             report: Path | None = None, dry_run: bool = False) -> Job:
    """The job's runs, each request built and checked, before anything is written.

    `settings`: the command line's per-run settings given (api image_options: images and mask as
    given); `command`: what continues the job (the same command). Raises SettingsError for a bad
    line (named by its file and line number, input_images' and runner.check_settings' messages
    after it), and for what one folder or one report cannot hold: --run-dir or --report with
    several runs."""
    prompts, seeds = expand(lines, seed, num_images_per_prompt)  # over the whole file: seeds and indices
    read = _Reader()
    given_images = tuple(read.image(str(each), "--image") for each in settings.get("images", ()))
    given_mask = read.image(str(settings["mask"]), "--mask", mask=True) if "mask" in settings else None
    groups: dict[tuple, list[int]] = {}  # inputs -> the lines' positions in `lines`, first-seen order
    inputs_of = []
    for line in lines:
        images = (given_images if line.images is None
                  else tuple(read.image(str(path), f'{line.where}: "image"') for path in line.images))
        mask = given_mask if line.mask is None else read.image(str(line.mask), f'{line.where}: "mask"', mask=True)
        negative = settings.get("negative_prompt") if line.negative_prompt is None else line.negative_prompt
        inputs_of.append((images, mask, negative))
        # by what the run records: a line's "" is the default negative prompt, not another run's
        key = (tuple(each.saved_text for each in images), mask.saved_text if mask else "",
               setting("negative_prompt").default if negative is None else negative)
        groups.setdefault(key, []).append(len(inputs_of) - 1)
    if run_dir is not None and len(groups) > 1:
        raise SettingsError(f"--run-dir: the prompts file's lines make {len(groups)} runs (one per set of \"image\", "
                            "\"mask\" and \"negative_prompt\"), and one folder holds one run; leave out --run-dir "
                            "(each run gets OUT/.flux-sharded/run-<hash of its settings>)")
    if report is not None and len(groups) > 1:
        raise SettingsError(f"--report: the prompts file's lines make {len(groups)} runs (one per set of \"image\", "
                            "\"mask\" and \"negative_prompt\"), and --report writes one run's report; leave it out "
                            "(each run's table is printed), or give each set of inputs its own command")
    any_image = any(images for images, _, _ in inputs_of)
    runs = []
    for number, members in enumerate(groups.values(), start=1):
        images, mask, negative = inputs_of[members[0]]
        positions = [line * num_images_per_prompt + copy for line in members for copy in range(num_images_per_prompt)]
        own = {**settings, "images": images}
        own.pop("mask", None)
        if mask is not None:
            own["mask"] = mask
        if negative is not None:
            own["negative_prompt"] = negative
        if not images and any_image:  # --strength applies to the runs with an input image (settings.py)
            own.pop("strength", None)
        # () for 0, 1, ...: a run of the file's first lines is named as that run alone would be
        indices = tuple(positions) if positions != list(range(len(positions))) else ()
        group = tuple(lines[index] for index in members)
        with _named(group):
            request = model.request_images(tuple(prompts[p] for p in positions), tuple(seeds[p] for p in positions),
                                           indices, out_dir, run_dir, overwrite, **own)
            runner.check_settings(request)
        runs.append(JobRun(number, len(groups), group, dataclasses.replace(request, continue_command=command)))
    if not dry_run:
        runs = [_continued(each) for each in runs]
        for each in runs:  # folders and images of every run, and that each new one's plan fits, before any runs
            runner.check_request(each.request)
            if not each.request.resume:
                model.check(each.request)
    return Job(tuple(runs), command)


def continue_command(args: list[str], value_options: set[str]) -> str:
    """The command that continues a job: this one again, from its folder, without --overwrite
    (which would start every run again). `value_options`: the options that take a value (so that a
    value spelt "--overwrite" is kept)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            kept.append(arg)
            skip = False
        elif arg in value_options:
            kept.append(arg)
            skip = True
        elif arg != "--overwrite":
            kept.append(arg)
    return f"cd {shlex.quote(os.getcwd())} && flux-sharded {shlex.join(kept)}"


class _Reader:
    """Each input file read once (input_images.read_image), however many lines name it."""

    def __init__(self):
        self._read: dict[tuple[str, bool], InputImage] = {}

    def image(self, path: str, option: str, mask: bool = False) -> InputImage:
        key = (str(Path(path).expanduser().absolute()), mask)
        if key not in self._read:
            self._read[key] = read_image(path, option, mask=mask)
        return self._read[key]


@contextlib.contextmanager
def _named(lines: tuple[PromptLine, ...]) -> Iterator[None]:
    """A refusal of a run (api.Model's, runner.check_settings') whose inputs a line gave names that
    line first; one of the command line's own inputs is left as it is."""
    try:
        yield
    except SettingsError as error:
        given = next((line for line in lines if line.has_inputs), None)
        if given is None:
            raise
        raise SettingsError(f"{given.where}: {error}") from error


def _continued(run: JobRun) -> JobRun:
    """The run, resumed when its folder holds it already (the same command again); else as it is."""
    request = run.request
    if request.overwrite or not holds_our_run(request.run_folder):
        return run
    if read_run(request.run_folder).settings != request.settings:  # another run (--run-dir): check_request says so
        return run
    return dataclasses.replace(run, request=dataclasses.replace(request, resume=True))


def _name(saved_text: str) -> str:
    return parse_saved(saved_text)[0].name


def _line_numbers(lines: tuple[PromptLine, ...]) -> str:
    """"lines 1-2, 5" (the prompts file's), or "line 3"; --prompt's are "--prompt"."""
    numbers = [line.number for line in lines if line.number is not None]
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    text = ", ".join(f"{first}" if first == last else f"{first}-{last}" for first, last in spans)
    parts = ["--prompt" if len(numbers) < len(lines) else "", f"line{'s' if len(numbers) > 1 else ''} {text}" if numbers else ""]
    return ", ".join(filter(None, parts))
