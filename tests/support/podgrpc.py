"""A real gRPC server and client (grpcio, generic handlers: no code
generation) for pods in privileged tests.

Server: service ``meshlet.test.Echo`` with ``Unary`` (answers ``<name>:<payload>``),
``Stream`` (three messages), ``Admin`` (``admin:<payload>``); every call is
appended to ``--log`` as a JSON line. ``--fail`` makes Unary answer
UNAVAILABLE; ``--delay`` sleeps before answering.

    python -m tests.support.podgrpc serve --name web-1 --port 9000 --log /tmp/x.jsonl

Client: one channel (one HTTP/2 connection), a list of calls, one JSON line
per call on stdout: {"method", "ok", "code", "details", "reply"}.

    python -m tests.support.podgrpc call --target 10.96.0.20:90 Unary*100 Admin Stream
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent import futures

import grpc

SVC = "meshlet.test.Echo"


def serve(a: argparse.Namespace) -> None:
    lock = threading.Lock()
    log = open(a.log, "a", buffering=1)  # noqa: SIM115 - for the life of the process

    def put(method: str, ctx) -> None:
        with lock:
            log.write(json.dumps({"name": a.name, "method": method, "peer": ctx.peer()}) + "\n")

    def unary(req, ctx):
        put("Unary", ctx)
        if a.delay:
            time.sleep(a.delay)
        if a.fail:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{a.name} is unavailable")
        return a.name.encode() + b":" + req

    def stream(req, ctx):
        put("Stream", ctx)
        for i in range(3):
            yield b"%s:%d:" % (a.name.encode(), i) + req

    def admin(req, ctx):
        put("Admin", ctx)
        return b"admin:" + req

    handler = grpc.method_handlers_generic_handler(
        SVC,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Admin": grpc.unary_unary_rpc_method_handler(admin),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"0.0.0.0:{a.port}")
    srv.start()
    print("listening", flush=True)
    srv.wait_for_termination(a.max_seconds)
    srv.stop(None)


def call(a: argparse.Namespace) -> None:
    plan: list[str] = []
    for item in a.calls:
        name, _, n = item.partition("*")
        plan += [name] * int(n or 1)
    with grpc.insecure_channel(a.target) as ch:
        for i, method in enumerate(plan):
            rec: dict = {"method": method}
            try:
                if method == "Stream":
                    reply = [r.decode() for r in ch.unary_stream(f"/{SVC}/Stream")(b"%d" % i, timeout=a.timeout)]
                else:
                    reply = ch.unary_unary(f"/{SVC}/{method}")(b"%d" % i, timeout=a.timeout).decode()
                rec.update(ok=True, code="OK", reply=reply)
            except grpc.RpcError as e:
                rec.update(ok=False, code=e.code().name, details=e.details())
            print(json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--fail", action="store_true")
    s.add_argument("--delay", type=float, default=0.0)
    s.add_argument("--max-seconds", type=float, default=600)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("calls", nargs="+")
    a = ap.parse_args()
    if a.cmd == "serve":
        serve(a)
    else:
        call(a)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
