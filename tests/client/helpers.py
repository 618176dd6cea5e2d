"""A fake site for client tests: the site's end of the local link (a ROUTER on ipc), driven by the test.

The client API is synchronous, so tests run its calls in a worker thread (``asyncio.to_thread``) while the
fake site answers in the event loop, exactly as a real site daemon would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
import zmq.asyncio

from fedbus.client import ClientSession
from fedbus.modelio import serde
from fedbus.protocol.messages import Hello, Message, Task, Welcome
from fedbus.transport.endpoint import Incoming, RouterEndpoint

TOKEN = "t0ken"
JOB = "job-1"
WAIT = 10.0


class FakeSite:
    """Binds the link, checks the script's hello, pushes tasks and reads what the script sends."""

    def __init__(self, ctx: zmq.asyncio.Context, folder: Path) -> None:
        self.folder = folder
        self.address = f"ipc://{folder}/link.sock"
        self.ep = RouterEndpoint.bind(ctx, self.address)
        self.peer: bytes | None = None

    def session(self, **kwargs: object) -> ClientSession:
        opts: dict = {"link": self.address, "token": TOKEN, "job_id": JOB, "site_name": "site-a"}
        opts.update(site_index=1, num_sites=3, workspace=self.folder / "job", link_timeout=2.0)
        opts.update(kwargs)
        return ClientSession(**opts)

    async def recv(self, timeout: float = WAIT) -> Incoming:
        return await asyncio.wait_for(self.ep.recv(), timeout)

    async def accept(self) -> Hello:
        inc = await self.recv()
        assert isinstance(inc.msg, Hello), inc.msg
        assert inc.msg.session == TOKEN and inc.msg.role == "client"
        self.peer = inc.peer
        await self.send(Welcome(session=JOB, heartbeat_s=0.0, liveness=0))
        return inc.msg

    async def send(self, msg: Message) -> None:
        assert self.peer is not None
        await self.ep.send(self.peer, msg)

    def model_file(self, task_id: str, params: dict[str, torch.Tensor]) -> Path:
        path = self.folder / "inbox" / f"{task_id}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        serde.write_file(path, params)
        return path

    async def push_task(
        self,
        task_id: str,
        params: dict[str, torch.Tensor] | None,
        *,
        kind: str = "train",
        options: dict | None = None,
        take: bool = False,
        params_type: str | None = None,
        **meta: object,
    ) -> Task:
        """What the site hands its script: ``params`` in an inbox file (``take``: the script may take it); any other
        keyword goes into the task's ``meta``."""
        task = Task(
            JOB,
            task_id,
            kind,
            version=4,
            round=4,
            total_rounds=10,
            sid=None,
            meta=dict(meta),
            options=options or {},
            params_type=params_type,
            path=str(self.model_file(task_id, params)) if params is not None else None,
            take=take,
        )
        await self.send(task)
        return task

    def close(self) -> None:
        self.ep.close()


def sample_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(4, 3, generator=g),
        "fc.bias": torch.randn(4, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }
