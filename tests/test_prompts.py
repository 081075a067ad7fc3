"""Prompts files and the seed of every image."""

from __future__ import annotations

import pytest

from flux_sharded.errors import SettingsError
from flux_sharded.prompts import PromptLine, expand, read_prompts_file


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
