"""field-filter: pass messages whose JSON body has a top-level number above a threshold.

Exports the `filter` world of edgehub:plugin@0.1.0 (wit/plugin.wit).

Settings (the host's `config()`, a JSON object; defaults for missing keys):
  field  the top-level key to look at       (default "temperature")
  above  the threshold, strictly greater     (default 25)

A message passes only when its body is a JSON object whose top-level `field`
is a JSON number greater than `above`; it then gets the application property
("alert", "true") appended. Everything else is dropped.
"""

import json
import math
import re
from typing import Optional

import wit_world
from wit_world.imports import host
from wit_world.imports.types import Message

DEFAULT_FIELD = "temperature"
DEFAULT_ABOVE = 25.0

# Deepest nesting accepted (objects and arrays, the top-level object counting
# as 1), as in serde_json and the other versions of this plugin. Deeper bodies
# are dropped; they never reach json.loads, whose recursion could otherwise
# exhaust the WebAssembly stack (a trap) before Python notices.
MAX_DEPTH = 127
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[][{}]")

_settings: Optional[tuple] = None  # (field, above), read on the first call


# Python's json is laxer than serde_json (the host's parser, and the Rust
# version's): it reads 1e400 as infinity and keeps lone UTF-16 surrogates from
# \u escapes. serde_json rejects such a document, and so do we, checking only
# bodies where a quick scan finds an exponent, a 309-digit run or a surrogate
# escape (everything else takes the plain, fast path).
_SUSPECT = re.compile(rb"\d[eE]|\d{309}|\\u[dD][89a-fA-F]")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _reject_constant(name: str):
    # json.loads accepts NaN, Infinity and -Infinity; JSON does not.
    raise ValueError("not JSON: " + name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError("number out of range") from None
    return value


def _has_lone_surrogate(text: str) -> bool:
    pending = -1  # where a leading surrogate escape ended, awaiting its pair
    for m in _ESCAPE.finditer(text):
        unit = int(m.group(1), 16) if m.group(1) else -1
        if pending >= 0:
            if m.start() != pending or not 0xDC00 <= unit <= 0xDFFF:
                return True
            pending = -1
        elif 0xDC00 <= unit <= 0xDFFF:
            return True
        elif 0xD800 <= unit <= 0xDBFF:
            pending = m.end()
    return pending >= 0


def _loads(text: str, strict: bool):
    if not strict:
        return json.loads(text, parse_constant=_reject_constant)
    if _has_lone_surrogate(text):
        raise ValueError("lone surrogate")
    return json.loads(
        text,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
        parse_int=_finite_int,
    )


def _is_number(value) -> bool:
    # bool is a subclass of int in Python; JSON true/false are not numbers.
    return type(value) is int or type(value) is float


def _load_settings() -> tuple:
    field, above = DEFAULT_FIELD, DEFAULT_ABOVE
    raw = host.config()
    try:
        cfg = _loads(raw, strict=True)
    except ValueError:
        cfg = None
    if isinstance(cfg, dict):
        if isinstance(cfg.get("field"), str):
            field = cfg["field"]
        elif "field" in cfg:
            host.log(1, "field-filter: config `field` is not a string; using the default")
        if _is_number(cfg.get("above")):
            above = float(cfg["above"])
        elif "above" in cfg:
            host.log(1, "field-filter: config `above` is not a number; using the default")
    else:
        host.log(1, "field-filter: config is not a JSON object; using the defaults")
    return field, above


def _too_deep(body: bytes) -> bool:
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False  # cannot nest deeper than it has brackets
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        else:
            depth -= 1
    return False


class WitWorld(wit_world.WitWorld):
    def filter(self, m: Message) -> Optional[Message]:
        global _settings
        if _settings is None:
            _settings = _load_settings()
        field, above = _settings

        if _too_deep(m.body):
            return None
        try:
            doc = _loads(m.body.decode("utf-8"), _SUSPECT.search(m.body) is not None)
        except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
            return None
        if type(doc) is not dict:
            return None
        value = doc.get(field)
        # Compared as doubles, as in the other versions.
        if not _is_number(value) or not float(value) > above:
            return None
        m.properties.append(("alert", "true"))
        return m
