"""Starting jobs and keeping them deployed: one ``JobController`` per running job.

A job waits (submitted, or resuming after a broker restart) until enough of its sites are online; then it is
launched: its strategy made (wrapped in cross-site evaluation when its spec asks), its model opened (the initial
one, or the latest checkpoint), its controller registered and started, and the job folder deployed to each of its
sites. A site that comes back gets the job deployed again and its tasks in flight sent again; a job that ends
lets its controller go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from fedbus.broker.controller import JobController
from fedbus.broker.job_streams import InFlight
from fedbus.broker.metrics import Metrics
from fedbus.broker.outbox import Outbox
from fedbus.broker.registry import Registry
from fedbus.broker.store import JobStore
from fedbus.broker.upload_slots import UploadSlots
from fedbus.config import BrokerConfig, is_safe_name
from fedbus.errors import ConfigError, FedbusError, PeerError, TransportError
from fedbus.he.context import load_broker_context
from fedbus.he.options import he_options
from fedbus.log import get_logger
from fedbus.modelio import serde
from fedbus.modelio.spool import open_params
from fedbus.protocol.messages import Deploy
from fedbus.strategy import Strategy, make_strategy
from fedbus.strategy.cross_site import CrossSiteEval
from fedbus.strategy.encrypted import make_encrypted

MiB = 1 << 20
SERVER_MODELS = "cross_site_models"
"""The job folder's directory of extra server-side models for cross-site evaluation: ``NAME.safetensors`` is
evaluated by every site as model ``NAME`` (pre-trained models, as FLARE's NumpyCrossSiteEvalRecipe gives)."""
log = get_logger("broker")


def waiting_for(job: Mapping[str, Any], online: Sequence[str]) -> str | None:
    """Why a waiting job cannot start with the sites ``online``, in an operator's words, or None when it can:
    "3 sites needed, 2 connected: hospital-a, hospital-b", or the sites a resumed job must have back."""
    spec = job["spec"]
    usable = [s for s in online if not spec["include"] or s in spec["include"]]
    if job["sites"]:  # a resumed job waits for its own sites
        missing = [s for s in job["sites"] if s not in usable]
        return f"its sites must be back: {', '.join(missing)} not connected" if missing else None
    need = spec["min_sites"]
    if len(usable) >= need:
        return None
    among = f" of {', '.join(spec['include'])}" if spec["include"] else ""
    connected = f": {', '.join(usable)}" if usable else ""
    return f"{need} site{'s' if need != 1 else ''}{among} needed, {len(usable)} connected{connected}"


class JobLauncher:
    """Launches jobs, deploys them and lets them go: the one writer of the running jobs' ``controllers``."""

    def __init__(
        self,
        config: BrokerConfig,
        store: JobStore,
        registry: Registry,
        *,
        outbox: Outbox,
        metrics: Metrics,
        controllers: dict[str, JobController],
        upload_slots: UploadSlots,
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
    ) -> None:
        self.config = config
        self.store = store
        self.registry = registry
        self.outbox = outbox
        self.metrics = metrics
        self.upload_slots = upload_slots
        self.spawn = spawn
        self.controllers = controllers  # this launcher adds and removes them; the broker's other parts read them

    def controller(self, job_id: str, site: str) -> JobController:
        """The controller of a job running on ``site`` (else the site is at fault: PeerError)."""
        c = self.controllers.get(job_id)
        if c is None or site not in c.sites:
            raise PeerError(site, f"job {job_id!r} is not running on this site")
        return c

    async def start_waiting_jobs(self) -> None:
        waiting = self.store.jobs(("waiting",))
        if not waiting:  # every hello calls this: with thousands of sites, listing them is the cost
            return
        online = self.registry.online()
        for job in waiting:
            if job["id"] in self.controllers or waiting_for(job, online) is not None:
                continue
            spec = job["spec"]
            usable = [s for s in online if not spec["include"] or s in spec["include"]]
            await self.launch(job["id"], spec, job["sites"] or usable[: spec["max_sites"] or None])
            online = self.registry.online()  # a launch awaits: sites may have come or gone meanwhile

    async def launch(self, job_id: str, spec: dict, sites: list[str]) -> None:
        max_model = int(self.config.max_model_mb * MiB)
        try:
            strategy = self._with_cross_site(job_id, spec, self._strategy(spec))
            latest = self.store.latest_version(job_id)
            if latest is None:
                version, path = 0, self.store.job_dir(job_id) / "files" / spec["model"]
            else:
                version, path = latest
            model = open_params(path, max_total=max_model)
        except (FedbusError, OSError) as exc:
            log.error("job cannot start", job=job_id, reason=str(exc))
            self.store.set_state(job_id, "failed", f"cannot start: {exc}")
            return
        c = JobController(
            job_id,
            spec,
            strategy,
            self.store,
            self.outbox,
            max_model_bytes=max_model,
            upload_slots=self.upload_slots,
            on_end=self._job_ended,
            keep_versions=self.config.keep_versions,
            metrics=self.metrics,
        )
        self.controllers[job_id] = c
        self.store.set_sites(job_id, sites)
        self.store.set_state(job_id, "running")
        for name in sites:
            self.registry.sites[name].jobs.add(job_id)
        await self.deploy(job_id, sites)
        try:
            c.start(model, sites, version)
        finally:
            model.release()
        if latest is None:
            path = await asyncio.to_thread(self.store.write_checkpoint, job_id, 0, c.strategy.model)
            self.store.add_version(job_id, 0, path, {})

    def _strategy(self, spec: dict) -> Strategy:
        """The job's strategy; for a job with homomorphic encryption its encrypted variant, given the broker's
        keyless context (``he_context``; ConfigError when missing, or when a secret key is in reach)."""
        he = he_options(spec.get("extra") or {})
        if he is None:
            return make_strategy(spec["strategy"], **spec["strategy_args"])
        if self.config.he_context is None:
            raise ConfigError("the job asks for homomorphic encryption but this broker has no he_context")
        context = load_broker_context(self.config.he_context)
        return make_encrypted(spec["strategy"], spec["strategy_args"], context=context, options=he)

    def _with_cross_site(self, job_id: str, spec: dict, strategy: Strategy) -> Strategy:
        """The job's strategy, wrapped in cross-site evaluation when its spec asks (``[cross_site_eval]``), with
        the job folder's server models (``SERVER_MODELS``) given to it; a standalone ``cross_site_eval``
        strategy gets them too. Read on the loop, as ``launch`` must not await before the job's controller is
        registered (a second launch of the same job could start meanwhile): these are small evaluation models."""
        if not spec.get("cross_site_eval") and not isinstance(strategy, CrossSiteEval):
            return strategy
        folder = self.store.job_dir(job_id) / "files" / SERVER_MODELS
        models = {}
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
            if not is_safe_name(path.stem):
                raise ConfigError(f"{SERVER_MODELS}/{path.name}: a server model's name must be a safe name")
            models[path.stem] = serde.read_file(path, max_total=int(self.config.max_model_mb * MiB))
        if not isinstance(strategy, CrossSiteEval):
            strategy = CrossSiteEval(strategy, timeout=getattr(strategy, "round_timeout", None))
        strategy.add_server_models(models)
        return strategy

    async def deploy(self, job_id: str, sites: list[str]) -> None:
        """Send the job folder to ``sites`` (those connected): each runs the job's script."""
        job = self.store.job(job_id)
        assert job is not None
        spec, all_sites = job["spec"], job["sites"]
        archive = (self.store.job_dir(job_id) / "job.zip").read_bytes()
        c = self.controllers.get(job_id)
        position = {site: i for i, site in enumerate(all_sites)}  # not all_sites.index: thousands of sites
        for name in sites:
            peer = self.registry.peer_of(name)
            if peer is None:
                continue
            config = {
                "name": spec["name"],
                "site_index": position[name],
                "num_sites": len(all_sites),
                "strategy": spec["strategy"],
                "params_type": c.params_type if c else "FULL",
                "task_timeout_s": spec.get("task_timeout_s"),
            }
            msg = Deploy(job_id=job_id, script=spec["script"], args=list(spec["script_args"]), config=config)
            try:
                await self.outbox.send(peer, msg, [archive])
            except TransportError:
                continue
            self.outbox.guard.audit.record("job_deployed", job=job_id, site=name, size=len(archive))

    async def site_arrived(self, peer: bytes, name: str, arrival: str, holds: frozenset[str]) -> None:
        """A site said hello (``arrival`` as the registry judged it): its running jobs are deployed to it again,
        with their tasks in flight there, and waiting jobs may start now."""
        hub = self.outbox.hub
        assert hub is not None
        its_jobs = [c for c in self.controllers.values() if name in c.sites] if arrival != "same" else []
        again: dict[str, list[InFlight]] = {}
        if arrival == "restarted":
            # The old process's downloads died with it. Their tasks get new downloads first, with no await in
            # between, so that the aborted ones' failures are ignored; they go out after the deploy.
            again = {c.job_id: c.site_restarted(name, holds) for c in its_jobs}
            hub.abort_peer(peer, "the site restarted", incoming=False)
        else:  # a model whose offer found the site reconnecting is offered again
            await hub.reoffer_all(peer)
        for c in its_jobs:
            await self.deploy(c.job_id, [name])
            c.send_again(again.get(c.job_id, []))
            c.site_joined(name)
        await self.start_waiting_jobs()

    def site_left(self, name: str, why: str) -> None:
        for c in list(self.controllers.values()):
            c.site_left(name, why)

    def _job_ended(self, job_id: str) -> None:
        c = self.controllers.pop(job_id, None)
        if c is not None:
            for name in c.sites:
                rec = self.registry.sites.get(name)
                if rec is not None:
                    rec.jobs.discard(job_id)
            self.spawn(c.close())

    async def close(self) -> None:
        for c in list(self.controllers.values()):
            await c.close()
