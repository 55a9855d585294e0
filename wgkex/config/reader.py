"""The primitives every section of the configuration file is read with.

:class:`Reader` gives typed access to one mapping of the YAML document and
knows the dotted key of each setting, so that every problem becomes one
:class:`ConfigError` line naming the file, the key and what is wrong. Values
are described in errors by type and a short repr, except settings whose name
marks them as secret (:func:`is_secret`), whose value is never printed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, TypeVar


class ConfigError(Exception):
    """The configuration is unusable. ``str()`` is one line: file, key, problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(f"{where}{problem}")


T = TypeVar("T")


class Reader:
    """Typed access to one mapping of the YAML document, with error context."""

    def __init__(self, path: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def section(self, name: str) -> Reader:
        value = self.data.get(name)
        if value is None:
            return Reader(self.path, {}, self.key(name) + ".")
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping, got {describe(value)}")
        return Reader(self.path, value, self.key(name) + ".")

    def get(self, name: str, kind: str, check: Callable[[Any], T | None], default: T) -> T:
        """The value of ``name`` converted by ``check`` (None from check: wrong type)."""
        if name not in self.data or self.data[name] is None:
            return default
        value = self.data[name]
        converted = check(value)
        if converted is None:
            raise self.fail(name, f"must be {kind}, got {describe(value, secret=is_secret(name))}")
        return converted

    def string(self, name: str, default: str) -> str:
        return self._string(name, default)

    def opt_string(self, name: str) -> str | None:
        return self._string(name, None)

    def _string(self, name: str, default: T) -> str | T:
        """A string setting; anything else YAML made of the text is refused (see :data:`QUOTE_HINT`)."""
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            if isinstance(value, (bool, int, float)):
                raise self.fail(name, f"must be a string, got {describe(value, secret=is_secret(name))}; {QUOTE_HINT}")
            raise self.fail(name, f"must be a string, got {describe(value, secret=is_secret(name))}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return self.get(name, "true or false", as_bool, default)

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.get(name, "an integer", as_int, default)
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise self.fail(name, f"must be an integer in {bound}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, positive: bool = True) -> float:
        value = self.get(name, "a number", as_float, default)
        if value < low or (positive and value <= 0):
            raise self.fail(name, f"must be a number greater than {'0' if positive else low}, got {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, f"must be a list of non-empty strings, got {describe(value)}")
        return tuple(value)


#: The fix for a string setting that YAML read as a number or boolean (PyYAML is YAML 1.1).
QUOTE_HINT = (
    "quote the value in the file, e.g. \"0123\" (unquoted, YAML reads 0123, 1_000, 12:30"
    " as numbers and yes/no/on/off as booleans)"
)

#: Words in a setting's name that mark its value as secret: errors name its type, never its value.
_SECRET_WORDS = ("password", "secret", "token")


def is_secret(name: str) -> bool:
    """True when the setting ``name`` holds a secret whose value must never be printed."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def describe(value: object, secret: bool = False) -> str:
    """``value``'s type and (unless ``secret``) a short repr of it, for error lines."""
    if secret:
        return f"a value of type {type(value).__name__} (not shown: it is secret)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def as_bool(value: object) -> bool | None:
    """``value`` as a boolean (YAML booleans and their words), or None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    return None


def as_int(value: object) -> int | None:
    """``value`` as an integer (an int, or a string of one; never a boolean), or None."""
    return _as_number(value, int, (int,))


def as_float(value: object) -> float | None:
    """``value`` as a number (int, float, or a string of one; never a boolean), or None."""
    return _as_number(value, float, (int, float))


N = TypeVar("N", int, float)


def _as_number(value: object, convert: Callable[[Any], N], kinds: tuple[type, ...]) -> N | None:
    """``convert(value)`` for a value of ``kinds`` or a string of one, None otherwise (booleans too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, kinds):
        return convert(value)
    if isinstance(value, str):
        try:
            return convert(value.strip())
        except ValueError:
            return None
    return None
