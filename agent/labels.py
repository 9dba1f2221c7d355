"""Kubernetes label syntax, checked in one place for the inventory (pod
labels, service selectors) and for policies (``matchLabels``).

Key: ``[prefix/]name``; name at most 63 characters of letters, digits, ``-``,
``_``, ``.``, starting and ending with a letter or digit; the optional prefix
is a DNS subdomain (lower-case labels joined by dots, at most 253
characters).  Value: empty, or like a name.

:func:`key_problem` and :func:`value_problem` are the pure checks;
:func:`key`, :func:`value` (and the ``selector_`` variants, which add a hint
when a ``*`` was meant as a wildcard) are converters for
:mod:`agent.yamlsrc` readers, raising ``Invalid`` at the value's position.
"""

from __future__ import annotations

import re

from agent import yamlsrc as y

__all__ = ["LABEL_NAME", "key_problem", "value_problem", "key", "value", "selector_key", "selector_value"]

#: A label name, or a value (which may also be empty).
LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_DNS_PART = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def key_problem(k: str) -> str | None:
    """Why ``k`` is not a valid label key, or None when it is."""
    prefix, _, name = k.rpartition("/")
    ok = 0 < len(name) <= 63 and LABEL_NAME.fullmatch(name) is not None
    if prefix:
        ok = ok and len(prefix) <= 253 and all(_DNS_PART.fullmatch(p) for p in prefix.split("."))
    if ok:
        return None
    return (
        f"{k!r} is not a valid label key: [dns.prefix/]name, name at most 63 "
        "characters of letters, digits, '-', '_', '.'"
    )


def value_problem(s: str) -> str | None:
    """Why ``s`` is not a valid label value, or None when it is."""
    if len(s) <= 63 and LABEL_NAME.fullmatch(s):
        return None
    return (
        f"{s!r} is not a valid label value: at most 63 characters of letters, "
        "digits, '-', '_', '.', starting and ending with a letter or digit"
    )


def key(v: y.Value) -> str:
    """A label key (a YAML string)."""
    k = y.string(v)
    problem = key_problem(k)
    if problem is not None:
        raise y.Invalid(problem)
    return k


def value(v: y.Value) -> str:
    """A label value (any YAML scalar, read as its text)."""
    s = y.any_string(v)
    problem = value_problem(s)
    if problem is not None:
        raise y.Invalid(problem)
    return s


def _no_wildcard(s: str) -> None:
    if "*" in s:
        raise y.Invalid(f"wildcards are not supported in selectors: {s!r}")


def selector_key(v: y.Value) -> str:
    """A label key in a selector: as :func:`key`, saying so when ``*`` was meant
    as a wildcard."""
    k = y.string(v)
    problem = key_problem(k)
    if problem is not None:
        _no_wildcard(k)
        raise y.Invalid(problem)
    return k


def selector_value(v: y.Value) -> str:
    """A label value in a selector: as :func:`value`, with the wildcard hint."""
    s = y.any_string(v)
    problem = value_problem(s)
    if problem is not None:
        _no_wildcard(s)
        raise y.Invalid(problem)
    return s
