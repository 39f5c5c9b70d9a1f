"""A loopback HTTP proxy in front of an S3-compatible server that fails a seeded share of requests, the way
object stores do: 503 SlowDown, 500 InternalError, a connection reset after the server acted, or a slow
answer. `--deny` answers every request 403 AccessDenied instead; `--drop-conditions` forwards writes without
their If-None-Match / If-Match headers, the way a store that ignores conditional writes behaves.

    python tests/flaky_store.py --upstream http://127.0.0.1:5000 --port 5001 --share 0.1 --seed 0

GET /_flaky/counts (answered by the proxy itself) returns what it did so far as JSON: requests, each fault,
and `retries`, the requests whose `amz-sdk-request` header says they are a client's second or later attempt."""

import argparse
import asyncio
import random
import socket
import struct
from collections import Counter

import aiohttp
from aiohttp import web

FAULTS = ("slowdown", "internal", "reset", "slow")
SLOW_SECONDS = 0.2
CONDITIONS = {"if-none-match", "if-match"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect", "host"}


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml")


def _reset(request: web.Request) -> None:
    """Close the client's connection with a TCP reset (linger 0), no answer sent."""
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


def make_app(upstream: str, share: float, seed: int, deny: bool, drop_conditions: bool = False) -> web.Application:
    rng = random.Random(seed)
    counts = Counter()
    session: dict[str, aiohttp.ClientSession] = {}

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        dropped = HOP_BY_HOP | (CONDITIONS if drop_conditions else set())
        headers = {k: v for k, v in request.headers.items() if k.lower() not in dropped}
        headers["Host"] = request.host  # the client signed for the proxy's address
        async with session["upstream"].request(request.method, upstream + request.raw_path, headers=headers,
                                               data=body) as answer:
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP - {"content-length"}}
        if request.method == "HEAD":  # keep the object's length, with no body
            return web.Response(status=answer.status, headers=out)
        out.pop("Content-Length", None)
        return web.Response(status=answer.status, headers=out, body=payload)

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/_flaky/counts":
            return web.json_response(dict(counts))
        counts["requests"] += 1
        attempt = dict(p.strip().split("=", 1) for p in request.headers.get("amz-sdk-request", "").split(";")
                       if "=" in p).get("attempt", "1")
        if int(attempt) > 1:
            counts["retries"] += 1
        if deny:
            counts["denied"] += 1
            return _s3_error(403, "AccessDenied", "Access Denied")
        fault = rng.choice(FAULTS) if rng.random() < share else None
        if fault:
            counts[fault] += 1
        if fault == "slowdown":
            await request.read()
            return _s3_error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "internal":
            await request.read()
            return _s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        answer = await forward(request)
        if fault == "reset":  # the server acted; the client never hears of it
            _reset(request)
        return answer

    async def start(app):
        session["upstream"] = aiohttp.ClientSession(auto_decompress=False)

    async def stop(app):
        await session["upstream"].close()

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--share", type=float, default=0.1, help="share of requests that meet a fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deny", action="store_true", help="answer every request 403 AccessDenied")
    parser.add_argument("--drop-conditions", action="store_true", help="forward without If-None-Match / If-Match")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream.rstrip("/"), args.share, args.seed, args.deny, args.drop_conditions),
                host="127.0.0.1",
                port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
