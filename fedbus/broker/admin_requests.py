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
import re
import shutil
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
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
SUBMIT_KEY = re.compile(r"[0-9a-f]{8}")
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
        await self.store.synced()  # and what it is told from the store (a new job, a version) is on disk
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
            return await self._submit(peer, bytes(payload[0]), req.args.get("model_bytes"), req.args.get("submit_key"))
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

    async def _submit(self, peer: bytes, archive: bytes, model_bytes: Any, key: Any = None) -> dict[str, Any]:
        """Accept a job folder (without its model); the submitter streams the model next. ``key``: the submit's
        ``submit_key``, which names the job, so that the same submit sent again gets the same job (``resubmit``)."""
        max_model = int(self.config.max_model_mb * MiB)
        who = self.names.get(peer, peer.hex())
        if type(model_bytes) is not int or not 0 < model_bytes <= max_model:
            raise PeerError(who, f"submit: model_bytes must be an int in (0, {max_model}], got {model_bytes!r}")
        if key is not None and not (isinstance(key, str) and SUBMIT_KEY.fullmatch(key)):
            raise PeerError(who, f"submit: submit_key must be 8 lowercase hex digits, got {str(key)[:40]!r}")
        job_id = self.store.new_job_id("job")
        folder = self.store.job_dir(job_id)
        try:  # a refused job leaves no folder behind, and no row: the row is written last
            spec = jobs.unpack_job(archive, folder / "files", require_model=False)
            job_id_final = f"{spec.name}-{key or job_id.removeprefix('job-')}"
            if key is not None:
                again = resubmit(self.store, self.uploads, peer, folder, job_id_final, archive, model_bytes)
                if again is not None:
                    return again
            folder = folder.rename(self.store.job_dir(job_id_final))
            job_id = job_id_final
            (folder / "job.zip").write_bytes(archive)
            await asyncio.to_thread(self.store.sync_files, folder)  # durable before the reply
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
                if entry["live"]["state"] == "paused":  # a storage fault holds it up (fedbus.broker.faults)
                    entry["state"], entry["reason"] = "paused", entry["live"]["reason"]
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


def resubmit(
    store: JobStore, uploads: Uploads, peer: bytes, unpacked: Path, job_id: str, archive: bytes, model_bytes: int
) -> dict[str, Any] | None:
    """A submit whose key names a job this workspace has (the admin sent it again: the broker restarted, or the
    reply was lost): that job, never a second one. Its model comes again when the first upload did not complete;
    ``model: received`` tells the admin it is in. None when the key's job is new (a leftover folder of a submit
    cut off before it was recorded is removed). The ``unpacked`` folder of this submit is removed when not used."""
    job = store.job(job_id)
    if job is None:
        shutil.rmtree(store.job_dir(job_id), ignore_errors=True)
        return None
    shutil.rmtree(unpacked, ignore_errors=True)
    if (store.job_dir(job_id) / "job.zip").read_bytes() != archive:
        raise ConfigError(f"submit_key of job {job_id} sent again with another job folder")
    lost_upload = job["state"] == "failed" and job["reason"].startswith("the initial model upload")
    if job["state"] != "uploading" and not lost_upload:
        log.info("submit repeated: the job is there", job=job_id, state=job["state"])
        return {"job_id": job_id, "model": "received"}
    if lost_upload:
        store.set_state(job_id, "uploading", "")
    uploads.expect_model(job_id, peer, model_bytes)
    log.info("submit repeated: its model comes again", job=job_id)
    return {"job_id": job_id}


def reply_message(rid: int, data: dict[str, Any]) -> tuple[Reply, list[bytes]]:
    """A reply whose data may outgrow an envelope (a long job's history, every update record): big data
    travels as one msgpack payload frame instead, flagged by ``data == {"payload": "msgpack"}``."""
    packed = msgpack.packb(data, use_bin_type=True)
    if len(packed) <= REPLY_INLINE_MAX:
        return Reply(rid=rid, ok=True, data=data), []
    return Reply(rid=rid, ok=True, data={"payload": "msgpack"}), [packed]
