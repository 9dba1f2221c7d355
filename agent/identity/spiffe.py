"""SPIFFE IDs: strict parsing and the workload naming convention.

Pure: strings in, values out. The rules follow the SPIFFE ID specification
and are all checked here, in this order (the first broken rule is the one
the error names):

- The scheme is exactly ``spiffe`` (lowercase) followed by ``://``.
- The whole ID is at most ``MAX_ID_BYTES`` (2048) bytes of UTF-8.
- The trust domain is non-empty, at most ``MAX_TRUST_DOMAIN`` (255)
  characters, and uses only ``a-z 0-9 . - _``. Uppercase is an error, not
  folded: two spellings of one trust domain would be two identities.
- No userinfo (``@``), no port (``:``), no query (``?``), no fragment
  (``#``), no percent-encoding (``%``); each gets its own message.
- The path is empty (the trust domain's own ID) or ``/seg/seg...``; each
  segment is non-empty, not ``.`` or ``..``, and uses only
  ``A-Z a-z 0-9 . - _``. So no trailing slash and no ``//``.

Because nothing is normalised, a string that parses prints back exactly:
``str(parse_spiffe_id(s)) == s``.

Workloads are named ``spiffe://<td>/ns/<namespace>/sa/<service account>``
(the Kubernetes convention); ``SpiffeId.namespace`` and
``SpiffeId.service_account`` read it back.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = [
    "MAX_ID_BYTES",
    "MAX_TRUST_DOMAIN",
    "SpiffeIdError",
    "SpiffeId",
    "parse_spiffe_id",
    "workload_id",
]

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN = 255

TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")

# Characters that mean a URI feature SPIFFE IDs forbid, with what to say.
_FORBIDDEN_IN_TRUST_DOMAIN = (
    ("@", "userinfo is not allowed in a SPIFFE ID (found '@' in the trust domain)"),
    (":", "a port is not allowed in a SPIFFE ID trust domain (found ':')"),
)
_FORBIDDEN_ANYWHERE = (
    ("?", "a query is not allowed in a SPIFFE ID (found '?')"),
    ("#", "a fragment is not allowed in a SPIFFE ID (found '#')"),
    ("%", "percent-encoding is not allowed in a SPIFFE ID (found '%')"),
)


class SpiffeIdError(ValueError):
    """A string (or components) that is not a valid SPIFFE ID; the message
    says which rule it breaks."""


@dataclass(frozen=True)
class SpiffeId:
    """A valid SPIFFE ID. Construction validates, so every instance is valid."""

    trust_domain: str
    """Lowercase DNS-like name, e.g. ``cluster.local``."""
    path: str
    """``""`` for the trust domain's own ID, else ``/seg/seg...``."""

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_path(self.path)
        size = len(SCHEME_PREFIX) + _utf8_len(self.trust_domain) + _utf8_len(self.path)
        if size > MAX_ID_BYTES:
            raise SpiffeIdError(f"SPIFFE ID is {size} bytes long; at most {MAX_ID_BYTES} are allowed")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """``<ns>`` for an ID shaped ``/ns/<ns>/sa/<sa>``, else None."""
        seg = self.segments
        return seg[1] if _is_workload_path(seg) else None

    @property
    def service_account(self) -> str | None:
        """``<sa>`` for an ID shaped ``/ns/<ns>/sa/<sa>``, else None."""
        seg = self.segments
        return seg[3] if _is_workload_path(seg) else None

    def trust_domain_id(self) -> SpiffeId:
        """The ID of this ID's trust domain (``spiffe://<td>``)."""
        return SpiffeId(self.trust_domain, "")


