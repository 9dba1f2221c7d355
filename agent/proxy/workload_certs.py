"""The proxy's workload certificates: one key + X.509-SVID per local identity.

The node proxy presents the *workload's* identity, never its own. So it
holds, in memory only, one private key and one SVID for every enrolled pod on
this node (``spiffe://<td>/ns/<ns>/sa/<sa>``). Keys are generated here and
never leave the process: the agent's CA socket only ever sees CSRs, and
nothing is written to disk (``tls`` loads keys into OpenSSL through memfd).

Rules, all in ``CertManager``:

- **Wanted = the state.** ``update(state)`` sets the wanted identities to the
  state's local ones; a missing identity is requested right away, a removed
  one is dropped (its key is forgotten).
- **Renewal** at about half of the certificate's lifetime (counted from its
  arrival), with ±10 % jitter
  so that a node's certificates (and nodes) do not renew in lock-step. Every
  renewal uses a fresh key.
- **Generation.** ``identity.generation`` in the state changes when the
  node's CA material or trust bundle changed: then the bundle and every
  certificate are requested again at once.
- **Agent away.** While the CA socket does not answer, requests are retried
  with exponential backoff (1 s → 30 s) and the current certificates (and
  bundle) stay in use until they expire. ``certificate()`` never returns an
  expired SVID: callers fail closed instead.
- **Checked on arrival.** A returned chain must verify against the returned
  bundle as exactly the identity asked for, and carry our public key.

The CA protocol (Unix stream, one JSON line each way, then close)::

    {"op": "sign", "identity": ID, "csr": PEM} -> {"ok": true, "chain": PEM, "bundle": PEM, "generation": N}
    {"op": "bundle"}                           -> {"ok": true, "bundle": PEM, "generation": N}
    failures                                   -> {"ok": false, "reason": CODE, "error": TEXT}
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity.spiffe import SpiffeIdError, parse_spiffe_id
from agent.identity.svid import (
    SvidError,
    TrustBundle,
    generate_key,
    load_certs_pem,
    make_csr,
    verify_svid,
)

__all__ = ["Svid", "CertManager", "CaError", "ca_request"]

log = logging.getLogger("meshlet.proxy.certs")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
RENEW_FRACTION = 0.5
JITTER = 0.1
MIN_RENEW_DELAY = 1.0  # never schedule a renewal sooner than this after issuance
MAX_RESPONSE = 1 << 20


class CaError(Exception):
    """A CA request failed. ``reason``: the agent's code, or "unreachable"/"protocol"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Svid:
    """One workload's certificate, held in memory."""

    identity: str
    chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates
    key: Any = field(repr=False)  # private key object; never serialized except into a memfd
    not_before: float  # epoch seconds
    not_after: float
    serial: int
    next_renewal: float  # epoch seconds
    generation: int  # identity generation it was issued under

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def expired(self, now: float) -> bool:
        return now >= self.not_after


async def ca_request(path: str, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One request on the agent's CA socket. Raises CaError."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_RESPONSE)
            try:
                writer.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ConnectionError):
                    pass
    except TimeoutError:
        raise CaError(
            "unreachable", f"the agent's CA socket {path} did not answer within {timeout:g}s"
        ) from None
    except (OSError, ValueError) as e:  # ValueError: line over the limit
        raise CaError(
            "unreachable", f"cannot talk to the agent's CA socket {path}: {e} (is the meshlet agent running?)"
        ) from None
    try:
        doc = json.loads(line)
    except ValueError:
        raise CaError(
            "protocol", f"the CA socket {path} answered something that is not a JSON line: {line[:80]!r}"
        ) from None
    if not isinstance(doc, dict):
        raise CaError("protocol", "the CA socket answered a JSON value that is not an object")
    if doc.get("ok") is not True:
        raise CaError(str(doc.get("reason") or "refused"), str(doc.get("error") or "no detail given"))
    return doc


