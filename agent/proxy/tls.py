"""Mutual TLS 1.3 for the node-proxy ↔ node-proxy tunnel, with SPIFFE identities.

Rules (everything that decides trust lives here):

- TLS 1.3 only, both sides present certificates (``CERT_REQUIRED``), ALPN
  ``meshlet-mux/1`` (many streams per connection, ``agent.proxy.mux``) or
  ``meshlet-tunnel/1`` (one stream per connection) must be negotiated (else
  refused: ``alpn``).  Both sides list ``meshlet-mux/1`` first unless
  ``TlsContexts.mux`` is off (``proxy.tunnelMux: false``): then they offer
  ``meshlet-tunnel/1`` alone, and a peer of either kind falls back to it.
- OpenSSL checks the signature path to the trust bundle and validity; then,
  right after the handshake and before any application byte, ``verify_svid``
  checks the peer's full chain against the *current* bundle: the client
  expects the destination workload's SPIFFE ID, the server accepts any ID of
  the trust domain and reports it (``peer_identity``). OpenSSL's failures map
  onto the same reason codes (``expired``, ``unknown_ca``...).
- The node proxy presents the *workload's* certificate. The client names the
  destination identity in SNI (``sni_for``: base32 labels under
  ``.id.meshlet``, or a hash under ``.h.meshlet`` for long IDs); the server
  switches to that identity's context, or refuses (``no_certificate``) when
  this node has no such workload. A client without SNI gets one of the local
  identities and must then be checked by the caller (the tunnel insists on
  SNI naming the destination pod).
- Keys reach OpenSSL through an anonymous memfd, closed right after loading:
  they never touch a filesystem.
- Session resumption: clients cache one session per (remote node, source
  identity, destination identity), reused only while the trust bundle and the
  client's own certificate are unchanged. When the bundle changes, every
  context (server ones too, so old tickets die) is rebuilt and the caches
  dropped. A resumed handshake carries no certificates, so the chain verified
  on the full handshake is kept and verified again (validity, bundle) on each
  resumption.
- Key scope: each node's intermediate CA names its node
  (``svid.issuing_node``); the verified chain's issuing node is kept with it
  (``TlsConnection.peer_node``).  The client expects the destination node's
  (``expect_node``; else refused: ``wrong_node``); the server side checks it
  against the node the connection came from (``admission.admit_tunnel``).
- Every refused handshake is counted by reason and logged once with the peer.
- Sessions are fetched sparingly: reading ``SSLObject.session`` copies the
  session (peer chain included, ~7 KB) and CPython before 3.12.7 never frees
  that copy (python/cpython#116810), so a fetch per connection leaked ~10 KB
  per tunnel connection (10,000 connections: ~100 MB that never came back).
  A client fetches a session only when the cache has no fresh one for its key
  (none, or past half its lifetime), and only one connection per key at a
  time (``TlsContexts.wants_session``).  A session the server refused is
  kept (still offered) and replaced only once it is
  ``SESSION_REFUSED_REFETCH_S`` old: behind a node whose proxy runs several
  workers each worker has its own ticket keys, so about half of the offers
  are refused whatever the client holds; replacing a session on each
  refusal cost a fetch (a leaked copy) every few connections, and the
  copies leaked during a burst, scattered over the heap, kept its pages
  resident (10,000 connections: ~370 fetches on the first burst, ~1,400 on
  the next; ~10 MB and a heap that never shrank back).

I/O: ``TlsConnection`` is an asyncio Protocol over ``ssl.MemoryBIO`` (asyncio's
own SSL transport cannot pass a session). It exposes the decrypted stream as
an ordinary ``asyncio.Transport`` to an inner protocol (the relay's
``Endpoint``), reading/writing up to 256 KiB per call, with the raw socket's
flow control passed straight through, and TLS half-close (close_notify ⇄ EOF).

Size: one module of ~900 lines on purpose: every trust decision of the tunnel (contexts,
SNI, resumption, chain checks, the handshake protocol) is here, so a review of trust reads one file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import socket
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.identity.spiffe import SpiffeId, SpiffeIdError, parse_spiffe_id
from agent.identity.svid import SvidError, TrustBundle, issuing_node, verify_svid_issuer
from agent.proxy.mux import ALPN as MUX_ALPN
from agent.proxy.relay import reset_transport
from agent.proxy.workload_certs import Svid

__all__ = [
    "ALPN",
    "MUX_ALPN",
    "HandshakeError",
    "CertSource",
    "TlsContexts",
    "TlsConnection",
    "sni_for",
    "identity_from_sni",
    "load_svid_into",
]

log = logging.getLogger("meshlet.proxy.tls")

ALPN = "meshlet-tunnel/1"
SNI_SUFFIX = "meshlet"
READ_SIZE = 256 * 1024
_RECORD = 17 * 1024  # > the largest TLS plaintext record (16 KiB): room left for one more
_SMALL_WRITE = 4096  # writelines joins buffers below this size (headers, control frames)
# writelines sends what it has encrypted once this much is pending: the outgoing
# memory BIO keeps its largest size for the connection's life (OpenSSL's mem BIO
# never shrinks), so a 4 MiB batch of a bulk stream's frames would leave ~4.5 MB
# held by an idle pooled connection, and 1 MiB sends ~1.1 MB (mallinfo2 in use
# after the bench's traffic, 0.7 MB more than at 256 KiB).  256 KiB sends cost
# 4 syscalls per MiB: the sender's CPU per GB did not move (scripts/bulk_ab.py).
_FLUSH_AT = 256 * 1024
SESSION_CACHE_SIZE = 1024
SESSION_REFRESH_S = 3600.0  # fetch a new session after this long even if its lifetime is longer
SESSION_REFUSED_REFETCH_S = 300.0  # a refused session is replaced once it is this old (module docstring)
_SESSION_READS = 4  # reads of SSLObject.session one connection may try before giving up (each leaks)
VERIFIED_CACHE_SIZE = 4096
_MAX_B32_SNI = 200  # longer encodings use the hash form (SNI host names stay < 253)

# OpenSSL X509_V_ERR_* → SvidError reason
_VERIFY_CODES = {
    9: "not_yet_valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    26: "bad_key_usage",  # INVALID_PURPOSE
}


class HandshakeError(Exception):
    """A refused handshake. ``reason``: an SvidError reason, "no_certificate",
    "alpn", "protocol", "peer_refused", "wrong_node" or "timeout"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CertSource(Protocol):
    """What ``certs.CertManager`` provides."""

    bundle: TrustBundle | None
    bundle_fingerprint: str | None

    def certificate(self, identity: str) -> Svid | None: ...

    def identities(self) -> list[str]: ...


