"""Raw ZeroMQ, without fedbus's protocol: the ceiling ``fedbus bench transfer`` compares its streams against,
and a raw peer for the fuzzer (``raw_dealer``).

Frames of ``RAW_FRAME`` bytes, ``copy=False``, a credit window of frames, the receiver discarding them: what the
bus itself can carry. ``--curve`` runs both sides as CURVE server and client (keys from ``CURVE_ENV``, no ZAP).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from fedbus.transport.endpoint import LANE_STAGGER

RAW_FRAME = 4 << 20
CURVE_ENV = "FEDBUS_BENCH_CURVE"
"""``--curve``: "SERVER_PUBLIC,SERVER_SECRET" (z85, which has no comma), inherited by the receiver child."""


def curve_from_env(sock: zmq.Socket, *, server: bool) -> None:
    """Make ``sock`` a CURVE server or client when the benchmark runs with ``--curve`` (no ZAP: any client key)."""
    keys = os.environ.get(CURVE_ENV)
    if not keys:
        return
    public, secret = (k.encode() for k in keys.split(","))
    if server:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    else:
        client_public, client_secret = zmq.curve_keypair()
        sock.setsockopt(zmq.CURVE_SERVERKEY, public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client_secret)


def raw_receive(sock: zmq.Socket, total: int) -> None:
    """Discard ``total`` bytes of frames, granting one frame of credit back per frame consumed (to the connection
    that sent it), then tell every connection that it is done."""
    got = 0
    peers: set[bytes] = set()
    while got < total:
        peer, frame = sock.recv_multipart(copy=False)
        got += len(frame)
        peers.add(peer.bytes)
        sock.send_multipart([peer.bytes, b"c"])
    for peer_id in peers:
        sock.send_multipart([peer_id, b"done"])


def raw_receiver(address: str, total: int, lanes: int, *, announce: Callable[[str], object]) -> None:
    """Bind a ROUTER at ``address`` (``announce`` is told the bound address), discard ``total`` bytes, close."""
    ctx = zmq.Context(io_threads=lanes)
    raw = ctx.socket(zmq.ROUTER)
    curve_from_env(raw, server=True)
    raw.bind(address)
    announce(raw.getsockopt_string(zmq.LAST_ENDPOINT))
    raw_receive(raw, total)
    raw.close(linger=500)
    ctx.term()


def raw_send(address: str, total: int, window: int, *, spread: bool = False, lanes: int = 1) -> float:
    """Send ``total`` bytes over ``lanes`` connections, frames in turn, each connection with its share of the
    window as credit; seconds until every connection heard that all arrived."""
    ctx = zmq.Context(io_threads=lanes)
    socks = [ctx.socket(zmq.DEALER) for _ in range(lanes)]
    for lane, sock in enumerate(socks):  # as fedbus's lanes: a thread each, connected apart (LANE_STAGGER)
        curve_from_env(sock, server=False)
        sock.setsockopt(zmq.AFFINITY, 1 << lane)
        sock.connect(address)
        if lanes > 1:
            time.sleep(LANE_STAGGER)
    buf = memoryview(bytearray(os.urandom(1024)) * ((total if spread else RAW_FRAME) // 1024 + 1))
    credit = [max(1, window // RAW_FRAME // lanes)] * lanes
    start = time.perf_counter()
    sent = turn = 0
    while sent < total:
        turn = (turn + 1) % lanes
        while credit[turn] == 0:
            socks[turn].recv()
            credit[turn] += 1
        n = min(RAW_FRAME, total - sent)
        socks[turn].send(buf[sent : sent + n] if spread else buf[:n], copy=False)
        sent += n
        credit[turn] -= 1
    for sock in socks:
        while sock.recv() != b"done":
            pass
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close(linger=0)
    ctx.term()
    return elapsed


def raw_dealer(ctx: zmq.asyncio.Context, address: str, routing_id: bytes) -> zmq.asyncio.Socket:
    """An asyncio DEALER connected to ``address`` as ``routing_id``, sending whatever frames it is given: a peer
    that bypasses the envelope codec (``fedbus bench fuzz`` plays a hostile one with it). Its queue to the
    peer holds 100,000 messages, and closing it drops what is still queued."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(address)
    return sock
