"""Secure aggregation of one FedAvg round (Bonawitz et al. 2017), as two IO-free state machines.

Theory of operation
-------------------
The broker (``SecAggServer``) learns the sum of the sites' inputs and nothing else about any one of them, as
long as it follows the protocol (honest but curious; docs/security.md says what a lying broker can do). Each
site (``SecAggClient``) runs four steps; the broker relays every message and reads none of the secrets:

0. **Advertise.** The site makes two fresh X25519 key pairs for the round and sends their public keys
   (``SecAggAdvert``). When every site it dispatched to has advertised (or left), the broker sends the list to
   all of them (``SecAggRoster``); the round needs ``threshold`` of them. The roster fixes each site's position
   (1 ... n, by sorted name) and a context: a hash of the round and every key, which binds what follows.
1. **Share keys.** Each site draws a self-mask seed ``b`` and Shamir-shares both ``b`` and its mask-agreement
   private key ``s_sk`` (t of n, ``fedbus.secagg.shamir``); the pair of shares for site j is encrypted with
   AES-GCM under a key agreed with j's ``c_pk``, bound to the context, sender and recipient, and sent to the
   broker (``SecAggShares``). When every roster site has shared (or left), the broker forwards to each the
   ciphertexts addressed to it. The sites that shared are the round's share holders, U2.
2. **Masked input.** A site encodes its update in fixed point (``fedbus.secagg.encoding``) and adds
   ``PRG(b)`` and, for every other share holder v, ``+PRG(s_uv)`` if its name sorts before v's, else
   ``-PRG(s_uv)``, with ``s_uv`` agreed from its ``s_sk`` and v's ``s_pk`` (``fedbus.secagg.prg``). The broker
   adds the masked vectors it receives, mod 2^bits: the pairwise masks of every pair that both sent cancel.
   The senders are the survivors, U3.
3. **Unmask.** The broker tells each survivor who survived and which share holders dropped
   (``SecAggUnmask``). A survivor answers once per round (``SecAggReveal``): its shares of every survivor's
   ``b`` and of every dropped site's ``s_sk``, never both for one site (the sets must split its U2 exactly).
   With ``threshold`` answers the broker rebuilds the seeds and keys, removes the survivors' self masks and
   the pairwise masks the survivors hold with dropped sites, and decodes the sum.

Fewer than ``threshold`` sites at any step fails the round with a reason (``Outcome.failed``) and no sum is
revealed. Sites may drop at any step; the sum survives as long as ``threshold`` survivors answer step 3.

Everything a peer sends is checked (names in the roster, key and share sizes, one message per step); a
violation raises ``RemoteProtocolError``: the caller drops that site from the round.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.protocol.messages import (
    Message,
    SecAggAdvert,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from fedbus.secagg import encoding, prg, shamir
from fedbus.secagg.config import SecAggConfig

KEY_BYTES = 32
_NONCE_BYTES = 12
_CIPHERTEXT_BYTES = _NONCE_BYTES + 2 * shamir.SHARE_BYTES + 16


def _kdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point: no shared secret
        raise RemoteProtocolError(f"secure aggregation: unusable public key: {exc}") from exc


def pair_seed(private: X25519PrivateKey, public: bytes, context: bytes) -> bytes:
    """The seed of the pairwise mask two sites agree on (either side computes the same)."""
    return _kdf(_agree(private, public), b"fedbus-secagg mask " + context)


def pair_sign(me: str, other: str) -> int:
    """+1 when ``me`` adds the pair's mask, -1 when it subtracts it: the two cancel in the sum."""
    return 1 if me < other else -1