# ------------------------------------------------------------------ SNI


def sni_for(identity: str) -> str:
    """An unambiguous DNS-safe name for a SPIFFE ID (what the client sends as SNI)."""
    raw = identity.encode()
    enc = base64.b32encode(raw).decode().rstrip("=").lower()
    if len(enc) > _MAX_B32_SNI:
        return f"{_hash_label(identity)}.h.{SNI_SUFFIX}"
    labels = [enc[i : i + 63] for i in range(0, len(enc), 63)] or ["-"]
    return ".".join(labels + ["id", SNI_SUFFIX])


def _hash_label(identity: str) -> str:
    return base64.b32encode(hashlib.sha256(identity.encode()).digest()).decode().rstrip("=").lower()


def identity_from_sni(name: str | None, candidates: list[str] | None = None) -> str | None:
    """Inverse of ``sni_for``. The hash form is resolved among ``candidates``."""
    if not name:
        return None
    parts = name.lower().rstrip(".").split(".")
    if len(parts) < 3 or parts[-1] != SNI_SUFFIX:
        return None
    kind, labels = parts[-2], parts[:-2]
    if kind == "h" and len(labels) == 1:
        for c in candidates or ():
            if _hash_label(c) == labels[0]:
                return c
        return None
    if kind != "id":
        return None
    enc = "".join(labels).upper()
    try:
        raw = base64.b32decode(enc + "=" * (-len(enc) % 8))
        ident = raw.decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return ident if sni_for(ident) == name.lower().rstrip(".") else None


# ------------------------------------------------------------------ contexts