def _epoch(dt: datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class _Entry:
    identity: str
    svid: Svid | None = None
    due: float = 0.0  # epoch seconds: request at or after this time
    failures: int = 0
    last_error: str | None = None


class CertManager:
    """Keeps a key + SVID per local identity, plus the trust bundle.

    Drive it with ``update(state)`` on every state change and run ``run()``
    as a task. Read it with ``certificate()``, ``bundle``, ``snapshot()``.
    ``listeners`` are called (no arguments) after any certificate or the
    bundle changed.
    """

    def __init__(
        self,
        ca_socket: str,
        trust_domain: str,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        request_timeout: float = 5.0,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.ca_socket = ca_socket
        self.trust_domain = trust_domain
        self.clock = clock
        self.rng = rng or random.Random()
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.listeners: list[Callable[[], None]] = []
        self.bundle: TrustBundle | None = None
        self.bundle_fingerprint: str | None = None
        self.generation: int | None = None  # the state's identity generation we follow
        self.ca_generation: int | None = None  # what the CA last reported
        self.counters: dict[str, int] = {
            "issued": 0,
            "renewed": 0,
            "refused": 0,
            "unreachable": 0,
            "bundle_updates": 0,
        }
        self.last_error: str | None = None
        self._entries: dict[str, _Entry] = {}
        self._need_bundle = True
        self._ca_failures = 0
        self._ca_retry_at = 0.0
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()

    @classmethod
    def from_state(cls, state: Any, **kw: Any) -> CertManager:
        ic = state.identity_config
        if ic is None:
            raise ValueError("the proxy state has no identity section")
        mgr = cls(ic.ca_socket, ic.trust_domain, **kw)
        mgr.update(state)
        return mgr

    # ------------------------------------------------------------ inputs

    def update(self, state: Any) -> None:
        """Follow a (new) proxy state: wanted identities, CA socket, generation."""
        ic = state.identity_config
        if ic is not None:
            if ic.ca_socket != self.ca_socket:
                self.ca_socket = ic.ca_socket
                self._ca_retry_at = 0.0
            if ic.trust_domain != self.trust_domain:
                log.warning(
                    "trust domain changed from %s to %s: requesting every certificate again",
                    self.trust_domain,
                    ic.trust_domain,
                )
                self.trust_domain = ic.trust_domain
                self._entries.clear()
                self._set_bundle(None)
            if self.generation is not None and ic.generation != self.generation:
                log.info(
                    "identity generation %d -> %d: the node's CA or trust bundle changed; "
                    "requesting the bundle and every certificate now",
                    self.generation,
                    ic.generation,
                )
                self._regenerate()
            self.generation = ic.generation
        self.set_identities(state.local_identities)

    def set_identities(self, identities: Iterable[str]) -> None:
        wanted = set(identities)
        now = self.clock()
        for ident in list(self._entries):
            if ident not in wanted:
                log.info("dropping the certificate and key of %s (no such pod on this node any more)", ident)
                del self._entries[ident]
        changed = False
        for ident in wanted:
            if ident not in self._entries:
                self._entries[ident] = _Entry(ident, due=now)
                changed = True
        if changed:
            self._wake.set()

    def _regenerate(self) -> None:
        now = self.clock()
        self._need_bundle = True
        self._ca_retry_at = 0.0
        self._ca_failures = 0
        for e in self._entries.values():
            e.due = now
            e.failures = 0
        self._wake.set()

    # ------------------------------------------------------------ outputs

    def certificate(self, identity: str) -> Svid | None:
        """The current SVID for ``identity``; None if none or expired (fail closed)."""
        e = self._entries.get(identity)
        if e is None or e.svid is None or e.svid.expired(self.clock()):
            return None
        return e.svid

    def identities(self) -> list[str]:
        """Identities with a usable certificate, sorted."""
        now = self.clock()
        return sorted(i for i, e in self._entries.items() if e.svid is not None and not e.svid.expired(now))

    def wanted(self) -> set[str]:
        return set(self._entries)

    def ready(self) -> bool:
        """A bundle and a valid certificate for every wanted identity."""
        now = self.clock()
        return self.bundle is not None and all(
            e.svid is not None and not e.svid.expired(now) for e in self._entries.values()
        )

    async def wait_ready(self, timeout: float) -> bool:
        async with asyncio.timeout(timeout):
            while not self.ready():
                self._changed.clear()
                await self._changed.wait()
        return True

    def snapshot(self) -> dict[str, Any]:
        """What the stats socket (and ``meshlet certs``) shows."""
        now = self.clock()
        idents = []
        for ident in sorted(self._entries):
            e = self._entries[ident]
            s = e.svid
            idents.append(
                {
                    "spiffe_id": ident,
                    "serial": s.serial_hex if s else None,
                    "not_before": _iso(s.not_before) if s else None,
                    "not_after": _iso(s.not_after) if s else None,
                    "expired": s.expired(now) if s else None,
                    "next_rotation": _iso(e.due if s else None),
                    "issued_generation": s.generation if s else None,
                    "failures": e.failures,
                    "last_error": e.last_error,
                }
            )
        return {
            "trust_domain": self.trust_domain,
            "generation": self.generation,
            "ca_generation": self.ca_generation,
            "ca_socket": self.ca_socket,
            "bundle_fingerprint": self.bundle_fingerprint,
            "bundle_roots": len(self.bundle.roots) if self.bundle else 0,
            "identities": idents,
            "counters": dict(self.counters),
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Request, renew and retry forever (cancel to stop)."""
        while True:
            await self.step()
            delay = self._next_delay()
            self._wake.clear()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _next_delay(self) -> float:
        now = self.clock()
        if self._ca_retry_at > now:
            return self._ca_retry_at - now
        times = [e.due for e in self._entries.values()]
        if self._need_bundle:
            times.append(now)
        if not times:
            return 3600.0
        return max(0.0, min(times) - now)

    async def step(self) -> None:
        """Do whatever is due now (one pass)."""
        now = self.clock()
        if now < self._ca_retry_at:
            return
        try:
            if self._need_bundle:
                doc = await ca_request(self.ca_socket, {"op": "bundle"}, self.request_timeout)
                self._take_bundle(doc)
                self._need_bundle = False
            for ident in sorted(self._entries):
                e = self._entries.get(ident)
                if e is None or e.due > self.clock():
                    continue
                await self._request(e)
        except CaError as err:  # the CA is unreachable or speaks nonsense: back off globally
            self._ca_failures += 1
            delay = self._backoff(self._ca_failures)
            self._ca_retry_at = self.clock() + delay
            self.counters["unreachable"] += 1
            self.last_error = str(err)
            held = len(self.identities())
            log.warning(
                "certificate authority unavailable (%s); retrying in %.1f s, still serving %d "
                "current certificate(s)",
                err,
                delay,
                held,
            )
            return
        if self._ca_failures:
            log.info("certificate authority reachable again at %s", self.ca_socket)
        self._ca_failures = 0
        self._ca_retry_at = 0.0

    def _backoff(self, failures: int) -> float:
        return min(self.backoff_max, self.backoff_min * (2 ** (failures - 1)))

    async def _request(self, e: _Entry) -> None:
        """Sign request for one identity. Refusals back off per identity;
        an unreachable CA raises CaError (the caller backs off globally)."""
        gen = self.generation
        try:
            sid = parse_spiffe_id(e.identity)
        except SpiffeIdError as err:
            self._refused(e, f"not a valid SPIFFE ID: {err}")
            return
        key = generate_key()
        csr = make_csr(sid, key)
        try:
            doc = await ca_request(
                self.ca_socket,
                {"op": "sign", "identity": e.identity, "csr": csr.decode()},
                self.request_timeout,
            )
        except CaError as err:
            if err.reason in ("unreachable", "protocol"):
                raise
            self._refused(e, f"the agent refused to sign: {err}")
            return
        if self._entries.get(e.identity) is not e:
            return  # dropped while we waited
        try:
            bundle = self._parse_bundle(doc)
            pem = str(doc.get("chain", "")).encode()
            chain = load_certs_pem(pem)
            verify_svid(chain, bundle, expected=sid)
            if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
                raise ValueError("the certificate is not for the key this proxy generated")
        except (ValueError, SvidError) as err:
            self._refused(e, f"the agent returned an unusable certificate: {err}")
            return
        # Kept: the same certificates parsed afresh.  Verifying parsed every
        # extension into Python objects that each certificate caches, ~4 KB
        # a certificate held for its life (0.4 MB of a worker's idle heap
        # with 100 identities; issue #13 item 6).
        chain = load_certs_pem(pem)
        if self.bundle_fingerprint != bundle.fingerprint():
            self._set_bundle(bundle)
        self._note_ca_generation(doc)
        now = self.clock()
        leaf = chain[0]
        nb, na = _epoch(leaf.not_valid_before_utc), _epoch(leaf.not_valid_after_utc)
        renew = self._renewal_time(nb, na, now)
        renewed = e.svid is not None
        e.svid = Svid(
            identity=e.identity,
            chain=tuple(chain),
            key=key,
            not_before=nb,
            not_after=na,
            serial=leaf.serial_number,
            next_renewal=renew,
            generation=gen or 0,
        )
        e.due = renew
        e.failures = 0
        e.last_error = None
        self.counters["renewed" if renewed else "issued"] += 1
        log.info(
            "%s certificate for %s (serial %x, expires %s, next rotation %s)",
            "renewed" if renewed else "got",
            e.identity,
            leaf.serial_number,
            _iso(na),
            _iso(renew),
        )
        self._notify()

    def _renewal_time(self, not_before: float, not_after: float, now: float) -> float:
        """About half of the lifetime left at issuance (±10 % jitter).

        Measured from receipt, not from not_before: issuers backdate
        not_before for clock skew (a minute here), which would otherwise pull
        renewals of short-lived certificates into the past."""
        frac = RENEW_FRACTION * (1 + self.rng.uniform(-JITTER, JITTER))
        remaining = not_after - now
        return now + max(min(MIN_RENEW_DELAY, remaining / 2), remaining * frac)

    def _refused(self, e: _Entry, why: str) -> None:
        e.failures += 1
        delay = self._backoff(e.failures)
        e.due = self.clock() + delay
        e.last_error = why
        self.last_error = f"{e.identity}: {why}"
        self.counters["refused"] += 1
        held = e.svid is not None and not e.svid.expired(self.clock())
        log.error(
            "no new certificate for %s: %s; retrying in %.1f s (%s)",
            e.identity,
            why,
            delay,
            "the current one stays in use" if held else "connections needing it are refused",
        )

    def _parse_bundle(self, doc: dict[str, Any]) -> TrustBundle:
        bundle = TrustBundle.from_pem(self.trust_domain, str(doc.get("bundle", "")).encode())
        if not bundle.roots:
            raise ValueError("the trust bundle holds no certificate")
        return bundle

    def _take_bundle(self, doc: dict[str, Any]) -> None:
        try:
            bundle = self._parse_bundle(doc)
        except (ValueError, SvidError) as err:
            raise CaError("protocol", f"the agent sent an unusable trust bundle: {err}") from None
        self._note_ca_generation(doc)
        if bundle.fingerprint() != self.bundle_fingerprint:
            self._set_bundle(bundle)
            self._notify()

    def _note_ca_generation(self, doc: dict[str, Any]) -> None:
        g = doc.get("generation")
        if isinstance(g, int) and not isinstance(g, bool):
            self.ca_generation = g

    def _set_bundle(self, bundle: TrustBundle | None) -> None:
        old = self.bundle_fingerprint
        self.bundle = bundle
        self.bundle_fingerprint = bundle.fingerprint() if bundle else None
        if bundle is not None:
            self.counters["bundle_updates"] += 1
            log.info(
                "trust bundle for %s: %d root(s), fingerprint %s (was %s)",
                self.trust_domain,
                len(bundle.roots),
                (self.bundle_fingerprint or "")[:16],
                (old or "none")[:16],
            )

    def _notify(self) -> None:
        self._changed.set()
        for cb in list(self.listeners):
            try:
                cb()
            except Exception:
                log.exception("certificate change listener failed")