@dataclass(frozen=True)
class Roster:
    """The round's advertised keys, as every party sees them."""

    round: int
    keys: Mapping[str, tuple[bytes, bytes]]  # site -> (c_pk, s_pk)

    @property
    def names(self) -> list[str]:
        return sorted(self.keys)

    def position(self, site: str) -> int:
        """The site's Shamir x: 1 ... n by sorted name."""
        return self.names.index(site) + 1

    @property
    def context(self) -> bytes:
        """What binds shares and masks to this round and these keys."""
        h = hashlib.sha256(b"fedbus-secagg round %d" % self.round)
        for name in self.names:
            c_pk, s_pk = self.keys[name]
            h.update(len(name).to_bytes(4, "big") + name.encode() + c_pk + s_pk)
        return h.digest()

    def to_wire(self) -> dict[str, list[bytes]]:
        return {name: [c, s] for name, (c, s) in self.keys.items()}

    @classmethod
    def from_wire(cls, round_no: int, keys: object, threshold: int) -> Roster:
        if not isinstance(keys, dict):
            raise RemoteProtocolError("secagg roster: keys must be a map")
        out: dict[str, tuple[bytes, bytes]] = {}
        for name, pair in keys.items():
            if not (isinstance(name, str) and isinstance(pair, list) and len(pair) == 2):
                raise RemoteProtocolError(f"secagg roster: entry {str(name)[:40]!r} is not [c_pk, s_pk]")
            c_pk, s_pk = pair
            if not all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in pair):
                raise RemoteProtocolError(f"secagg roster: keys of {name[:40]!r} are not two {KEY_BYTES}-byte keys")
            out[name] = (c_pk, s_pk)
        every = [k for pair in out.values() for k in pair]
        if len(set(every)) != len(every):
            raise RemoteProtocolError("secagg roster: a public key appears twice")
        if len(out) < threshold:
            raise RemoteProtocolError(f"secagg roster: {len(out)} sites, fewer than the threshold {threshold}")
        return cls(round_no, out)


def _aad(context: bytes, sender: str, recipient: str) -> bytes:
    return context + b"\0" + sender.encode() + b"\0" + recipient.encode()


# --- the site -----------------------------------------------------------------------------------------------