def load_svid_into(ctx: ssl.SSLContext, svid: Svid) -> None:
    """``load_cert_chain`` from an anonymous memfd: the key never touches a disk."""
    data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
    data += svid.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.memfd_create("meshlet-svid", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        path = f"/proc/self/fd/{fd}"
        ctx.load_cert_chain(path, path)
    finally:
        os.close(fd)
        del data


def _alpns(mux: bool) -> list[str]:
    return [MUX_ALPN, ALPN] if mux else [ALPN]


def _base_context(server: bool, bundle: TrustBundle, mux: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.to_pem().decode())
    ctx.set_alpn_protocols(_alpns(mux))
    return ctx


def _map_ssl_error(e: ssl.SSLError) -> HandshakeError:
    if isinstance(e, ssl.SSLCertVerificationError):
        reason = _VERIFY_CODES.get(e.verify_code, "bad_chain")
        return HandshakeError(
            reason, f"certificate verification failed: {e.verify_message} (OpenSSL code {e.verify_code})"
        )
    r = getattr(e, "reason", None) or ""
    if r == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return HandshakeError("no_certificate", "the peer presented no certificate")
    if r == "NO_APPLICATION_PROTOCOL":
        return HandshakeError("alpn", f"no common application protocol (need {MUX_ALPN} or {ALPN})")
    if "ALERT" in r or r.startswith("TLSV1_"):  # an alert from the peer, e.g. TLSV1_UNRECOGNIZED_NAME
        return HandshakeError(
            "peer_refused", f"the peer refused the handshake: {r.lower()} (see that node's proxy log for why)"
        )
    return HandshakeError("protocol", f"TLS handshake failed: {r or e}")


@dataclass
class _Session:
    session: ssl.SSLSession
    bundle_fp: str
    src_serial: int
    chain: tuple[x509.Certificate, ...]
    stored_at: float = 0.0  # time.monotonic()
    refused: bool = False  # the server did not resume it at least once

    def fresh(self, now: float) -> bool:
        """Young enough not to fetch a new one: less than half its lifetime
        (the server's ticket lifetime) and ``SESSION_REFRESH_S`` old; once
        refused, less than ``SESSION_REFUSED_REFETCH_S`` old."""
        if self.refused:
            return now - self.stored_at < SESSION_REFUSED_REFETCH_S
        return now - self.stored_at < min(self.session.timeout / 2, SESSION_REFRESH_S)


@dataclass
class _Verified:
    chain_key: bytes  # sha256 over the chain's DERs, as the peer sent it
    chain: tuple[x509.Certificate, ...]
    identity: SpiffeId
    node: str | None  # the node whose intermediate signed the leaf (None: no node CA)
    valid_from: float  # epoch seconds: every certificate involved is valid in this window
    valid_until: float


class TlsContexts:
    """SSL contexts, session cache, verification and handshake counters for one worker."""

    def __init__(self, certs: CertSource, *, session_cache_size: int = SESSION_CACHE_SIZE) -> None:
        self.certs = certs
        self.session_cache_size = session_cache_size
        self.mux = True  # offer meshlet-mux/1 (proxy.tunnelMux); contexts are rebuilt when it changes
        self._mux_applied = True
        # session_reads: reads of SSLObject.session (each leaks a copy before CPython 3.12.7)
        self.counters: dict[str, int] = {"handshakes": 0, "resumed": 0, "refused": 0, "session_reads": 0}
        self.failures: dict[str, int] = {}
        self._fp: str | None = None
        self._client: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._server: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._default_server: ssl.SSLContext | None = None
        self._sessions: OrderedDict[tuple, _Session] = OrderedDict()
        self._fetching: dict[tuple, weakref.ref[TlsConnection]] = {}  # key -> the one connection fetching
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()  # by sha256 of the leaf

    # ---- epoch: everything hangs off the bundle fingerprint

    def _sync(self) -> TrustBundle | None:
        fp = self.certs.bundle_fingerprint
        if self.mux != self._mux_applied:
            # New contexts: cached sessions belong to the old ones (OpenSSL refuses a session
            # with another context: "Session refers to a different SSLContext").
            self._mux_applied = self.mux
            self._client.clear()
            self._server.clear()
            self._sessions.clear()
            self._fetching.clear()
            self._default_server = None
        if fp != self._fp:
            if self._fp is not None:
                log.info(
                    "trust bundle changed (%s -> %s): rebuilding TLS contexts, dropping %d cached session(s)",
                    self._fp[:16],
                    (fp or "none")[:16],
                    len(self._sessions),
                )
            self._fp = fp
            self._client.clear()
            self._server.clear()
            self._sessions.clear()
            self._fetching.clear()
            self._verified.clear()
            self._default_server = None
        return self.certs.bundle

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "failures": dict(self.failures), "cached_sessions": len(self._sessions)}

    def wants_session(self, key: tuple, conn: TlsConnection) -> bool:
        """Whether ``conn`` should fetch its session for ``key``: the cache
        has no fresh one and no other open connection is fetching it."""
        s = self._sessions.get(key)
        if s is not None and s.bundle_fp == self._fp and s.fresh(time.monotonic()):
            return False
        ref = self._fetching.get(key)
        other = ref() if ref is not None else None
        if other is not None and other is not conn and other.state != _CLOSED:
            return False
        self._fetching[key] = weakref.ref(conn)
        return True

    def _forget_fetch(self, key: tuple, conn: TlsConnection) -> None:
        ref = self._fetching.get(key)
        if ref is not None and ref() in (conn, None):
            del self._fetching[key]

    def refused(self, err: HandshakeError, *, side: str, peer: Any, extra: str = "") -> None:
        self.counters["refused"] += 1
        self.failures[err.reason] = self.failures.get(err.reason, 0) + 1
        log.warning(
            "refused TLS handshake (%s side) with %s%s: %s: %s",
            side,
            _fmt(peer),
            extra,
            err.reason,
            err.detail,
        )

    # ---- client

    def client_context(self, src: str) -> tuple[ssl.SSLContext, Svid]:
        """The context presenting ``src``'s certificate. Raises HandshakeError."""
        bundle = self._sync()
        svid = self.certs.certificate(src)
        if svid is None:
            raise HandshakeError(
                "no_certificate",
                f"this node holds no valid certificate for {src} "
                "(not issued yet, or the agent's CA is unreachable)",
            )
        if bundle is None:
            raise HandshakeError("no_certificate", "no trust bundle yet (the agent's CA has not answered)")
        cached = self._client.get(src)
        if cached is None or cached[0] != svid.serial:
            ctx = _base_context(False, bundle, self._mux_applied)
            load_svid_into(ctx, svid)
            self._client[src] = (svid.serial, ctx)
            return ctx, svid
        return cached[1], svid

    def _session(self, key: tuple, src_serial: int) -> _Session | None:
        s = self._sessions.get(key)
        if s is None:
            return None
        if s.bundle_fp != self._fp or s.src_serial != src_serial:
            del self._sessions[key]
            return None
        self._sessions.move_to_end(key)
        return s

    def _store_session(self, key: tuple, entry: _Session) -> None:
        if entry.bundle_fp != self._fp:
            return
        entry.stored_at = time.monotonic()
        self._sessions[key] = entry
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.session_cache_size:
            self._sessions.popitem(last=False)

    def client_connection(
        self, app: asyncio.Protocol, *, node: str, src: str, dst: str, expect_node: str | None = None
    ) -> TlsConnection:
        """A protocol for a connected socket: TLS client presenting ``src``, expecting ``dst``
        and, when ``expect_node`` is given, a certificate issued by that node's intermediate
        (the node the destination pod runs on: no other node may speak for it).

        Raises HandshakeError (counted) when no certificate is available."""
        try:
            ctx, svid = self.client_context(src)
            expected = parse_spiffe_id(dst)
        except SpiffeIdError as e:
            err = HandshakeError("bad_spiffe_id", f"destination identity {dst!r}: {e}")
            self.refused(err, side="client", peer=node)
            raise err from None
        except HandshakeError as err:
            self.refused(err, side="client", peer=node)
            raise
        key = (node, src, dst)
        cached = self._session(key, svid.serial)
        fp, serial = self._fp, svid.serial

        def verify(conn: TlsConnection) -> str:
            if conn.sslobj.session_reused and cached is None:
                raise HandshakeError("protocol", "the server resumed a session this client did not offer")
            if cached is not None and not conn.sslobj.session_reused:
                # another worker's ticket keys, or a restarted server: see SESSION_REFUSED_REFETCH_S
                cached.refused = True
            sid = self._verify_peer(conn, expected, cached.chain if cached else None)
            if expect_node is not None and conn.peer_node != expect_node:
                conn.verified_chain = ()  # never cached for resumption
                raise HandshakeError(
                    "wrong_node",
                    f"the certificate for {sid} was issued by "
                    f"{_node_ca(conn.peer_node)}, but {sid} is expected on node {expect_node}: "
                    "a node may only speak for its own pods (a compromised node, or stale state)",
                )
            return sid

        def on_session(conn: TlsConnection, session: ssl.SSLSession | None) -> None:
            self._forget_fetch(key, conn)  # None: closed before a ticket came
            if session is not None and conn.verified_chain:
                self._store_session(key, _Session(session, fp or "", serial, conn.verified_chain))

        return TlsConnection(
            ctx,
            app,
            server_side=False,
            server_hostname=sni_for(dst),
            session=cached.session if cached else None,
            verify=verify,
            on_session=on_session,
            wants_session=lambda conn: self.wants_session(key, conn),
            contexts=self,
            peer_label=node,
        )

    async def connect(
        self,
        sock: socket.socket,
        app: asyncio.Protocol,
        *,
        node: str,
        src: str,
        dst: str,
        timeout: float,
        expect_node: str | None = None,
    ) -> TlsConnection:
        """Handshake over a connected socket. Returns once ``app`` is connected.
        Raises HandshakeError (counted and logged)."""
        conn = self.client_connection(app, node=node, src=src, dst=dst, expect_node=expect_node)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        await conn.wait_handshake(timeout)
        return conn

    # ---- server

    def server_connection(
        self, app: asyncio.Protocol, *, on_made: Callable[[TlsConnection], bool] | None = None
    ) -> TlsConnection:
        """A protocol for an accepted socket: TLS server picking the certificate by SNI."""
        return TlsConnection(
            self._server_default(),
            app,
            server_side=True,
            verify=self._verify_client,
            contexts=self,
            on_made=on_made,
        )

    def _server_default(self) -> ssl.SSLContext:
        bundle = self._sync()
        ctx = self._default_server
        if ctx is None:
            if bundle is None:
                # No bundle yet: a context that can never complete a handshake.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.verify_mode = ssl.CERT_REQUIRED
            else:
                ctx = _base_context(True, bundle, self._mux_applied)
            ctx.sni_callback = self._sni
            self._default_server = ctx
        return ctx

    def _server_identity_context(self, ident: str) -> ssl.SSLContext | None:
        bundle = self.certs.bundle
        svid = self.certs.certificate(ident)
        if svid is None or bundle is None:
            return None
        cached = self._server.get(ident)
        if cached is None or cached[0] != svid.serial:
            ctx = _base_context(True, bundle, self._mux_applied)
            load_svid_into(ctx, svid)
            self._server[ident] = (svid.serial, ctx)
            return ctx
        return cached[1]

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        conn: TlsConnection | None = getattr(sslobj, "_meshlet_conn", None)
        try:
            local = self.certs.identities()
            if name is None:
                # No SNI: present one of ours so the client's certificate still gets checked;
                # the caller decides whether an unnamed destination is acceptable.
                ident = local[0] if local else None
                if ident is None:
                    raise HandshakeError("no_certificate", "no SNI, and this node holds no certificate")
            else:
                ident = identity_from_sni(name, local)
                if ident is None:
                    raise HandshakeError("no_certificate", f"SNI {name[:80]!r} names no workload identity")
            ctx = self._server_identity_context(ident)
            if ctx is None:
                raise HandshakeError(
                    "no_certificate", f"this node has no workload {ident} (or no valid certificate for it)"
                )
            sslobj.context = ctx
            if conn is not None:
                conn.local_identity = ident
                conn.sni_named = name is not None
            return None
        except HandshakeError as err:
            if conn is not None:
                conn.pending_error = err
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        except Exception as e:  # noqa: BLE001 - never let an exception escape into OpenSSL's callback
            if conn is not None:
                conn.pending_error = HandshakeError(
                    "protocol", f"internal error selecting a certificate: {e!r}"
                )
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR

    def _verify_client(self, conn: TlsConnection) -> str:
        return self._verify_peer(conn, None, None)

    def _verify_peer(
        self,
        conn: TlsConnection,
        expected: SpiffeId | None,
        resumed_chain: tuple[x509.Certificate, ...] | None,
    ) -> str:
        """``verify_svid`` on the peer's chain, memoized per chain for this bundle.

        The result depends only on the chain, the bundle (the cache dies with
        it) and the time (each entry keeps the window in which every
        certificate involved is valid). A resumed handshake carries no
        certificates: its leaf finds the chain verified on the full one."""
        bundle = self.certs.bundle
        if bundle is None:
            raise HandshakeError("unknown_ca", "no trust bundle yet")
        ders: list[bytes] = []
        if conn.sslobj.session_reused:
            entry = self._verified.get(hashlib.sha256(conn.sslobj.getpeercert(True) or b"").digest())
            chain = entry.chain if entry is not None else resumed_chain
            if not chain:
                raise HandshakeError(
                    "bad_chain",
                    "resumed session for a peer certificate this proxy has not "
                    "verified (cache evicted); the next handshake will be a full one",
                )
        else:
            # private API: SSLObject.get_unverified_chain() is public only from Python 3.13
            raw = conn.sslobj._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]  # see above
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw]  # type: ignore[attr-defined]  # ditto
            if not ders:
                raise HandshakeError("no_certificate", "the peer presented no certificate")
            entry = self._verified.get(hashlib.sha256(ders[0]).digest())
            if entry is not None and entry.chain_key != hashlib.sha256(b"".join(ders)).digest():
                entry = None
            chain = entry.chain if entry is not None else None
        now = time.time()
        if entry is not None and entry.valid_from <= now < entry.valid_until:
            sid = entry.identity
            if expected is not None and sid != expected:
                raise HandshakeError("wrong_identity", f"peer is {sid}, expected {expected}")
            node = entry.node
        else:
            if chain is None:
                try:
                    chain = tuple(x509.load_der_x509_certificate(d) for d in ders)
                except ValueError as e:
                    raise HandshakeError("bad_chain", f"unparsable certificate: {e}") from None
            try:
                sid, issuer = verify_svid_issuer(list(chain), bundle, expected=expected)
            except SvidError as e:
                raise HandshakeError(e.reason, e.detail) from None
            node = issuing_node(issuer, bundle.trust_domain)
            self._remember(chain, sid, node, bundle)
        assert chain is not None  # entry.chain, the resumed chain, or parsed above
        conn.verified_chain = tuple(chain)
        conn.peer_node = node
        return str(sid)

    def _remember(
        self, chain: tuple[x509.Certificate, ...], sid: SpiffeId, node: str | None, bundle: TrustBundle
    ) -> None:
        ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
        certs = list(chain) + list(bundle.roots)
        entry = _Verified(
            chain_key=hashlib.sha256(b"".join(ders)).digest(),
            chain=tuple(chain),
            identity=sid,
            node=node,
            valid_from=max(c.not_valid_before_utc.timestamp() for c in certs),
            valid_until=min(c.not_valid_after_utc.timestamp() for c in certs),
        )
        k = hashlib.sha256(ders[0]).digest()
        self._verified[k] = entry
        self._verified.move_to_end(k)
        while len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)


