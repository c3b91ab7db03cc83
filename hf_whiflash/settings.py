"""The rules for the numbers a user or a saved file sets, in one place.

Constructors and loaders check with the same rules, so a saved file is refused at load with the message the
constructor would give, plus the file it came from. Null (None) means unset only where a rule says so; 0 is a
value like any other, and "3" or 2.5 are not integers.
"""

import math
from dataclasses import dataclass
from typing import Callable


class SettingsError(ValueError):
    """A setting outside what is allowed; the message names where it came from, the key, the value and what is
    allowed."""


@dataclass(frozen=True)
class Rule:
    allowed: str  # what is allowed, in words, for the error message
    accepts: Callable[[object], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no count


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _or_unset(rule: Rule, unset: bool) -> Rule:
    if not unset:
        return rule
    return Rule(f"{rule.allowed}, or null (unset)", lambda value: value is None or rule.accepts(value))


def integer(minimum: int, *, unset: bool = False) -> Rule:
    return _or_unset(Rule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum), unset)


def number(low: float = -math.inf, high: float = math.inf, *, unset: bool = False) -> Rule:
    bounds = " and ".join(s for s in (f">= {low}" if low > -math.inf else "", f"<= {high}" if high < math.inf else "")
                          if s)
    return _or_unset(Rule(f"a finite number {bounds}".rstrip(), lambda v: _is_number(v) and low <= v <= high), unset)


def flag(*, unset: bool = False) -> Rule:
    return _or_unset(Rule("true or false", lambda v: isinstance(v, bool)), unset)


def integers(minimum: int, *, unset: bool = False) -> Rule:
    """A non-empty list of integers >= minimum (layer ids)."""
    return _or_unset(Rule(f"a non-empty list of integers >= {minimum}",
                          lambda v: isinstance(v, list) and bool(v) and all(_is_int(i) and i >= minimum for i in v)),
                     unset)


def json_object(value, where: str) -> dict:
    """`value` if it is a JSON object (dict), else an error naming `where`."""
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a JSON object {{...}}, got {type(value).__name__} {value!r:.80}")
    return value


def check(values: dict, rules: dict[str, Rule], where: str) -> dict:
    """`values` if every key has a rule and every value passes it, else an error naming `where`, the key, the value
    and what is allowed."""
    unknown = sorted(set(values) - set(rules))
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(rules)}")
    for key, value in values.items():
        if not rules[key].accepts(value):
            raise SettingsError(f"{where}: {key} = {value!r} is not allowed; expected {rules[key].allowed}")
    return values
