"""Run as ``python -m tests.transport.frames_probe [untuned]``: receive 2 MiB zmq frames over tcp loopback while
holding a credit window's worth (32), as a stream receiver does, in a process tuned as a daemon is; print one
JSON line with the page faults of a second pass and the RSS before and after ``release_free_memory``."""

from __future__ import annotations

import collections
import json
import resource
import sys
import threading

import zmq

from fedbus._memory import release_free_memory, tune_malloc

FRAME, FRAMES, HOLD = 2 << 20, 128, 32  # 256 MiB a pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    tuned = tune_malloc() if sys.argv[1:] != ["untuned"] else False
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.RCVHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    go = threading.Semaphore(0)

    def send() -> None:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        payload = bytearray(FRAME)
        for _ in range(2):
            go.acquire()
            for _ in range(FRAMES):
                dealer.send(payload, copy=False)
        dealer.close(linger=5000)

    sender = threading.Thread(target=send)
    sender.start()
    faults = []
    for _ in range(2):
        go.release()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held: collections.deque = collections.deque(maxlen=HOLD)
        for _ in range(FRAMES):
            held.append(router.recv_multipart(copy=False)[1])
        held.clear()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    sender.join()
    rss_held = _rss()
    release_free_memory()
    pages = FRAMES * FRAME // resource.getpagesize()
    print(json.dumps({"tuned": tuned, "faults": faults, "pages": pages, "rss_held": rss_held, "rss_trimmed": _rss()}))
    router.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