def _node_ca(node: str | None) -> str:
    return f"node {node}'s intermediate CA" if node else "a CA that is no node's intermediate"


def _fmt(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr)


# ------------------------------------------------------------------ the connection

_HANDSHAKE, _OPEN, _CLOSED = "handshake", "open", "closed"
# One decrypt buffer per process: reads never nest, and delivered bytes are copies.
_READ_VIEW = memoryview(bytearray(READ_SIZE + _RECORD))


class TlsConnection(asyncio.Protocol):
    """TLS over a raw transport with memory BIOs; plaintext to ``app``."""

    def __init__(
        self,
        context: ssl.SSLContext,
        app: asyncio.Protocol,
        *,
        server_side: bool,
        verify: Callable[[TlsConnection], str],
        contexts: TlsContexts | None = None,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[TlsConnection, ssl.SSLSession | None], None] | None = None,
        wants_session: Callable[[TlsConnection], bool] | None = None,
        on_made: Callable[[TlsConnection], bool] | None = None,
        peer_label: str | None = None,
    ) -> None:
        self._ctx = context
        self.app = app
        self.server_side = server_side
        self._verify = verify
        self._contexts = contexts
        self._hostname = server_hostname
        self._offered_session = session
        self._on_session = on_session
        self._wants_session = wants_session
        self._on_made = on_made
        self.peer_label = peer_label
        self.raw: asyncio.Transport | None = None
        self.sslobj: ssl.SSLObject = None  # type: ignore[assignment]  # set in connection_made
        self.state = _HANDSHAKE
        self.peer_identity: str | None = None
        self.peer_node: str | None = None  # whose node intermediate issued the peer's certificate
        self.local_identity: str | None = None  # server: the identity chosen by SNI
        self.sni_named = False
        self.alpn: str | None = None  # the negotiated protocol: MUX_ALPN or ALPN
        self.verified_chain: tuple[x509.Certificate, ...] = ()
        self.pending_error: HandshakeError | None = None
        self.error: HandshakeError | None = None
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._app_transport: _AppTransport | None = None
        self._app_paused = False  # the app asked us to stop delivering
        self._read_scheduled = False
        self._sent_close_notify = False
        self._got_close_notify = False
        self._session_seen = False
        self._session_reads = 0
        self._lost_exc: Exception | None = None

    # ---- raw side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]  # a stream protocol gets a Transport
        if self._on_made is not None and not self._on_made(self):
            self.state = _CLOSED
            self._set_failed(HandshakeError("protocol", "refused before the handshake"))
            reset_transport(self.raw)
            return
        try:
            self.sslobj = self._ctx.wrap_bio(
                self._in,
                self._out,
                server_side=self.server_side,
                server_hostname=self._hostname,
                session=self._offered_session,
            )
        except (ssl.SSLError, ValueError) as e:
            self._fail(HandshakeError("protocol", f"cannot start TLS: {e}"))
            return
        self.sslobj._meshlet_conn = self  # type: ignore[attr-defined]  # our mark, for the SNI callback
        self._do_handshake()

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        self._in.write(data)
        if self.state == _HANDSHAKE:
            self._do_handshake()
        else:
            self._read()

    def eof_received(self) -> bool:
        if self.state == _HANDSHAKE:
            self._fail(HandshakeError("protocol", "the peer closed the connection during the handshake"))
            return False
        if self.state == _OPEN and not self._got_close_notify:
            self._read()  # a close_notify may still sit in the buffer
        if self.state == _OPEN and not self._got_close_notify:
            self._lost_exc = ConnectionResetError(
                "the peer closed the TLS connection without close_notify (truncated; it may have refused "
                "our certificate: see its proxy log)"
            )
            self.state = _CLOSED
            self.raw.abort()  # type: ignore[union-attr]  # set in connection_made
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        if not self.handshake.done():
            err = self.pending_error or HandshakeError(
                "protocol", f"connection lost during the handshake: {exc or 'closed by peer'}"
            )
            self._count(err)
            self._set_failed(err)
        if self._app_transport is not None:
            self._app_transport._closed = True
            e = self._lost_exc or exc
            self._capture_session(last=True)
            self.app.connection_lost(e)

    def pause_writing(self) -> None:
        if self._app_transport is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_transport is not None:
            self.app.resume_writing()

    # ---- handshake

    def _do_handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as e:
            self._flush()  # the alert
            self._fail(self.pending_error or _map_ssl_error(e))
            return
        except Exception as e:  # noqa: BLE001 - never let one handshake crash the proxy
            self._fail(HandshakeError("protocol", f"TLS error: {e!r}"))
            return
        self._flush()
        try:
            self.alpn = self.sslobj.selected_alpn_protocol()
            if self.alpn not in (MUX_ALPN, ALPN):
                raise HandshakeError(
                    "alpn",
                    f"the peer did not negotiate ALPN {MUX_ALPN!r} or {ALPN!r} (got {self.alpn!r})",
                )
            if self.sslobj.version() != "TLSv1.3":
                raise HandshakeError("protocol", f"negotiated {self.sslobj.version()}, need TLSv1.3")
            self.peer_identity = self._verify(self)
        except HandshakeError as err:
            self._fail(err)
            return
        self.state = _OPEN
        if self._contexts is not None:
            self._contexts.counters["handshakes"] += 1
            if self.sslobj.session_reused:
                self._contexts.counters["resumed"] += 1
        self._app_transport = _AppTransport(self)
        self.app.connection_made(self._app_transport)
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self.state == _OPEN:
            self._read()

    def _fail(self, err: HandshakeError) -> None:
        self.error = err
        self._count(err)
        self.state = _CLOSED
        self._set_failed(err)
        if self.raw is not None and not self.raw.is_closing():
            # Alerts (if any) are flushed; close after them. A verification
            # refused by us after OpenSSL's success sends no alert: the peer
            # sees the connection end before any application byte.
            self.raw.close()

    def _set_failed(self, err: HandshakeError) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(err)
            self.handshake.exception()  # mark retrieved: a refused peer may have nobody waiting

    def _count(self, err: HandshakeError) -> None:
        if getattr(err, "_counted", False):
            return
        err._counted = True  # type: ignore[attr-defined]  # our mark on the exception: count once
        if self._contexts is not None:
            peer = self.raw.get_extra_info("peername") if self.raw is not None else None
            extra = ""
            if self.peer_label:
                extra += f" (node {self.peer_label})"
            if self._hostname:
                extra += f" expecting {identity_from_sni(self._hostname)}"
            self._contexts.refused(
                err, side="server" if self.server_side else "client", peer=peer, extra=extra
            )

    async def wait_handshake(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.handshake)
        except TimeoutError:
            err = HandshakeError("timeout", f"no TLS handshake within {timeout:g}s")
            if not self.handshake.done():
                self._fail(err)
            raise err from None

    # ---- application data in

    def _read(self) -> None:
        self._read_scheduled = False
        view, limit = _READ_VIEW, READ_SIZE  # shared: each chunk is copied out before delivery
        while self.state == _OPEN and not self._app_paused:
            n = 0
            eof = blocked = False
            try:
                while n <= limit:
                    k = self.sslobj.read(len(view) - n, view[n:])
                    if not k:
                        eof = True
                        break
                    n += k  # type: ignore[operator]  # read(n, buffer) returns a count; typeshed: bytes
                    if not self._in.pending and not self.sslobj.pending():
                        # Every byte handed to OpenSSL is decrypted and taken: one more read
                        # could only raise SSLWantReadError, which costs about as much as the
                        # read itself for a small request (issue #13: -25% TLS glue per record).
                        blocked = True
                        break
            except ssl.SSLWantReadError:
                blocked = True
            except ssl.SSLZeroReturnError:
                eof = True
            except ssl.SSLError as e:
                self._lost_exc = ConnectionResetError(f"TLS error from the peer: {e.reason or e}")
                self.state = _CLOSED
                self._flush()
                self.raw.abort()  # type: ignore[union-attr]  # set in connection_made
                return
            if n:
                self.app.data_received(bytes(view[:n]))
            if eof:
                self._capture_session()
                if not self._got_close_notify:
                    self._got_close_notify = True
                    keep = self.app.eof_received()
                    if not keep:
                        self._app_transport.close()  # type: ignore[union-attr]  # set with the app
                    elif self._sent_close_notify:
                        self.raw.close()  # type: ignore[union-attr]  # set in connection_made
                return
            if blocked:
                break
        self._capture_session()
        self._flush()

    def _capture_session(self, last: bool = False) -> None:
        """Hand a resumable session to ``on_session`` once, if the contexts
        want one (each read of ``SSLObject.session`` costs a copy that older
        CPython never frees: see the module docstring).  ``last``: the
        connection is gone; ``on_session`` hears ``None`` if it had none (or
        gave up after ``_SESSION_READS`` reads without a ticket)."""
        if self._on_session is None or self._session_seen or self.server_side or self.sslobj is None:
            return
        if self._wants_session is not None and not self._wants_session(self):
            self._session_seen = True  # the cache is fresh, or another connection fetches
            return
        self._session_reads += 1
        if self._contexts is not None:
            self._contexts.counters["session_reads"] += 1
        try:
            sess = self.sslobj.session
        except (ValueError, AttributeError):
            sess = None
        if sess is not None and sess.has_ticket:
            self._session_seen = True
            self._on_session(self, sess)
        elif last or self._session_reads >= _SESSION_READS:  # no ticket (yet): let another connection try
            self._session_seen = True
            self._on_session(self, None)

    def _schedule_read(self) -> None:
        if not self._read_scheduled and self.state == _OPEN:
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._read)

    # ---- application data out

    def _flush(self) -> None:
        if self._out.pending and self.raw is not None and not self.raw.is_closing():
            self.raw.write(self._out.read())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != _OPEN or self._sent_close_notify or not data:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as e:
            self._write_failed(e)
            return
        self._flush()

    def writelines(self, bufs: list[bytes | memoryview]) -> None:
        """Encrypt ``bufs`` in order, then send once (or once per
        ``_FLUSH_AT`` of ciphertext): no joined copy of the plaintext.  Runs
        of small buffers (frame headers, control frames) are joined first,
        so they share a record instead of one each."""
        if self.state != _OPEN or self._sent_close_notify:
            return
        write = self.sslobj.write
        small: list[bytes | memoryview] = []
        try:
            for b in bufs:
                if len(b) < _SMALL_WRITE:
                    small.append(b)
                    continue
                if small:
                    write(b"".join(small))
                    small.clear()
                write(b)
                if self._out.pending >= _FLUSH_AT:
                    self._flush()
            if small:
                write(b"".join(small))
        except ssl.SSLError as e:
            self._write_failed(e)
            return
        self._flush()

    def _write_failed(self, e: ssl.SSLError) -> None:
        self._lost_exc = ConnectionResetError(f"TLS write failed: {e}")
        self.state = _CLOSED
        self.raw.abort()  # type: ignore[union-attr]  # set in connection_made

    def write_eof(self) -> None:
        """close_notify (TLS half-close), then FIN."""
        if self.state != _OPEN or self._sent_close_notify:
            return
        self._send_close_notify()
        if self._got_close_notify:
            self.raw.close()  # type: ignore[union-attr]  # set in connection_made
        elif self.raw.can_write_eof():  # type: ignore[union-attr]  # set in connection_made
            self.raw.write_eof()  # type: ignore[union-attr]  # set in connection_made

    def _send_close_notify(self) -> None:
        self._sent_close_notify = True
        # SSL_shutdown is called twice by unwrap(); the second call would read
        # (and refuse) application data still waiting in the incoming BIO, so
        # take it out and put it back afterwards.
        saved = self._in.read() if self._in.pending else b""
        try:
            self.sslobj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as e:
            log.debug("TLS close_notify: %s", e)
        finally:
            if saved:
                self._in.write(saved)
        self._flush()

    def close(self) -> None:
        if self.state == _OPEN and not self._sent_close_notify:
            self._send_close_notify()
        self.state = _CLOSED
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.state = _CLOSED
        if self.raw is not None:
            self.raw.abort()

    def pause_reading(self) -> None:
        self._app_paused = True
        if self.raw is not None and not self.raw.is_closing():
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._app_paused:
            return
        self._app_paused = False
        if self.raw is not None and not self.raw.is_closing():
            self.raw.resume_reading()
        self._schedule_read()