class SecAggClient:
    """One site's side of one round: ``advert`` → ``on_roster`` → ``on_shares`` → ``mask`` → ``on_unmask``."""

    def __init__(self, me: str, config: SecAggConfig, round_no: int, job_id: str = "") -> None:
        self.me, self.config, self.round, self.job_id = me, config, round_no, job_id
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(prg.SEED_BYTES)
        self.roster: Roster | None = None
        self.holders: list[str] | None = None  # U2, as this site was told
        self._held: dict[str, tuple[bytes, bytes]] = {}  # sender -> (its b share, its s_sk share) at my position
        self._masked = False
        self._revealed = False

    @property
    def ready(self) -> bool:
        """Shares are in: the site can mask its input."""
        return self.holders is not None

    @property
    def scale(self) -> float:
        assert self.roster is not None
        return encoding.scale_for(self.config.bits, self.config.clip, len(self.roster.keys))

    def advert(self) -> SecAggAdvert:
        return SecAggAdvert(self.job_id, self.round, _public(self._c), _public(self._s))

    def on_roster(self, msg: SecAggRoster) -> SecAggShares:
        """Check the roster, share ``b`` and ``s_sk`` among its sites, encrypted for each."""
        if self.roster is not None:
            raise RemoteProtocolError("secagg: a second roster for the round")
        roster = Roster.from_wire(msg.round, msg.keys, self.config.threshold)
        if roster.keys.get(self.me) != (_public(self._c), _public(self._s)):
            raise RemoteProtocolError("secagg roster: this site's own keys are missing or altered")
        self.roster = roster
        names, t = roster.names, self.config.threshold
        b_shares = shamir.split(self._b, t, len(names))
        s_shares = shamir.split(self._s.private_bytes_raw(), t, len(names))
        context = roster.context
        out: dict[str, bytes] = {}
        for i, name in enumerate(names):
            if name == self.me:
                self._held[name] = (b_shares[i], s_shares[i])
                continue
            key = _kdf(_agree(self._c, roster.keys[name][0]), b"fedbus-secagg share " + context)
            nonce = os.urandom(_NONCE_BYTES)
            sealed = AESGCM(key).encrypt(nonce, b_shares[i] + s_shares[i], _aad(context, self.me, name))
            out[name] = nonce + sealed
        return SecAggShares(self.job_id, self.round, out)

    def on_shares(self, msg: SecAggShares) -> None:
        """The shares other sites sent this one: decrypted and kept; the senders and this site are U2."""
        if self.roster is None or self.holders is not None:
            raise RemoteProtocolError("secagg: shares out of turn")
        roster, context = self.roster, self.roster.context
        if not isinstance(msg.shares, dict):
            raise RemoteProtocolError("secagg shares: must be a map")
        for sender, sealed in msg.shares.items():
            if sender not in roster.keys or sender == self.me:
                raise RemoteProtocolError(f"secagg shares: {str(sender)[:40]!r} is not another site of the roster")
            if not isinstance(sealed, bytes) or len(sealed) != _CIPHERTEXT_BYTES:
                raise RemoteProtocolError(f"secagg shares: the ciphertext from {sender!r} has the wrong size")
            key = _kdf(_agree(self._c, roster.keys[sender][0]), b"fedbus-secagg share " + context)
            try:
                plain = AESGCM(key).decrypt(
                    sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _aad(context, sender, self.me)
                )
            except InvalidTag as exc:
                raise RemoteProtocolError(f"secagg shares: the ciphertext from {sender!r} does not decrypt") from exc
            self._held[sender] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        holders = sorted({*msg.shares, self.me})
        if len(holders) < self.config.threshold:
            raise RemoteProtocolError(
                f"secagg: {len(holders)} share holders, fewer than the threshold {self.config.threshold}"
            )
        self.holders = holders

    def encode(self, arrays: Iterable[np.ndarray], weight: float) -> np.ndarray:
        """This site's input in the ring (``fedbus.secagg.encoding``), not yet masked."""
        return encoding.encode(
            list(arrays), self.config.ratio(weight), bits=self.config.bits, clip=self.config.clip, scale=self.scale
        )

    def mask(self, vector: np.ndarray) -> np.ndarray:
        """Add the self mask and the pairwise masks with every other share holder, in place; once per round."""
        if self.roster is None or self.holders is None:
            raise LocalProtocolError("secagg: mask() before the shares arrived")
        if self._masked:
            raise LocalProtocolError("secagg: a round's input is masked once")
        if vector.dtype != encoding.ring_dtype(self.config.bits):
            raise LocalProtocolError(f"secagg: the vector must be {encoding.ring_dtype(self.config.bits).__name__}")
        self._masked = True
        context = self.roster.context
        masks = [(self._b, 1)] + [
            (pair_seed(self._s, self.roster.keys[other][1], context), pair_sign(self.me, other))
            for other in self.holders
            if other != self.me
        ]
        prg.add_masks(vector, masks)
        return vector

    def on_unmask(self, msg: SecAggUnmask) -> SecAggReveal:
        """Reveal shares for the sum: seeds of survivors, keys of dropped sites; refused if the sets are not a
        split of this site's U2, or if asked a second time (a broker could ask each site for the other half)."""
        if self.holders is None or not self._masked:
            raise RemoteProtocolError("secagg: unmask before this site sent its masked input")
        if self._revealed:
            raise RemoteProtocolError("secagg: a site reveals its shares once per round")
        survivors, dropped = msg.survivors, msg.dropped
        if not all(isinstance(s, str) for s in (*survivors, *dropped)):
            raise RemoteProtocolError("secagg unmask: site names must be strings")
        if set(survivors) & set(dropped) or sorted({*survivors, *dropped}) != self.holders:
            raise RemoteProtocolError("secagg unmask: survivors and dropped must split the share holders exactly")
        if len(set(survivors)) < self.config.threshold or self.me not in survivors:
            raise RemoteProtocolError(
                f"secagg unmask: {len(set(survivors))} survivors, fewer than the threshold {self.config.threshold}"
            )
        self._revealed = True
        seeds = {v: self._held[v][0] for v in survivors}
        keys = {u: self._held[u][1] for u in dropped}
        return SecAggReveal(self.job_id, self.round, seeds, keys)


# --- the broker ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a server event asks of the caller: messages to send (site, message; ``job_id`` left empty for the
    caller to fill), and the round's failure (a reason: no sum will be revealed)."""

    send: list[tuple[str, Message]] = field(default_factory=list)
    failed: str | None = None


