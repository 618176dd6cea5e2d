"""TOML writing (tomllib only reads): ``dumps_toml`` writes job.toml, participants.toml and startup kits.

A module of its own so that what writes TOML (key handling, provisioning) does not import job parsing, which
resolves strategies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fedbus.errors import ConfigError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x, where)}" for k, x in v.items()) + "}"
    raise ConfigError(f"{where}: cannot write {type(v).__name__} value {v!r} as TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a dict of str/int/float/bool/list/dict values; tables nest as [a.b] sections."""
    lines: list[str] = []

    def table(d: Mapping[str, Any], path: tuple[str, ...]) -> None:
        subtables = []
        for k, v in d.items():
            if not isinstance(k, str):
                raise ConfigError(f"TOML keys must be strings, got {k!r}")
            if isinstance(v, Mapping):
                subtables.append((k, v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v, '.'.join((*path, k)))}")
        for k, v in subtables:
            sub = (*path, k)
            if lines:
                lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in sub) + "]")
            table(v, sub)

    table(data, ())
    return "\n".join(lines) + "\n"
