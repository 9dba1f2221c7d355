"""What one attempt to an endpoint ended with, as the shell reports it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Kind", "Outcome", "CONNECT_FAILURE", "RESET", "TIMEOUT", "status", "grpc", "GRPC_HTTP_STATUS"]


class Kind(enum.Enum):
    CONNECT_FAILURE = "connect-failure"
    """The TCP (or tunnel) connection to the endpoint could not be made: no
    request byte reached it."""
    RESET = "reset"
    """The connection was reset or closed before the response headers were
    complete."""
    TIMEOUT = "timeout"
    """The per-try timeout expired before the response headers were complete."""
    STATUS = "status"
    """Response headers arrived; see :attr:`Outcome.status`."""


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    status: int | None = None
    """The HTTP status code for :attr:`Kind.STATUS`, else None."""
    grpc: int | None = None
    """A gRPC answer's ``grpc-status`` (``status`` is then its HTTP equivalent,
    :data:`GRPC_HTTP_STATUS`, as Envoy maps it for outlier detection)."""

    def __post_init__(self) -> None:
        if (self.kind is Kind.STATUS) != (self.status is not None):
            raise ValueError("an Outcome has a status code exactly when its kind is STATUS")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"{self.status} is not an HTTP status code")

    @property
    def is_5xx(self) -> bool:
        return self.status is not None and self.status >= 500

    @property
    def ok(self) -> bool:
        """Counts as a success for load balancing and outlier detection."""
        return self.kind is Kind.STATUS and not self.is_5xx

    def __str__(self) -> str:
        if self.grpc is not None:
            return f"grpc-status {self.grpc}"
        return str(self.status) if self.status is not None else self.kind.value


CONNECT_FAILURE = Outcome(Kind.CONNECT_FAILURE)
RESET = Outcome(Kind.RESET)
TIMEOUT = Outcome(Kind.TIMEOUT)


_BY_STATUS: dict[int, Outcome] = {}

#: gRPC status → the HTTP status it counts as (CANCELLED 499, DEADLINE_EXCEEDED
#: 504, RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503; others 200).
GRPC_HTTP_STATUS = {1: 499, 4: 504, 8: 429, 13: 500, 14: 503}
_BY_GRPC: dict[int, Outcome] = {}


def grpc(code: int) -> Outcome:
    """The outcome "a gRPC answer with ``grpc-status`` ``code``" (shared instances)."""
    o = _BY_GRPC.get(code)
    if o is None:
        o = _BY_GRPC[code] = Outcome(Kind.STATUS, GRPC_HTTP_STATUS.get(code, 200), code)
    return o


def status(code: int) -> Outcome:
    """The outcome "response headers with status ``code``" (shared instances)."""
    o = _BY_STATUS.get(code)
    if o is None:
        o = _BY_STATUS[code] = Outcome(Kind.STATUS, code)
    return o