@dataclass(frozen=True)
class RevealedSum:
    """A round's unmasked sum, kept in ring words (the memory of one masked input) and decoded a slice at a
    time: ``values`` are the sums of ``r_i x_i`` per element, ``weight`` the sum of ``r_i``."""

    ring: np.ndarray
    scale: float

    @property
    def size(self) -> int:
        """The elements of the vector, the weight not counted."""
        return self.ring.size - 1

    @property
    def weight(self) -> float:
        return float(encoding.decode(self.ring[-1:], scale=self.scale)[0])

    def values(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The decoded sums of elements ``start`` ... ``stop`` (default: to the last before the weight)."""
        stop = self.size if stop is None else min(stop, self.size)
        return encoding.decode(self.ring[start:stop], scale=self.scale)


class SecAggServer:
    """The broker's side of one round; see the module docstring. ``result`` is set when the sum is revealed."""

    def __init__(self, config: SecAggConfig, round_no: int, sites: Iterable[str]) -> None:
        self.config, self.round = config, round_no
        self.phase = "advertise"  # -> share -> collect -> unmask -> done | failed
        self._waiting = set(sites)  # who this phase still waits for
        self._adverts: dict[str, tuple[bytes, bytes]] = {}
        self.roster: Roster | None = None
        self._shares: dict[str, dict[str, bytes]] = {}
        self.holders: list[str] = []  # U2
        self.survivors: list[str] = []  # U3, in the order their inputs were added
        self._sum: np.ndarray | None = None
        self._reveals: dict[str, SecAggReveal] = {}
        self._dropped: set[str] = set()
        self.result: RevealedSum | None = None

    @property
    def size(self) -> int:
        return 0 if self.roster is None else len(self.roster.keys)

    @property
    def scale(self) -> float:
        return encoding.scale_for(self.config.bits, self.config.clip, self.size)

    def _fail(self, why: str) -> Outcome:
        self.phase = "failed"
        self._sum = None
        return Outcome(failed=f"secure aggregation: {why}; no sum is revealed")

    def _check(self, site: str, phase: str, what: str) -> None:
        if self.phase != phase or site not in self._waiting:
            raise RemoteProtocolError(f"secagg: {what} from {site!r} out of turn (phase {self.phase})")

    # -- events

    def on_advert(self, site: str, msg: SecAggAdvert) -> Outcome:
        self._check(site, "advertise", "an advert")
        if len(msg.c_pk) != KEY_BYTES or len(msg.s_pk) != KEY_BYTES or msg.c_pk == msg.s_pk:
            raise RemoteProtocolError(f"secagg: the advert of {site!r} is not two distinct {KEY_BYTES}-byte keys")
        self._waiting.discard(site)
        self._adverts[site] = (msg.c_pk, msg.s_pk)
        return self._advance()

    def on_shares(self, site: str, msg: SecAggShares) -> Outcome:
        self._check(site, "share", "shares")
        assert self.roster is not None
        others = set(self.roster.keys) - {site}
        if not isinstance(msg.shares, dict) or set(msg.shares) != others:
            raise RemoteProtocolError(f"secagg: {site!r} must send one share to each other roster site")
        if not all(isinstance(c, bytes) and len(c) == _CIPHERTEXT_BYTES for c in msg.shares.values()):
            raise RemoteProtocolError(f"secagg: a share from {site!r} has the wrong size")
        self._waiting.discard(site)
        self._shares[site] = dict(msg.shares)
        return self._advance()

    def drop(self, site: str) -> Outcome:
        """The site left, or its task failed, or it broke the protocol: it takes no further part."""
        if self.phase in ("done", "failed"):
            return Outcome()
        self._dropped.add(site)
        self._waiting.discard(site)
        if self.phase == "unmask":
            live = len(self._reveals) + len(self._waiting)
            if live < self.config.threshold:
                return self._fail(f"{live} survivors can still reveal their shares, threshold {self.config.threshold}")
            return Outcome()
        return self._advance()

    def refusal(self, site: str) -> str | None:
        """Why a masked input from ``site`` cannot be added now, or None."""
        if self.phase != "collect":
            return f"secure aggregation is in phase {self.phase!r}, not collecting inputs"
        if site not in self.holders or site in self._dropped:
            return f"{site!r} is not a share holder of this round"
        if site in self.survivors:
            return f"{site!r} already sent its masked input"
        return None

    def add_masked(self, site: str, vector: np.ndarray) -> None:
        """Add one site's masked input to the running sum (mod 2^bits); ``refusal`` must have said None."""
        why = self.refusal(site)
        if why is not None:
            raise LocalProtocolError(why)
        dtype = encoding.ring_dtype(self.config.bits)
        if vector.dtype != dtype or vector.ndim != 1:
            raise LocalProtocolError(f"secagg: a masked input is a 1-d {dtype.__name__} vector")
        if self._sum is None:
            self._sum = vector.copy()
        elif self._sum.shape != vector.shape:
            raise LocalProtocolError("secagg: masked inputs of different lengths")
        else:
            np.add(self._sum, vector, out=self._sum)
        self.survivors.append(site)

    def start_unmask(self) -> Outcome:
        """Collection is over: ask the survivors for their shares, or fail below the threshold."""
        if self.phase != "collect":
            return self._fail(f"the round ended in phase {self.phase!r}, before masked inputs were collected")
        t = self.config.threshold
        if len(self.survivors) < t:
            return self._fail(f"{len(self.survivors)} masked inputs arrived, threshold {t}")
        present = set(self.survivors) - self._dropped
        if len(present) < t:
            return self._fail(f"{len(present)} survivors are still here to reveal shares, threshold {t}")
        self.phase, self._waiting = "unmask", present
        survivors = sorted(self.survivors)
        dropped = sorted(set(self.holders) - set(self.survivors))
        return Outcome([(site, SecAggUnmask("", self.round, survivors, dropped)) for site in sorted(present)])

    def on_reveal(self, site: str, msg: SecAggReveal) -> Outcome:
        if self.phase in ("done", "failed"):
            return Outcome()  # a survivor's answer after ``threshold`` others already made the sum: not needed
        self._check(site, "unmask", "a reveal")
        dropped = set(self.holders) - set(self.survivors)
        if not isinstance(msg.seeds, dict) or set(msg.seeds) != set(self.survivors):
            raise RemoteProtocolError(f"secagg: {site!r} must reveal a seed share for each survivor")
        if not isinstance(msg.keys, dict) or set(msg.keys) != dropped:
            raise RemoteProtocolError(f"secagg: {site!r} must reveal a key share for each dropped site")
        shares = [*msg.seeds.values(), *msg.keys.values()]
        if not all(isinstance(s, bytes) and len(s) == shamir.SHARE_BYTES for s in shares):
            raise RemoteProtocolError(f"secagg: a share revealed by {site!r} has the wrong size")
        self._waiting.discard(site)
        self._reveals[site] = msg
        if len(self._reveals) < self.config.threshold:
            return Outcome()
        return self._unmask()

    # -- phases

    def _advance(self) -> Outcome:
        t = self.config.threshold
        if self.phase == "advertise" and not self._waiting:
            live = {s: k for s, k in self._adverts.items() if s not in self._dropped}
            if len(live) < t:
                return self._fail(f"{len(live)} sites advertised keys, threshold {t}")
            self.roster = Roster(self.round, live)
            self.phase, self._waiting = "share", set(live)
            wire = self.roster.to_wire()
            return Outcome([(s, SecAggRoster("", self.round, wire)) for s in sorted(live)])
        if self.phase == "share" and not self._waiting:
            holders = sorted(s for s in self._shares if s not in self._dropped)
            if len(holders) < t:
                return self._fail(f"{len(holders)} sites shared their keys, threshold {t}")
            self.holders, self.phase = holders, "collect"
            out = Outcome()
            for v in holders:
                to_v = {u: self._shares[u][v] for u in holders if u != v}
                out.send.append((v, SecAggShares("", self.round, to_v)))
            self._shares.clear()
            return out
        return Outcome()

    def _unmask(self) -> Outcome:
        """Rebuild the seeds and keys, remove the masks, decode: the round's result."""
        assert self.roster is not None and self._sum is not None
        t, roster = self.config.threshold, self.roster
        total = self._sum
        masks: list[tuple[bytes, int]] = []  # what to take out of the sum
        for v in self.survivors:
            seed = shamir.combine({roster.position(r): m.seeds[v] for r, m in self._reveals.items()}, t)
            masks.append((seed, -1))
        context = roster.context
        for u in sorted(set(self.holders) - set(self.survivors)):
            raw = shamir.combine({roster.position(r): m.keys[u] for r, m in self._reveals.items()}, t)
            s_sk = X25519PrivateKey.from_private_bytes(raw)
            if _public(s_sk) != roster.keys[u][1]:
                return self._fail(f"the shares revealed for {u!r} do not rebuild its key (a share is corrupt)")
            for v in self.survivors:  # v added pair_sign(v, u) * PRG(s_vu): take it out
                masks.append((pair_seed(s_sk, roster.keys[v][1], context), -pair_sign(v, u)))
        prg.add_masks(total, masks)
        self._sum = None
        self.phase = "done"
        self.result = RevealedSum(total, self.scale)
        return Outcome()
