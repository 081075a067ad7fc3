"""Prompts files and the seed of every image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from flux_sharded.cli import main
from flux_sharded.errors import SettingsError
from flux_sharded.prompts import MAX_PROMPTS_FILE_BYTES, PromptLine, expand, read_prompts_file
from flux_sharded.safe_read import MAX_JSON_DEPTH, json_depth


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a dog\na cat\n", [PromptLine("a dog"), PromptLine("a cat")]),
        ("# header\n\n  a dog  \n\n# a comment\na cat", [PromptLine("a dog"), PromptLine("a cat")]),
        ('{"prompt": "a dog"}\n{"prompt": "a cat", "seed": 42}\n', [PromptLine("a dog"), PromptLine("a cat", 42)]),
        ('# jsonl too\n\n{"prompt": "a {curly} dog", "seed": 0}', [PromptLine("a {curly} dog", 0)]),
        # a first line starting with "{" makes the file JSON Lines, so this one is refused
        ("{not json}", None),
        ("ünïcode prompt ✓\n", [PromptLine("ünïcode prompt ✓")]),
    ],
)
def test_good_files(tmp_path, text, expected):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    if expected is None:
        with pytest.raises(SettingsError, match="line 1: not valid JSON"):
            read_prompts_file(path)
    else:
        assert read_prompts_file(path) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "holds no prompt"),
        ("\n# only comments\n\n", "holds no prompt"),
        ('{"prompt": "a dog"}\nplain text\n', "line 2: not valid JSON"),
        ('{"prompt": "a dog"}\n{"seed": 3}\n', 'line 2: needs a non-empty "prompt" string'),
        ('{"prompt": "  "}\n', 'line 1: needs a non-empty "prompt" string'),
        ('{"prompt": 7}\n', 'line 1: needs a non-empty "prompt" string'),
        ('{"prompt": "a dog", "seed": -1}\n', '"seed" must be a whole number >= 0, not -1'),
        ('{"prompt": "a dog", "seed": 1.5}\n', '"seed" must be a whole number >= 0, not 1.5'),
        ('{"prompt": "a dog", "seed": true}\n', '"seed" must be a whole number >= 0, not True'),
        ('{"prompt": "a dog", "steps": 4}\n', "unknown key(s) steps"),
        ('["a dog"]\n', None),  # a JSON array is not an object: treated as plain text
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    if message is None:
        assert read_prompts_file(path) == [PromptLine('["a dog"]')]
        return
    with pytest.raises(SettingsError) as raised:
        read_prompts_file(path)
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_a_lines_inputs_are_its_own_and_its_relative_paths_the_files_folders(tmp_path):
    """A relative path is taken from the prompts file's folder, not the current one; null is as if left out."""
    path = tmp_path / "jobs" / "prompts.jsonl"
    path.parent.mkdir()
    path.write_text('{"prompt": "a", "image": "in/a.png", "mask": "/abs/m.png"}\n'
                    '{"prompt": "b", "image": ["x.png", "~/y.png"], "negative_prompt": ""}\n'
                    '{"prompt": "c", "image": null, "mask": null, "negative_prompt": null}\n')
    first, second, third = read_prompts_file(path)
    assert first == PromptLine("a", images=(tmp_path / "jobs" / "in" / "a.png",), mask=Path("/abs/m.png"))
    assert second == PromptLine("b", images=(tmp_path / "jobs" / "x.png", Path("~/y.png").expanduser()),
                                negative_prompt="")
    assert second.has_inputs and third == PromptLine("c") and not third.has_inputs
    assert first.where == f"--prompts-file '{path}', line 1" and first.number == 1


def test_missing_and_folder_and_binary(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        read_prompts_file(tmp_path / "nope.txt")
    with pytest.raises(SettingsError, match="is a folder"):
        read_prompts_file(tmp_path)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SettingsError, match="cannot be read"):
        read_prompts_file(tmp_path / "binary")


def test_seeds_follow_the_image_index_unless_the_line_gives_one():
    lines = [PromptLine("a"), PromptLine("b", 100), PromptLine("c")]
    assert expand(lines, seed=10, images_per_prompt=1) == (("a", "b", "c"), (10, 100, 12))
    assert expand(lines, seed=10, images_per_prompt=2) == (
        ("a", "a", "b", "b", "c", "c"),
        (10, 11, 100, 101, 14, 15),
    )


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """Windows editors may start a UTF-8 file with one: the first JSON line was read as plain text,
    so the JSON became the prompt and the seeds were ignored."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a dog", "seed": 7}\n{"prompt": "a cat"}\n')
    assert read_prompts_file(path) == [PromptLine("a dog", 7), PromptLine("a cat")]


def _fifo(folder):
    os.mkfifo(folder / "fifo")  # no writer: opening it would block forever
    return folder / "fifo"


def _loop(folder):
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    return folder / "a"


def _dangling(folder):
    (folder / "link").symlink_to(folder / "gone.txt")
    return folder / "link"


def _huge(folder):
    path = folder / "huge.txt"
    with open(path, "wb") as file:  # sparse: nothing is written to the disk
        file.truncate(MAX_PROMPTS_FILE_BYTES + 1)
    return path


def _write(text):
    def make(folder):
        (folder / "prompts.jsonl").write_text(text)
        return folder / "prompts.jsonl"
    return make


@pytest.mark.parametrize("make, message", [
    (_fifo, "is not a regular file (a pipe, a device or a socket)"),
    (lambda folder: Path("/dev/zero"), "is not a regular file"),
    (_loop, "cannot be read (Too many levels of symbolic links)"),
    (_dangling, "does not exist (or is a link to nothing)"),
    (_huge, f"is larger than {MAX_PROMPTS_FILE_BYTES // 2**20} MiB; split it into several runs"),
    (_write('{"prompt": "a dog", "prompt": "a cat"}\n'), 'line 1: "prompt" is given twice; give each key once'),
    (_write('{"prompt": "a dog", "seed": ' + "[" * 200_000 + "]" * 200_000 + "}\n"),
     f"line 1: nested more than {MAX_JSON_DEPTH} levels deep"),
])
def test_a_prompts_file_that_is_not_one_is_refused_in_one_line(tmp_path, make, message):
    """Each through the command line: one Error line, exit 2, nothing written, no hang, no traceback."""
    path = make(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--prompts-file", str(path), "--max-memory", "cpu=1GB", "--dry-run",
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert message in line and "Traceback" not in result.output, line
    assert not out.exists()


def test_json_nesting_is_counted_outside_strings_only():
    assert json_depth('{"prompt": "[[[{{{ brackets in a prompt"}') == 1
    assert json_depth('{"prompt": "a \\" [[["}') == 1  # an escaped quote does not end the string
    assert json_depth('{"prompt": "a \\\\", "seed": [[1]]}') == 3  # an escaped backslash does not escape the quote
    assert json_depth('{"seed": [[1]]}') == 3
