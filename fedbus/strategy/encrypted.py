"""FedAvg and FedBuff over homomorphically encrypted updates: the same barrier and buffer, another fold.

An encrypted job (``[extra.privacy] he = true``) runs :class:`EncryptedFedAvg` or :class:`EncryptedFedBuff`.
They keep their parent's whole theory of operation (tasks, rounds, staleness, deadlines) and change only
what a result must be and how it is folded: the encrypted tensors go to a
:class:`~fedbus.he.fold.CipherFold` (sums of ciphertexts with public scalars), the plaintext ones (names the
job lists in ``he_plaintext``, integer tensors) to the parent's plaintext fold. The global model then holds
blobs for the encrypted names (``fedbus.he.blob``) from the first aggregate on: the broker streams and
checkpoints ciphertexts and never holds a key that could read them.

What folds on ciphertexts, and how (CKKS gives ciphertext + ciphertext, ciphertext x public scalar and
ciphertext + plaintext, at depth 1 here):

* FedAvg, FULL results: ``sum (w_i / w_1) x_i`` with factor ``w_1 / W`` recorded for the site to apply
  (W, the round's total weight, is only known at the end; w_1, the round's first weight, keeps the sum near
  a model's magnitude). DIFF results are refused: adding a delta to an encrypted global model would need the
  global scaled by ``W``, a second multiplication of an already scaled ciphertext.
* FedBuff: ``global + sum (s(tau_i) * lr / K) d_i``, the staleness weight and server learning rate folded
  into each update's one scalar; the global model is plaintext at first and a ciphertext after. Server
  momentum and Adam are refused (each needs the global's ciphertext multiplied again every version, or a
  division); so is ``weight_by_samples`` (its divisor is known only once the buffer is full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch

from fedbus.errors import ConfigError
from fedbus.he.blob import BlobError, is_blob
from fedbus.he.fold import CipherFold, plain_spec
from fedbus.he.options import STRATEGIES, HEOptions
from fedbus.modelio.serde import ANY_LENGTH, TensorSpec
from fedbus.strategy.aggregate import finalize_mean, weighted_sum_into
from fedbus.strategy.base import Action, Params, Strategy, Update, validate_update
from fedbus.strategy.fedavg import FedAvg
from fedbus.strategy.fedbuff import FedBuff
from fedbus.strategy.server_opt import ServerSGD


class _Cipher:
    """What both encrypted strategies share: the model's plaintext description, which names are encrypted, the
    check of a result and the ciphertext fold."""

    def __init__(self, context: Any, options: HEOptions) -> None:
        self.context = context
        self.options = options
        self.spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.encrypted: frozenset[str] = frozenset()
        self.fold: CipherFold | None = None

    def begin(self, model: Params) -> None:
        """Learn the model (plaintext, or a checkpoint holding blobs) the job starts from."""
        if self.context is None:
            raise ConfigError("an encrypted job needs the broker's HE context (he_context)")
        self.spec = plain_spec(model)
        self.encrypted = frozenset(n for n, t in model.items() if is_blob(t) or self.options.encrypts(n, t))
        self.fold = CipherFold(self.context, self.spec, self.encrypted)

    def reference(self) -> Params:
        """What an upload's offer is checked against: any length of bytes for an encrypted tensor."""
        ref: dict[str, Any] = {}
        for name, (dtype, shape) in self.spec.items():
            if name in self.encrypted:
                ref[name] = TensorSpec(name, "U8", ANY_LENGTH, 0, 0)
            else:
                ref[name] = torch.empty(shape, dtype=dtype, device="meta")
        return cast(Params, ref)

    def check(self, params: Params) -> str | None:
        """Why ``params`` is no encrypted update of this model, or None."""
        assert self.fold is not None
        missing = [n for n in self.spec if n not in params]
        extra = [n for n in params if n not in self.spec]
        if missing or extra:
            return f"tensors {'missing' if missing else 'unexpected'}: {sorted(missing or extra)[:5]}"
        plain = self.plain(params)
        ref = self.reference()
        reason = validate_update({n: ref[n] for n in plain}, plain) if plain else None
        if reason is not None:
            return reason
        for name in sorted(self.encrypted):
            reason = self.fold.check(name, params[name])
            if reason is not None:
                return reason
        return None

    def plain(self, params: Params) -> dict[str, torch.Tensor]:
        return {n: params[n] for n in self.spec if n not in self.encrypted}


