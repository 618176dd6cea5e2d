"""A job's secure-aggregation rounds at a site: one ``SecAggClient`` per training round, driven by the broker.

A training task whose options carry ``secure_aggregation`` opens the round (``round_of(task)``: the version
it trains from, plus one, as the broker's strategy numbers it): the site makes
the round's keys and advertises them at once, while the script trains. The broker's roster, forwarded shares
and unmask request arrive as messages (``on_message``); each is answered through ``send``. The upload of the
task's result waits until the shares are in (``ready``), then the masking filter (``fedbus.site.filters.
SecAggMask``) turns the update into one masked vector. The secrets live in this process only; a site that
restarts mid-round has lost them and counts as dropped from that round.

Everything the broker sends is checked by the client state machine; what breaks the protocol raises
``RemoteProtocolError`` (the daemon answers the broker with an error) and the round goes on without this
site's input.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fedbus.errors import ConfigError, RemoteProtocolError
from fedbus.protocol.messages import Message, SecAggRoster, SecAggShares, SecAggUnmask, Task

if TYPE_CHECKING:
    from fedbus.secagg.protocol import SecAggClient

KEPT_ROUNDS = 2
"""Rounds whose secrets a site keeps: the one in progress and the one before (its unmasking may still come)."""

OPTION = "secure_aggregation"


class SiteSecAgg:
    """The secure-aggregation rounds of one job at one site."""

    def __init__(self, site: str, job_id: str, send: Callable[[Message], Awaitable[None]], log: Any) -> None:
        self.site, self.job_id, self.send, self.log = site, job_id, send, log
        self._rounds: dict[int, tuple[SecAggClient, asyncio.Event]] = {}

    @staticmethod
    def round_of(task: Task) -> int:
        """The secure-aggregation round a training task belongs to: FedAvg's round, from 1."""
        return task.version + 1

    @staticmethod
    def wanted(task: Task) -> bool:
        """Does this task's result go through secure aggregation?"""
        return task.kind == "train" and isinstance(task.options, dict) and task.options.get(OPTION) is not None

    async def on_task(self, task: Task) -> None:
        """Open the task's round and advertise its keys; ConfigError when the settings are unusable."""
        from fedbus.secagg.config import SecAggConfig  # here: only jobs that ask for it need cryptography
        from fedbus.secagg.protocol import SecAggClient

        config = SecAggConfig.parse(task.options[OPTION], "task option secure_aggregation")
        r = self.round_of(task)
        if r in self._rounds:  # the round's task again (a restarted broker, a site back): fresh keys, old ones gone
            self.log.info("secure aggregation round opened again: new keys", round=r)
            del self._rounds[r]
        client = SecAggClient(self.site, config, r, self.job_id)
        self._rounds[r] = (client, asyncio.Event())
        for old in sorted(self._rounds)[:-KEPT_ROUNDS]:
            del self._rounds[old]
        await self.send(client.advert())
        self.log.info("secure aggregation keys advertised", round=r, threshold=config.threshold)

    async def on_message(self, msg: SecAggRoster | SecAggShares | SecAggUnmask) -> None:
        entry = self._rounds.get(msg.round)
        if entry is None:
            raise RemoteProtocolError(f"no secure aggregation round {msg.round} at this site")
        client, ready = entry
        if isinstance(msg, SecAggRoster):
            await self.send(client.on_roster(msg))
        elif isinstance(msg, SecAggShares):
            client.on_shares(msg)
            ready.set()
            self.log.info("secure aggregation shares in", round=msg.round, holders=len(client.holders or ()))
        else:
            await self.send(client.on_unmask(msg))
            self.log.info("secure aggregation shares revealed", round=msg.round, survivors=len(msg.survivors))

    async def ready(self, task: Task) -> SecAggClient:
        """The task's round once its shares are in (the input can be masked); waits as long as the job runs."""
        entry = self._rounds.get(self.round_of(task))
        if entry is None:
            raise ConfigError(f"task {task.task_id}: its secure aggregation round is not open here")
        await entry[1].wait()
        return entry[0]