def parse_spiffe_id(s: str) -> SpiffeId:
    """Parse ``s`` strictly (rules in the module docstring).

    Raises SpiffeIdError, and only that, for any string that is not a
    SPIFFE ID."""
    if not isinstance(s, str):
        raise TypeError(f"SPIFFE ID must be a str, not {type(s).__name__}")
    if not s.startswith(SCHEME_PREFIX):
        scheme, sep, _ = s.partition("://")
        if sep and scheme.lower() == "spiffe":
            raise SpiffeIdError(f"SPIFFE ID scheme must be lowercase 'spiffe', not {scheme!r}")
        if sep:
            raise SpiffeIdError(f"SPIFFE ID must use the 'spiffe' scheme, not {scheme[:20]!r}")
        raise SpiffeIdError(f"SPIFFE ID must start with {SCHEME_PREFIX!r}: {s[:64]!r}")
    size = _utf8_len(s)
    if size > MAX_ID_BYTES:
        raise SpiffeIdError(f"SPIFFE ID is {size} bytes long; at most {MAX_ID_BYTES} are allowed")
    rest = s[len(SCHEME_PREFIX) :]
    slash = rest.find("/")
    if slash < 0:
        trust_domain, path = rest, ""
    else:
        trust_domain, path = rest[:slash], rest[slash:]
    for ch, msg in _FORBIDDEN_ANYWHERE:
        if ch in trust_domain or ch in path:
            raise SpiffeIdError(msg)
    return SpiffeId(trust_domain, path)


def workload_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """``spiffe://<td>/ns/<namespace>/sa/<service_account>``, validated."""
    for what, value in (("namespace", namespace), ("service account", service_account)):
        try:
            _check_segment(value)
        except SpiffeIdError as e:
            raise SpiffeIdError(f"{what} {value!r} cannot be a SPIFFE ID path segment: {e}") from None
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{service_account}")


def _is_workload_path(seg: tuple[str, ...]) -> bool:
    return len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa"


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _check_trust_domain(td: object) -> None:
    if not isinstance(td, str):
        raise SpiffeIdError(f"trust domain must be a str, not {type(td).__name__}")
    if not td:
        raise SpiffeIdError("SPIFFE ID trust domain is empty")
    for ch, msg in _FORBIDDEN_IN_TRUST_DOMAIN + _FORBIDDEN_ANYWHERE:
        if ch in td:
            raise SpiffeIdError(msg)
    if len(td) > MAX_TRUST_DOMAIN:
        raise SpiffeIdError(
            f"SPIFFE ID trust domain is {len(td)} characters long; at most {MAX_TRUST_DOMAIN} are allowed"
        )
    bad = [c for c in td if c not in TRUST_DOMAIN_CHARS]
    if bad:
        if any(c.isupper() for c in bad):
            raise SpiffeIdError(
                f"SPIFFE ID trust domain {td[:64]!r} has uppercase letters; trust domains are lowercase "
                f"(write {td.lower()[:64]!r})"
            )
        raise SpiffeIdError(
            f"SPIFFE ID trust domain has character {bad[0]!r}; only a-z 0-9 '.' '-' '_' are allowed"
        )


def _check_path(path: object) -> None:
    if not isinstance(path, str):
        raise SpiffeIdError(f"SPIFFE ID path must be a str, not {type(path).__name__}")
    if path == "":
        return
    if not path.startswith("/"):
        raise SpiffeIdError(f"SPIFFE ID path must be empty or start with '/': {path[:64]!r}")
    if path.endswith("/"):
        raise SpiffeIdError("SPIFFE ID path must not end with '/'")
    for seg in path[1:].split("/"):
        _check_segment(seg)


def _check_segment(seg: str) -> None:
    if not isinstance(seg, str):
        raise SpiffeIdError(f"SPIFFE ID path segment must be a str, not {type(seg).__name__}")
    if seg == "":
        raise SpiffeIdError("SPIFFE ID path has an empty segment ('//' or a trailing '/')")
    if seg in (".", ".."):
        raise SpiffeIdError(f"SPIFFE ID path segment {seg!r} is not allowed (relative segments)")
    for ch, msg in _FORBIDDEN_ANYWHERE:
        if ch in seg:
            raise SpiffeIdError(msg)
    bad = [c for c in seg if c not in PATH_SEGMENT_CHARS]
    if bad:
        raise SpiffeIdError(
            f"SPIFFE ID path segment has character {bad[0]!r}; only A-Z a-z 0-9 '.' '-' '_' are allowed"
        )
