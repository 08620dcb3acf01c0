"""The typed TOML reader: :class:`Table` (typed getters, unknown keys, messages that name the
file, the service and the key) and the small value parsers (DNS names, endpoints, addresses).

Nothing here knows the configuration's structure; :mod:`.parse` does.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from .model import Endpoint

LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class Table:
    """A TOML table being read: typed getters that raise ConfigError naming the key.

    Backends use it to read their own settings table; call :meth:`done` at the end so that
    unknown keys are reported.
    """

    def __init__(
        self, path: str, data: Mapping[str, Any], prefix: str = "", service: str | None = None
    ) -> None:
        self.path = path
        self.data = data
        self.prefix = prefix
        self.service = service
        self._seen: set[str] = set()
        self._asked: set[str] = set()  # keys looked for with has(): known, maybe not read

    def error(self, key: str | None, message: str) -> ConfigError:
        full = None if key is None else self.prefix + key
        return ConfigError(self.path, message, service=self.service, key=full)

    def missing(self, key: str, expected: str) -> ConfigError:
        """A required key is absent; if an unread key looks like a typo of it, say so."""
        unread = [k for k in self.data if k not in self._seen]
        message = f"missing (expected {expected})"
        if close := difflib.get_close_matches(key, unread, n=1):
            message += f"; is {self.prefix + close[0]!r} a typo?"
        return self.error(key, message)

    def has(self, key: str) -> bool:
        self._asked.add(key)
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        self._seen.add(key)
        return self.data.get(key, default)

    def sub(self, key: str, *, required: bool = False) -> Table:
        value = self.raw(key)
        if value is None:
            if required:
                raise self.error(key, "missing table")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {show(value)}")
        return Table(self.path, value, f"{self.prefix}{key}.", self.service)

    def string(self, key: str, default: str | None = None, *, choices: tuple[str, ...] = ()) -> str:
        value = self.raw(key, default)
        if value is None:
            raise self.missing(key, "a string")
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {show(value)}")
        if choices and value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: list[str] | None = None, *, what: str = "strings") -> list[str]:
        """A list of strings; ``what`` names them in messages ("zone names"). A lone string
        is an error, not a list of one: the reader should see the brackets in the file."""
        value = self.raw(key, default)
        if value is None:
            raise self.missing(key, f"a list of {what}")
        if isinstance(value, str):
            raise self.error(
                key, f"expected a list of {what}, got {show(value)}; write {key} = [{_toml(value)}]"
            )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of {what}, got {show(value)}")
        return list(value)

    def integer(
        self, key: str, default: int | None = None, *, low: int = 0, high: int = 2**31 - 1,
        unit: str | None = None,
    ) -> int:
        """An integer from ``low`` to ``high``; ``unit`` (``"MiB"``) names what it counts in
        messages."""
        value = self.raw(key, default)
        what = f"{unit} as an integer" if unit else "an integer"
        if value is None:
            raise self.missing(key, what)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected {what}, got {show(value)}")
        if not low <= value <= high:
            raise self.error(key, f"expected {what} from {low} to {high}, got {value}")
        return value

    def ports(self, key: str, default: list[int] | None = None) -> tuple[int, ...]:
        """A list of TCP/UDP port numbers, 1 to 65535 (a lone number is an error, as in
        :meth:`strings`)."""
        value = self.raw(key, default)
        if value is None:
            raise self.missing(key, "a list of port numbers")
        if isinstance(value, int) and not isinstance(value, bool):
            raise self.error(
                key, f"expected a list of port numbers, got {show(value)}; write {key} = [{value}]"
            )
        if not isinstance(value, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value
        ):
            raise self.error(key, f"expected a list of port numbers (1 to 65535), got {show(value)}")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {show(value)}")
        return value

    def duration(
        self, key: str, default: float | str | None = None, *, allow_zero: bool = False
    ) -> float:
        """Seconds, as a number or a string with a unit (``"250ms"``, ``"30s"``, ``"5m"``,
        ``"1h"``). ``"never"`` means no limit (``math.inf``)."""
        value = self.raw(key, default)
        expected = 'a duration such as 30, "250ms", "30s", "5m" or "never"'
        if value is None:
            raise self.missing(key, expected)
        seconds: float
        if isinstance(value, bool):
            raise self.error(key, f"expected {expected}, got {show(value)}")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and value.strip() == "never":
            seconds = math.inf
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.error(key, f"expected {expected}, got {show(value)}")
        if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
            raise self.error(key, f"expected a positive duration, got {show(value)}")
        return seconds

    def done(self, also: Iterable[str] = ()) -> None:
        """Report the first key no getter asked for, with the closest known key (those asked
        for, and ``also``: keys valid here but read from elsewhere) if one is close."""
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            message = "unknown key"
            known = sorted(self._seen.union(self._asked, also))
            if close := difflib.get_close_matches(unknown[0], known, n=1):
                message += f" (did you mean {close[0]!r}?)"
            raise self.error(unknown[0], message)


def _toml(value: str) -> str:
    """A string as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value, ensure_ascii=False)


def show(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} ({text})"


def dns_name(table: Table, key: str, value: str) -> str:
    name = value.strip().rstrip(".").lower()
    labels = name.split(".")
    if not name or not all(LABEL.match(label) for label in labels) or len(name) > 253:
        raise table.error(key, f"expected a DNS name such as 'apps.example.org', got {value!r}")
    return name


def endpoint(table: Table, key: str, value: str) -> Endpoint:
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:([0-9]+)$", value) or re.match(
        r"^([0-9.]+):([0-9]+)$", value
    )
    expected = f"expected ADDRESS:PORT such as '127.0.0.1:5300' or '[::1]:5300', got {value!r}"
    if not m:
        raise table.error(key, expected)
    try:
        host = str(ipaddress.ip_address(m.group(1)))
    except ValueError:
        raise table.error(key, expected) from None
    port = int(m.group(2))
    if port > 65535:
        raise table.error(key, f"port must be from 0 to 65535, got {port}")
    return Endpoint(host, port)


def address(table: Table, key: str, value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise table.error(key, f"expected an IPv4 or IPv6 address, got {value!r}") from None


def once(t: Table, key: str, values: Sequence[object]) -> None:
    """A list that names the same thing twice is a mistake (a copy that was meant to be
    edited); say which value."""
    seen: set[object] = set()
    for value in values:
        if value in seen:
            raise t.error(key, f"{str(value)!r} is listed twice")
        seen.add(value)
