"""What crosses the loopback interface: a model's bytes never appear in plaintext with CURVE on.

Where it is captured: a TCP relay between the peer and the broker that records every byte it forwards
(real wire traffic, without needing root for a packet capture); when this process may open an AF_PACKET
socket (root or CAP_NET_RAW) the loopback interface itself is captured too. The same transfer without
CURVE is the control: there the pattern must be found, or the capture proves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path

import pytest
import torch

from fedbus.admin import Admin
from fedbus.broker import Broker
from fedbus.config import BrokerConfig
from tests.security.helpers import Relay, keys, make_kits, patterned_model, secure_broker, write_job

pytestmark = pytest.mark.timeout(90)
ETH_P_ALL = 0x0003


class LoopbackCapture:
    """Every frame on ``lo`` while active (AF_PACKET; needs root or CAP_NET_RAW), in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
        self.frames = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.frames += self.sock.recv(1 << 17)

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return bytes(self.frames)


def _capture() -> LoopbackCapture | None:
    try:
        return LoopbackCapture()
    except (PermissionError, OSError, AttributeError):
        return None


async def _upload_through_relay(broker_address: str, job: Path, **admin_kw: object) -> tuple[bytes, bytes | None]:
    cap = _capture()
    try:
        async with Relay(broker_address) as relay:
            async with Admin(relay.address, timeout=10.0, **admin_kw) as admin:  # type: ignore[arg-type]
                job_id = await admin.submit(job)
                assert job_id
            await asyncio.sleep(0.2)
            return bytes(relay.captured), None if cap is None else cap.stop()
    finally:
        if cap is not None and not cap._stop.is_set():
            cap.stop()


def _needles(model: dict[str, torch.Tensor], count: int = 3, size: int = 64) -> list[bytes]:
    """``count`` windows of ``size`` bytes spread over the tensor's bytes (random floats: no false hits)."""
    raw = model["w"].numpy().tobytes()
    step = (len(raw) - size) // (count - 1)
    return [raw[i * step : i * step + size] for i in range(count)]


def _found_on_lo(frames: bytes, model: dict[str, torch.Tensor]) -> float:
    """The share of 32-byte windows found in captured frames (a window may straddle two TCP segments, and
    a busy machine may drop frames: the control asks for most, the secure run for none)."""
    needles = _needles(model, count=64, size=32)
    return sum(n in frames for n in needles) / len(needles)


async def test_model_bytes_cross_the_wire_only_encrypted(tmp_path: Path) -> None:
    model = patterned_model()
    job = write_job(tmp_path / "job", model)
    # control: without CURVE the capture does see the model's bytes
    plain = BrokerConfig(bind="tcp://127.0.0.1:0", workspace=str(tmp_path / "plain"), heartbeat_s=0.2)
    async with Broker(plain) as broker:
        relayed, lo = await _upload_through_relay(broker.address, job)
    assert all(n in relayed for n in _needles(model))
    if lo is not None:
        assert _found_on_lo(lo, model) > 0.5

    kits = make_kits(tmp_path)
    async with secure_broker(tmp_path, kits) as broker:
        relayed, lo = await _upload_through_relay(broker.address, job, keys=keys(kits, "ops"))
        stored = (tmp_path / "broker" / "jobs").glob("*/files/model.safetensors")
        assert [p.read_bytes().count(_needles(model)[1]) for p in stored] == [1]  # it did arrive, decrypted
    assert len(relayed) > model["w"].numel() * 4  # the whole model went through the relay
    assert not any(n in relayed for n in _needles(model))
    if lo is not None:
        assert _found_on_lo(lo, model) == 0
