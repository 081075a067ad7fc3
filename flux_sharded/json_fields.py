"""Checks of one JSON object's fields (a config.json, run.json, a handoff's JSON): each failure
raises one error naming the file, the field, the problem and the fix."""

from __future__ import annotations

import json
import math

from .errors import SettingsError


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _shown(value) -> str:
    """The value as JSON writes it; one given from Python (api.py's keyword arguments) may be of no
    JSON type, and is shown as repr() shows it."""
    return json.dumps(value, default=repr)


class JsonFields:
    """Checks fields of one JSON object; every failure names the file, the field and the fix."""

    def __init__(self, data, where: str, fix: str, error=SettingsError, prefix: str = ""):
        self.where, self.fix, self.error, self.prefix = where, fix, error, prefix
        if not isinstance(data, dict):
            self.fail(f"holds a {type(data).__name__}, not a JSON object")
        self.data = data

    def fail(self, problem: str, field: str | None = None):
        named = f" field '{self.prefix}{field}'" if field is not None else ""
        raise self.error(f"{self.where}{named} {problem}; {self.fix}")

    def _value(self, field: str, optional: bool):
        if field not in self.data:
            if optional:
                return None
            self.fail("is missing", field)
        return self.data[field]

    def integer(self, field: str, low: int | None = None, high: int | None = None, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not is_int(value):
            self.fail(f"is {_shown(value)}, not a whole number", field)
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(f"is {value}, outside {low if low is not None else '...'}..{high if high is not None else '...'}",
                      field)
        return value

    def number(self, field: str, low: float | None = None, optional=False, high: float | None = None):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not is_number(value) or (low is not None and value < low) or (high is not None and value > high):
            self.fail(f"is {_shown(value)}, not a finite number" + (f" >= {low}" if low is not None else "")
                      + (f" <= {high}" if high is not None else ""), field)
        return value

    def string(self, field: str, optional=False, choices=None):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(f"is {_shown(value)}, not a text" + (f" (one of {', '.join(choices)})" if choices else ""), field)
        if choices is not None and value not in choices:
            self.fail(f"is {_shown(value)}, not one of {', '.join(choices)}", field)
        return value

    def boolean(self, field: str, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self.fail(f"is {_shown(value)}, not true or false", field)
        return value

    def list_of(self, field: str, check, what: str, low_length: int = 0, high_length: int | None = None,
                optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list) or not all(check(item) for item in value):
            self.fail(f"is {_shown(value)[:80]}, not a list of {what}", field)
        if len(value) < low_length or (high_length is not None and len(value) > high_length):
            wanted = (f"{low_length}" if low_length == high_length else f"at least {low_length}" if high_length is None
                      else f"{low_length} to {high_length}")
            self.fail(f"has {entries(len(value))}, not {wanted}", field)
        return value

    def object(self, field: str, optional=False):
        value = self._value(field, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(f"is {_shown(value)[:80]}, not a JSON object", field)
        return value


def entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"
