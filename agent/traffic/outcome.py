"""What one attempt to an endpoint ended with, as the shell reports it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Kind", "Outcome", "CONNECT_FAILURE", "RESET", "TIMEOUT", "status"]


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
        return str(self.status) if self.status is not None else self.kind.value


CONNECT_FAILURE = Outcome(Kind.CONNECT_FAILURE)
RESET = Outcome(Kind.RESET)
TIMEOUT = Outcome(Kind.TIMEOUT)


_BY_STATUS: dict[int, Outcome] = {}


def status(code: int) -> Outcome:
    """The outcome "response headers with status ``code``" (shared instances)."""
    o = _BY_STATUS.get(code)
    if o is None:
        o = _BY_STATUS[code] = Outcome(Kind.STATUS, code)
    return o
