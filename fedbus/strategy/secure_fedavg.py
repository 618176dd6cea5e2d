"""FedAvg with secure aggregation: the broker sums masked updates and learns only the round's mean.

Theory of operation
-------------------
The FedAvg barrier (``fedbus.strategy.fedavg``) with one secure-aggregation round (``fedbus.secagg.protocol``:
``SecAggServer``) riding on each training round:

* A round dispatches its tasks as FedAvg does; every task's options carry ``secure_aggregation`` (the job's
  settings), so each site advertises keys for the round (``task.round``) as its task arrives. The strategy
  relays the protocol's messages (:class:`Relay` actions) as its events come (:meth:`on_message`): the
  roster once every dispatched site has advertised or is gone, the shares once every roster site has shared
  or is gone. A round needs ``threshold`` sites at every step; below it, the job fails naming the step, and no
  sum is revealed.
* A training result carries one tensor, ``secagg``: the site's masked input (``input_spec``: one ring word,
  int32 or int64 on the wire, per floating element of the global model, then one for the weight). It is
  added to the running sum in the ring as it arrives, from share holders only; its plaintext ``weight`` is 1
  (the real weight travels masked). All of a round's results must be of one ``params_type``.
* When the round closes with at least ``min_clients`` and ``threshold`` masked inputs, it does not publish yet:
  the survivors are asked for their shares (``unmask``). With ``threshold`` answers the masks are removed,
  the sum decoded, and the new global published as FedAvg would (FULL: the mean; DIFF: global + mean; the
  global's integer tensors are kept). ``round_timeout`` bounds the unmasking too; sites coming back meanwhile
  wait for the next round.
* A site that breaks the protocol (a message out of turn, a malformed key or share) is dropped from the
  round: its input is not taken; ``state()['secagg_faults']`` counts them.

FedBuff is not supported: docs/security.md says why and what a buffered variant needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fedbus.errors import ConfigError, RemoteProtocolError, StrategyError
from fedbus.protocol.messages import Message, SecAggAdvert, SecAggReveal, SecAggShares
from fedbus.secagg.config import SecAggConfig
from fedbus.secagg.encoding import float_names
from fedbus.secagg.protocol import Outcome, SecAggServer
from fedbus.strategy.base import Action, Dispatch, Failed, Relay, Update
from fedbus.strategy.fedavg import FedAvg

INPUT = "secagg"
"""The one tensor of a masked training result."""


class SecureFedAvg(FedAvg):
    """FedAvg whose broker sees only the sum; see the module docstring."""

    name: ClassVar[str] = "fedavg"

    def __init__(
        self,
        min_clients: int,
        num_rounds: int,
        secure_aggregation: Mapping[str, Any] | SecAggConfig,
        max_clients: int | None = None,
        round_timeout: float | None = None,
        evaluate_every: int = 0,
        time_budget: float | None = None,
    ) -> None:
        super().__init__(min_clients, num_rounds, max_clients, round_timeout, evaluate_every, time_budget)
        self.secagg = SecAggConfig.parse(secure_aggregation)
        if self.max_clients is not None and self.max_clients < self.secagg.threshold:
            raise StrategyError(
                f"secure_aggregation.threshold={self.secagg.threshold} exceeds max_clients={self.max_clients}: "
                "no round could reach it"
            )
        self._faults = 0

    def _reset_round(self) -> None:
        super()._reset_round()
        self._server: SecAggServer | None = None
        self._unmasking = False
        self._unmask_timed_out = False

    # ---- what the sites are told and send ---------------------------------------------------------------

    def client_options(self) -> dict[str, Any]:
        return {"secure_aggregation": self.secagg.to_dict()}

    def input_spec(self) -> Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None:
        floats = sum(self._global[n].numel() for n in float_names(self._global))
        return {INPUT: (torch.int32 if self.secagg.bits == 32 else torch.int64, (floats + 1,))}

    # ---- protocol messages ------------------------------------------------------------------------------

    def on_message(self, site: str, msg: Message, now: float) -> list[Action]:
        """A secure-aggregation message from ``site`` (advert, shares, reveal) for the round in progress; one for
        another round is ignored (a late one), one that breaks the protocol drops the site from the round."""
        acts = self._events_start(now)
        server = self._server
        if server is None or self._phase != "train" or getattr(msg, "round", None) != self._version + 1:
            return acts
        try:
            if isinstance(msg, SecAggAdvert):
                out = server.on_advert(site, msg)
            elif isinstance(msg, SecAggShares):
                out = server.on_shares(site, msg)
            elif isinstance(msg, SecAggReveal):
                out = server.on_reveal(site, msg)
            else:
                raise RemoteProtocolError(f"{msg.TYPE!r} is not a message a site sends the broker")
        except RemoteProtocolError:
            self._faults += 1
            out = server.drop(site)
        return acts + self._follow(out, now)

    def _follow(self, out: Outcome, now: float) -> list[Action]:
        acts: list[Action] = [Relay(site, msg) for site, msg in out.send]
        if out.failed is not None:
            return acts + self._end(Failed(f"round {self._version + 1}: {out.failed}"))
        if self._unmasking and self._server is not None and self._server.result is not None:
            self._unmasking = False
            return acts + self._publish_round(now, self._unmask_timed_out)
        return acts

    def _drop(self, site: str, now: float) -> list[Action]:
        if self._server is None or self._phase != "train":
            return []
        return self._follow(self._server.drop(site), now)

    # ---- FedAvg's events, with the round's drop-outs ---------------------------------------------------

    def _begin_round(self, now: float) -> list[Action]:
        acts = super()._begin_round(now)
        sites = [a.site for a in acts if isinstance(a, Dispatch) and a.kind == "train"]
        if self._phase == "train":
            if len(sites) < self.secagg.threshold:
                why = f"{len(sites)} sites dispatched, secure_aggregation.threshold={self.secagg.threshold}"
                return acts + self._end(Failed(f"round {self._version + 1}: {why}; no sum is revealed"))
            self._server = SecAggServer(self.secagg, self._version + 1, sites)
        return acts

    def site_joined(self, site: str, now: float) -> list[Action]:
        if self._unmasking:  # the round's tasks are over: a site back now waits for the next round
            acts = self._events_start(now)
            self._sites.add(site)
            return acts
        return super().site_joined(site, now)

    def site_left(self, site: str, now: float) -> list[Action]:
        acts = self._events_start(now)
        acts += self._drop(site, now)
        if self._phase == "done":
            return acts
        return acts + super().site_left(site, now)

    def task_failed(self, site: str, task_id: str, reason: str, now: float, *, blame: bool = True) -> list[Action]:
        acts = self._events_start(now)
        task = self._book.pending_for(site)
        if task is not None and task.task_id == task_id and task.kind == "train":
            acts += self._drop(site, now)
            if self._phase == "done":
                return acts
        return acts + super().task_failed(site, task_id, reason, now, blame=blame)

    def _close_if_complete(self, now: float) -> list[Action]:
        return [] if self._unmasking else super()._close_if_complete(now)

    def _close_round(self, now: float, timed_out: bool) -> list[Action]:
        r = self._version + 1
        server = self._server
        if self._unmasking:  # only the deadline closes a round that is unmasking
            self._unmasking = False
            why = f"the survivors' shares did not come before the {self.round_timeout:g} s round timeout"
            return self._end(Failed(f"round {r}: secure aggregation: {why}; no sum is revealed"))
        if server is None or self._round["accepted"] < self.min_clients:
            return super()._close_round(now, timed_out)
        acts = self._cancel_pending(f"round {r} is unmasking its sum")
        self._unmasking, self._unmask_timed_out = True, timed_out
        self._deadline = None if self.round_timeout is None else now + self.round_timeout
        return acts + self._follow(server.start_unmask(), now)

    # ---- the sum ------------------------------------------------------------------------------------------

    def _check_result(self, update: Update) -> str | None:
        reason = super()._check_result(update)
        if reason is not None:
            return reason
        if self._server is None:
            return "secure aggregation: no round is collecting masked inputs"
        why = self._server.refusal(update.site)
        if why is not None:
            return f"secure aggregation: {why}"
        if self._acc_type is not None and update.params_type != self._acc_type:
            return f"secure aggregation sums one params_type per round: this round's is {self._acc_type}"
        return None

    def _accumulate(self, update: Update, w: float) -> None:
        assert update.params is not None and self._server is not None
        self._acc_type = self._acc_type or update.params_type
        tensor = update.params[INPUT].detach().cpu().contiguous()
        words = tensor.numpy().view(np.uint32 if self.secagg.bits == 32 else np.uint64)
        self._server.add_masked(update.site, words)

    @torch.no_grad()
    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        assert self._server is not None and self._server.result is not None
        revealed = self._server.result
        wsum = revealed.weight
        if not wsum > 0:
            raise StrategyError("secure aggregation: the masked weights sum to 0 (every site sent weight 0)")
        floats: dict[str, torch.Tensor] = {}
        off = 0
        for name in float_names(self._global):  # one tensor at a time: memory stays the ring sum and the model
            g = self._global[name]
            part = torch.from_numpy(revealed.values(off, off + g.numel()).reshape(g.shape)).div_(wsum)
            off += g.numel()
            floats[name] = (part if self._acc_type == "FULL" else part + g.to(torch.float64)).to(g.dtype)
        self._server = None
        return {name: floats.get(name, g) for name, g in self._global.items()}

    def state(self) -> dict[str, object]:
        server = self._server
        return {
            **super().state(),
            "secagg_phase": "none" if server is None else server.phase,
            "secagg_threshold": self.secagg.threshold,
            "secagg_faults": self._faults,
        }


def secure(strategy_cls: type, kwargs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The strategy class and arguments for a config that may ask for ``secure_aggregation``: FedAvg becomes
    :class:`SecureFedAvg`; any other strategy asking for it is a ConfigError naming why."""
    if kwargs.get("secure_aggregation") is None:
        return strategy_cls, {k: v for k, v in kwargs.items() if k != "secure_aggregation"}
    if strategy_cls is not FedAvg:
        raise ConfigError(
            f"secure_aggregation works with the fedavg strategy only, not {strategy_cls.__name__} "
            "(FedBuff's buffer has no fixed membership to mask over: docs/security.md)"
        )
    return SecureFedAvg, kwargs


__all__: Sequence[str] = ("INPUT", "SecureFedAvg", "secure")