class _AppTransport(asyncio.Transport):
    """The plaintext side of a ``TlsConnection``, as the relay sees it."""

    def __init__(self, conn: TlsConnection) -> None:
        super().__init__()
        self._conn = conn
        self._closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        c = self._conn
        if name == "peer_identity":
            return c.peer_identity
        if name == "peer_node":
            return c.peer_node
        if name == "local_identity":
            return c.local_identity
        if name == "sni_named":
            return c.sni_named
        if name == "alpn":
            return c.alpn
        if name == "tls_resumed":
            return bool(c.sslobj and c.sslobj.session_reused)
        if name == "ssl_object":
            return c.sslobj
        if name == "tls_connection":
            return c
        return c.raw.get_extra_info(name, default) if c.raw is not None else default

    def is_closing(self) -> bool:
        c = self._conn
        return self._closed or c.raw is None or c.raw.is_closing()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.close()

    def abort(self) -> None:
        self._closed = True
        self._conn.abort()

    def write(self, data: Any) -> None:
        self._conn.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._conn.writelines(list(list_of_data))

    def write_eof(self) -> None:
        self._conn.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()

    def is_reading(self) -> bool:
        return not self._conn._app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._conn.raw is not None:
            self._conn.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        raw = self._conn.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._conn.raw
        return raw.get_write_buffer_limits() if raw is not None else (0, 0)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn.app = protocol  # type: ignore[assignment]  # asyncio's signature; ours is a Protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn.app