class EncryptedFedAvg(FedAvg):
    """FedAvg whose sites send encrypted FULL models (see the module docstring)."""

    def __init__(self, *args: Any, he_context: Any = None, he_options: HEOptions | None = None, **kw: Any) -> None:
        self._he = _Cipher(he_context, he_options or HEOptions())
        self._w_first: float | None = None
        super().__init__(*args, **kw)

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        self._he.begin(model)
        return super().start(model, sites, now, version=version)

    def input_reference(self) -> Params:
        return self._he.reference()

    def validate_input(self, reference: Params, params: Params) -> str | None:
        return self._he.check(params)

    def _check_result(self, update: Update) -> str | None:
        if update.params_type != "FULL":
            return "an encrypted FedAvg job takes FULL results (a DIFF cannot be added to an encrypted global model)"
        return super()._check_result(update)

    def _reset_round(self) -> None:
        super()._reset_round()
        self._w_first = None
        if getattr(self, "_he", None) is not None and self._he.fold is not None:
            self._he.fold.clear()  # a partial aggregate (a round that timed out) is dropped

    def _accumulate(self, update: Update, w: float) -> str | None:
        params = update.params
        assert params is not None and self._he.fold is not None
        first = self._w_first if self._w_first is not None else w
        try:
            self._he.fold.add(params, w / first)
        except BlobError as exc:
            return str(exc)
        self._w_first = first
        self._acc_type = "FULL"
        weighted_sum_into(self._acc, self._he.plain(params), w, integers="max")
        return None

    def _finish_aggregate(self) -> dict[str, torch.Tensor]:
        assert self._he.fold is not None and self._w_first is not None
        mean = finalize_mean(self._acc, self._weight)
        cipher = self._he.fold.result(self._w_first / self._weight)
        self._acc = {}
        return {name: cipher.get(name, mean.get(name, g)) for name, g in self._global.items()}


class EncryptedFedBuff(FedBuff):
    """FedBuff whose sites send encrypted deltas (see the module docstring)."""

    def __init__(self, *args: Any, he_context: Any = None, he_options: HEOptions | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._he = _Cipher(he_context, he_options or HEOptions())
        sgd = self._opt if isinstance(self._opt, ServerSGD) else None
        refused = {
            "server_optimizer": sgd is None,
            "server_momentum": sgd is not None and sgd.momentum != 0,
            "weight_by_samples": self.weight_by_samples,
        }
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise ConfigError(
                f"FedBuff: an encrypted job (he = true) supports plain SGD on the server (server_lr only); "
                f"{', '.join(bad)} would need the ciphertexts multiplied again or divided"
            )
        assert sgd is not None
        self._step = sgd.lr / self.buffer_size  # server_lr / K, folded into each update's one scalar

    def start(self, model: Params, sites: Sequence[str], now: float, *, version: int = 0) -> list[Action]:
        self._he.begin(model)
        return super().start(model, sites, now, version=version)

    def input_reference(self) -> Params:
        return self._he.reference()

    def validate_input(self, reference: Params, params: Params) -> str | None:
        return self._he.check(params)

    def _fold_update(self, params: Params, coef: float) -> str | None:
        assert self._he.fold is not None
        try:
            self._he.fold.add(params, coef * self._step)
        except BlobError as exc:
            return str(exc)
        return super()._fold_update(self._he.plain(params), coef)

    def _next_global(self) -> dict[str, torch.Tensor]:
        assert self._he.fold is not None
        plain = super()._next_global()
        plain.update(self._he.fold.result(1.0, base=self._global))
        return plain

    def _reset_buffer(self) -> None:
        super()._reset_buffer()
        if getattr(self, "_he", None) is not None and self._he.fold is not None:
            self._he.fold.clear()  # a partly filled buffer (training ended) is dropped


ENCRYPTED: dict[str, type[EncryptedFedAvg] | type[EncryptedFedBuff]] = {
    "fedavg": EncryptedFedAvg,
    "fedbuff": EncryptedFedBuff,
}


def make_encrypted(name: str, args: Mapping[str, Any], *, context: Any, options: HEOptions) -> Strategy:
    """The encrypted variant of strategy ``name`` built from its job arguments; ConfigError for a strategy that
    cannot fold ciphertexts or an argument it cannot honour. ``context`` may be None to check arguments only."""
    key = name.strip().lower() if isinstance(name, str) else name
    cls = ENCRYPTED.get(key)
    if cls is None:
        raise ConfigError(f"he = true needs a strategy that averages with public weights ({', '.join(STRATEGIES)})")
    from fedbus.strategy import make_strategy

    make_strategy(key, **args)  # the arguments checked exactly as for a plaintext job
    return cls(**args, he_context=context, he_options=options)
