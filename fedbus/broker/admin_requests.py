"""The broker's side of the admin commands: submit, status, sites, abort and download.

An admin says hello first (its name: the participant name its CURVE key maps to, or the one it claims), then
sends ``request`` messages; each gets one ``reply``. A refusal (a malformed request, an unknown job, a file the
broker cannot read) is audited and answered with ``ok=False`` and the reason; the admin's connection goes on. What
an admin is told about (a job submitted, aborted, downloaded) is in the audit trail before the reply goes. A
reply too big for an envelope travels as one msgpack payload frame (``reply_message``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import msgpack

from fedbus import jobs
from fedbus.broker.controller import JobController
from fedbus.broker.guard import Guard
from fedbus.broker.launcher import waiting_for
from fedbus.broker.outbox import Outbox
from fedbus.broker.registry import Registry
from fedbus.broker.store import ACTIVE_STATES, JobStore
from fedbus.broker.tracking import BEST_MODEL, best_version, key_metric_of
from fedbus.broker.uploads import Uploads
from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError, FedbusError, PeerError
from fedbus.log import get_logger
from fedbus.modelio import serde
from fedbus.modelio.sources import ModelSource
from fedbus.protocol.messages import Reply, Request

MiB = 1 << 20
REPLY_INLINE_MAX = 64 * 1024
log = get_logger("broker")


class AdminRequests:
    """Answers the admins' requests; knows each admin peer's name."""

    def __init__(
        self,
        config: BrokerConfig,
        store: JobStore,
        registry: Registry,
        *,
        guard: Guard,
        outbox: Outbox,
        controllers: Mapping[str, JobController],
        uploads: Uploads,
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        on_submitted: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.guard = guard
        self.outbox = outbox
        self.controllers = controllers
        self.uploads = uploads
        self.spawn = spawn
        self.on_submitted = on_submitted
        self.names: dict[bytes, str] = {}  # admin peer -> participant name (CURVE) or claimed name

    def welcome(self, peer: bytes, name: str) -> None:
        """An admin said hello: its requests are served from now on."""
        self.registry.admins.add(peer)
        self.names[peer] = name

    def forget(self, names: list[str]) -> None:
        """Keys revoked: the admins of those names are served no more (until they say hello again)."""
        for peer, who in list(self.names.items()):
            if who in names:
                self.registry.admins.discard(peer)
                del self.names[peer]

    async def request(self, peer: bytes, req: Request, payload: list[memoryview], user: str = "") -> None:
        by = self.names.get(peer, user)
        try:
            data = await self._op(peer, req, payload)
        except (FedbusError, OSError) as exc:
            log.warning("request refused", op=req.op, reason=str(exc))
            self.guard.refused(str(exc), peer=peer, user=by, type=f"request:{req.op[:32]}")
            self.guard.audit.flush()
            await self.outbox.send(peer, Reply(rid=req.rid, ok=False, error=str(exc)[:2000]))
            return
        kind = {"submit": "job_submitted", "abort": "job_aborted", "download": "job_downloaded"}.get(req.op)
        if kind is not None:
            self.guard.audit.record(kind, job=data.get("job_id"), by=by, key=self.guard.key_of(user))
        self.guard.audit.flush()  # what the admin is told about (a revocation, a job) is in the trail first
        await self.outbox.send(peer, *reply_message(req.rid, data))
        if req.op == "download":
            self.spawn(self._send_download(peer, data))
        elif req.op == "submit":
            await self.on_submitted()

    async def _op(self, peer: bytes, req: Request, payload: list[memoryview]) -> dict[str, Any]:
        who = self.names.get(peer, peer.hex())
        if req.op == "submit":
            if len(payload) != 1:
                raise PeerError(who, "submit needs exactly one payload frame: the job folder as a zip")
            return self._submit(peer, bytes(payload[0]), req.args.get("model_bytes"))
        if req.op == "status":
            return self._status(req.args.get("job_id"))
        if req.op == "sites":
            return {"sites": [r.summary() for r in self.registry.sites.values()]}
        job_id = req.args.get("job_id")
        job = self.store.job(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise ConfigError(f"no such job: {job_id!r}")
        if req.op == "abort":
            c = self.controllers.get(job["id"])
            if c is not None:
                c.abort("aborted by an admin")
            elif job["state"] in ACTIVE_STATES:
                self.store.set_state(job["id"], "aborted", "aborted by an admin")
            return {"job_id": job["id"]}
        if req.op == "download":
            latest = self.store.latest_version(job["id"])
            return {
                "job_id": job["id"],
                "state": job["state"],
                "version": latest[0] if latest else None,
                "history": self.store.history(job["id"]),
                "evaluations": self.store.events(job["id"], "evaluation"),
                "cross_site": self.store.cross_site(job["id"]),
                "updates": self.store.updates(job["id"]),
                **self._best_model(job),
            }
        raise PeerError(who, f"unknown request op {req.op[:32]!r}")

    def _best_model(self, job: dict[str, Any]) -> dict[str, Any]:
        """The download's ``best_*`` fields, with ``[tracking] key_metric``: the best version and its file."""
        key = key_metric_of(job["spec"])
        best = best_version(self.store.history(job["id"]), key) if key else None
        if best is None:
            return {}
        # best_model.safetensors is written by the job's tracking thread just after the version is published; until
        # then (or if it failed), the version's own checkpoint is the same model.
        candidates = (self.store.job_dir(job["id"]) / BEST_MODEL, self.store.checkpoint_path(job["id"], best[0]))
        where = next((str(p) for p in candidates if p.exists()), None)
        return {"best_version": best[0], "best_metric": best[1], "best_model_path": where}

    def _submit(self, peer: bytes, archive: bytes, model_bytes: Any) -> dict[str, Any]:
        """Accept a job folder (without its model); the submitter streams the model next."""
        max_model = int(self.config.max_model_mb * MiB)
        if type(model_bytes) is not int or not 0 < model_bytes <= max_model:
            who = self.names.get(peer, peer.hex())
            raise PeerError(who, f"submit: model_bytes must be an int in (0, {max_model}], got {model_bytes!r}")
        job_id = self.store.new_job_id("job")
        folder = self.store.job_dir(job_id)
        try:  # a refused job leaves no folder behind, and no row: the row is written last
            spec = jobs.unpack_job(archive, folder / "files", require_model=False)
            job_id = f"{spec.name}-{job_id.removeprefix('job-')}"
            folder = folder.rename(self.store.job_dir(job_id))
            (folder / "job.zip").write_bytes(archive)
            self.store.create_job(job_id, spec.name, dataclasses.asdict(spec), state="uploading")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.uploads.expect_model(job_id, peer, model_bytes)
        log.info("job submitted", job=job_id, name=spec.name, strategy=spec.strategy)
        return {"job_id": job_id}

    def _status(self, job_id: Any) -> dict[str, Any]:
        out = []
        for job in self.store.jobs():
            if job_id is not None and job["id"] != job_id:
                continue
            entry = {k: job[k] for k in ("id", "name", "state", "version", "reason", "sites", "created")}
            c = self.controllers.get(job["id"])
            if c is not None:
                entry["live"] = c.status()
            elif job["state"] == "waiting":
                entry["waiting_for"] = waiting_for(job, self.registry.online())
            history = self.store.history(job["id"])
            entry["last_metrics"] = history[-1]["metrics"] if history else {}
            times = [h["time"] for h in history[-6:]]
            entry["seconds_per_version"] = [round(b - a, 3) for a, b in itertools.pairwise(times)]
            out.append(entry)
        if job_id is not None and not out:
            raise ConfigError(f"no such job: {job_id!r}")
        return {"jobs": out, "sites": [r.summary() for r in self.registry.sites.values()]}

    async def _send_download(self, peer: bytes, data: dict[str, Any]) -> None:
        if data["version"] is None:
            return
        path = self.store.checkpoint_path(data["job_id"], data["version"])
        try:
            model = await asyncio.to_thread(serde.read_file, path)
            route = {"job_id": data["job_id"], "kind": "download", "version": data["version"]}
            sid = int.from_bytes(os.urandom(7), "big")
            await self.outbox.stream(peer, ModelSource.from_state_dict(model), route, sid)
        except (FedbusError, OSError) as exc:
            log.warning("download failed", job=data["job_id"], reason=str(exc))


def reply_message(rid: int, data: dict[str, Any]) -> tuple[Reply, list[bytes]]:
    """A reply whose data may outgrow an envelope (a long job's history, every update record): big data
    travels as one msgpack payload frame instead, flagged by ``data == {"payload": "msgpack"}``."""
    packed = msgpack.packb(data, use_bin_type=True)
    if len(packed) <= REPLY_INLINE_MAX:
        return Reply(rid=rid, ok=True, data=data), []
    return Reply(rid=rid, ok=True, data={"payload": "msgpack"}), [packed]
