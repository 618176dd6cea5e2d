"""``fedbus bench fuzz``: generated hostile input for everything that crosses a trust boundary.

Targets: envelopes, chunk streams, safetensors headers, job archives, TOML configs, CLI arguments, and a
real broker daemon's socket. Each input is either a structure-aware mutation of a valid one (a field given
a value of the wrong type, a nested value too deep, an offset moved, a zip entry renamed to escape its
folder) or plain random bytes, then possibly bit-flipped, truncated or spliced.

What counts as a finding:
* a crash: any exception that is not a ``FedbusError`` (every refusal in fedbus is one), or, for the
  daemon, a log line from the broker's catch-all handler or the process dying;
* a hang: one input taking longer than ``per_input_s`` (an interval timer interrupts it), or the broker not
  answering a valid admin within that bound between garbage messages;
* unbounded memory: this process's RSS (or the broker's) growing by more than ``rss_cap_mb`` over the run;
* a wrong model accepted: a chunk stream the Receiver declares complete whose bytes differ from the
  sender's, or a header accepted whose tensors do not tile the data section as announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch

from fedbus import digest
from fedbus.bench.common import format_report, rss
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.protocol import messages as m
from fedbus.protocol.envelope import decode, encode
from fedbus.protocol.stream import Receiver, ReceiverState

TARGETS = ("envelope", "chunk", "header", "job", "config", "cli", "broker")
CHUNK = 4096

_INTERESTING = [0, 1, -1, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 4096, 1 << 40]


class _Hang(Exception):
    """Raised by the interval timer inside an input that ran past its bound."""


@dataclass
class Tally:
    """One target's figures."""

    inputs: int = 0
    refused: int = 0
    accepted: int = 0
    crashes: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    max_s: float = 0.0
    rss_growth_mb: float = 0.0

    @property
    def findings(self) -> int:
        return len(self.crashes) + len(self.hangs) + len(self.wrong)


# --- generic mutation ----------------------------------------------------------------------------------


def mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    """One to four classic byte mutations: flip, set, insert, delete, truncate, duplicate, splice."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            pos = rng.randint(0, n)
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 8, rng.randint(1, 64))))
        elif op == 3 and n:
            a = rng.randrange(n)
            del buf[a : a + rng.randint(1, 16)]
        elif op == 4 and n:
            del buf[rng.randrange(n) :]
        elif op == 5 and n:
            a = rng.randrange(n)
            b = min(n, a + rng.randint(1, 32))
            buf[b:b] = buf[a:b] * rng.randint(1, 8)
        elif op == 6 and pool:
            other = rng.choice(pool)
            cut = rng.randint(0, len(other))
            buf[rng.randint(0, n) :] = other[cut:]
        elif op == 7 and n >= 8:
            pos = rng.randrange(n - 7)
            buf[pos : pos + 8] = (rng.choice(_INTERESTING) & (2**64 - 1)).to_bytes(8, "little")
    return bytes(buf)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A msgpack-able value of a random kind: the wrong types, the extremes, deep nesting."""
    kind = rng.randrange(12 if depth < 12 else 9)
    if kind == 0:
        return rng.choice(_INTERESTING)
    if kind == 1:
        return rng.choice((0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308, 5e-324))
    if kind == 2:
        return rng.choice(("", "x" * rng.randint(1, 300), "../../etc/passwd", "\x00", "é\u202e", "a/b"))
    if kind == 3:
        return rng.randbytes(rng.randint(0, 64))
    if kind in (4, 5):
        return rng.choice((True, False, None))
    if kind == 6:
        return rng.randint(-(2**70), 2**70) if rng.random() < 0.1 else rng.randint(-1000, 1000)
    if kind in (7, 8):
        return "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 10)))
    if kind == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == 10:
        return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return {rng.randint(0, 5): random_value(rng, depth + 1)}  # a non-string key


def random_key(rng: random.Random) -> Any:
    return rng.choice(("sid", "job_id", "path", "", "t", "v", "x" * 40, rng.randbytes(3).hex()))


def _pack(body: Any) -> bytes | None:
    try:
        return msgpack.packb(body, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return None  # the generator made something msgpack cannot carry (ints over 64 bits): not an input


# --- envelopes -----------------------------------------------------------------------------------------


def sample_messages() -> list[m.Message]:
    """One valid message of every type (the seeds of structure-aware mutation)."""
    lay = serde.layout({"w": torch.zeros(4)})
    return [
        m.Hello("site", "site-1", "abc", {"python": "3.12"}),
        m.Welcome("s", 0.5, 4),
        m.Heartbeat(),
        m.Bye("done"),
        m.Error("refused", "why", "task"),
        m.Request(1, "status", {"job_id": "j"}),
        m.Reply(1, True, {"jobs": []}),
        m.Deploy("job-1", "client.py", ["a"], {"site_index": 0}),
        m.Task("job-1", "0-site-1-0", "train", 0, 1, 3, 7, params_type="FULL"),
        m.Result("job-1", "0-site-1-0", 0, "FULL", 1.0, {"loss": 0.5}, {}, 7),
        m.JobEvent("job-1", "log", 0, "", {"k": 1}),
        m.EndJob("job-1", "done"),
        m.Offer(7, lay.total, CHUNK, "sum64", "d" * 16, lay.header, {"job_id": "job-1"}),
        m.Credit(7, CHUNK),
        m.Chunk(7, 0, 123),
        m.End(7, "d" * 16),
        m.Ack(7, "d" * 16),
        m.Nack(7, 0, "bad"),
        m.Resume(7, 0),
        m.Abort(7, "why"),
    ]


def envelope_input(rng: random.Random, seeds: list[bytes]) -> bytes:
    """A mutated envelope: a field changed, dropped or added at the msgpack level, then maybe bytes."""
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 200))
    raw = rng.choice(seeds)
    if roll < 0.7:
        body = msgpack.unpackb(raw, raw=False)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(4)
            keys = list(body)
            if op == 0 and keys:
                body[rng.choice(keys)] = random_value(rng)
            elif op == 1 and keys:
                del body[rng.choice(keys)]
            elif op == 2:
                body[random_key(rng)] = random_value(rng)
            else:
                body["t"] = rng.choice([*m.MESSAGE_TYPES, "nope", 3])
        packed = _pack(body)
        raw = packed if packed is not None else raw
    return mutate_bytes(rng, raw, seeds) if rng.random() < 0.4 else raw


def check_envelope(data: bytes) -> str:
    """Decode; an accepted message must survive encode -> decode unchanged (what we accept we can send)."""
    try:
        msg, mid = decode(data)
    except FedbusError:
        return "refused"
    again, _ = decode(encode(msg, mid))
    if again != msg and not _has_nan(msg):
        raise AssertionError(f"round trip changed {msg!r} into {again!r}")
    return "accepted"


def _has_nan(msg: m.Message) -> bool:
    return "nan" in repr(msg)


# --- chunk streams -------------------------------------------------------------------------------------


class StreamCase:
    """A valid model stream (source bytes, chunk sums, digest) to mutate."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        model = {"a": torch.randn(3000, generator=g), "b": torch.randn(17, generator=g).double()}
        lay = serde.layout(model)
        self.header = lay.header
        self.data = b"".join(bytes(p) for p in lay.parts)
        self.total = len(self.data)
        triples = digest.chunk_sums([self.data], CHUNK, "sum64")
        self.sums = [s for _, _, s in triples]
        self.digest = digest.stream_digest(triples, "sum64")
        self.offer = m.Offer(9, self.total, CHUNK, "sum64", self.digest, self.header, {})


def chunk_input(rng: random.Random, case: StreamCase) -> tuple[m.Offer, list[tuple[m.Message, bytes]]]:
    """An offer (usually valid) and a run of sender messages: mostly right, some corrupt or misplaced."""
    offer = case.offer
    if rng.random() < 0.15:
        name = rng.choice(("total", "chunk", "alg", "digest", "header"))
        value = random_value(rng) if rng.random() < 0.5 else _near(rng, getattr(offer, name))
        offer = m.Offer(**{**m.fields_of(offer), name: value})
    events: list[tuple[m.Message, bytes]] = []
    off = 0
    for _ in range(rng.randint(1, 40)):
        roll = rng.random()
        length = min(CHUNK, case.total - off) if off < case.total else CHUNK
        payload = case.data[off : off + length]
        s = case.sums[off // CHUNK] if off < case.total else 0
        if roll < 0.6 and off < case.total:
            events.append((m.Chunk(9, off, s), payload))
            off += length
        elif roll < 0.7 and payload:  # corrupt bytes under the right sum
            events.append((m.Chunk(9, off, s), mutate_bytes(rng, payload)))
        elif roll < 0.75:
            events.append((m.Chunk(9, rng.choice((off, 0, -CHUNK, off + CHUNK, case.total, 1 << 62)), s), payload))
        elif roll < 0.8:
            events.append((m.Chunk(9, off, rng.getrandbits(64)), payload))
        elif roll < 0.9:
            events.append((m.End(9, rng.choice((case.digest, case.digest[::-1], ""))), b""))
        else:
            other = rng.choice((m.Credit(9, off), m.Ack(9, case.digest), m.Nack(9, 0, "x"), m.Resume(9, 0)))
            events.append((rng.choice((other, m.Abort(9, "bye"), m.Chunk(8, off, s))), payload))
    if rng.random() < 0.5:
        events.append((m.End(9, case.digest), b""))
    return offer, events


def _near(rng: random.Random, value: Any) -> Any:
    if isinstance(value, int):
        return value + rng.choice((-8, -1, 1, 8, value, -value))
    if isinstance(value, bytes):
        return mutate_bytes(rng, value)
    return value + "x" if isinstance(value, str) else value


def check_chunks(case: StreamCase, offer: m.Offer, events: list[tuple[m.Message, bytes]]) -> str:
    """Drive a Receiver as the hub does; a stream declared complete must hold exactly the sender's bytes.

    Messages go through the envelope first, as on the wire: what the codec refuses never reaches a Receiver.
    """
    try:
        offer = _wire(offer)
        rx = Receiver(
            offer,
            window=4 * CHUNK,
            now=0.0,
            digest_fn=lambda t: digest.stream_digest(t, offer.alg),
            max_total=1 << 20,
        )
    except FedbusError:
        return "refused"
    buf = bytearray(offer.total if isinstance(offer.total, int) and 0 <= offer.total <= 1 << 20 else 0)
    rx.start()
    now = 0.0
    for msg, payload in events:
        now += 0.001
        try:
            msg = _wire(msg)
            if isinstance(msg, m.Chunk):
                if msg.sid != 9:
                    continue  # the hub routes by (peer, sid): another stream's chunk never reaches this one
                if rx.accept_chunk(msg, len(payload)):
                    buf[msg.off : msg.off + len(payload)] = payload
                    rx.chunk_written(msg, digest.chunk_sum([payload], offer.alg), now)
            else:
                rx.receive(msg, now)
        except FedbusError:
            pass  # the peer misbehaved: refused, the machine unchanged
        rx.next_messages(now)
    if rx.state is ReceiverState.DONE:
        if offer.total != case.total or bytes(buf) != case.data:
            raise _WrongModel("a stream was declared complete with bytes that differ from what was sent")
        return "accepted"
    return "refused"


def _wire(msg: Any) -> Any:
    """``msg`` as the peer receives it (encode refuses what decode would: a FedbusError either way)."""
    return decode(encode(msg))[0]


class _WrongModel(AssertionError):
    """The receiver accepted bytes the sender never sent."""


# --- safetensors headers -------------------------------------------------------------------------------


def header_input(rng: random.Random, base: bytes, total: int) -> tuple[bytes, int]:
    """A header (with its length prefix) and the announced stream total."""
    if rng.random() < 0.6:
        entries = json.loads(base[8:].decode().rstrip())
        for _ in range(rng.randint(1, 3)):
            name = rng.choice([*entries, "__metadata__", "new"])
            entry = entries.get(name)
            if isinstance(entry, dict) and rng.random() < 0.7:
                key = rng.choice(("dtype", "shape", "data_offsets", "extra"))
                entry[key] = rng.choice(
                    (
                        random_value(rng),
                        [rng.choice(_INTERESTING), rng.choice(_INTERESTING)],
                        rng.choice(list(serde.DTYPES)),
                        [rng.randint(0, 70), rng.randint(0, 70)],
                    )
                )
            else:
                entries[name] = random_value(rng)
        try:
            text = json.dumps(entries, allow_nan=True).encode()
        except (TypeError, ValueError):
            text = base[8:]
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text
    else:
        data = base
    if rng.random() < 0.4:
        data = mutate_bytes(rng, data)
    if rng.random() < 0.2:
        total = rng.choice((0, len(data), total - 1, total + 8, 1 << 62))
    return data, total


def check_header(data: bytes, total: int) -> str:
    try:
        start, specs, _ = serde.parse_header(data, max_total=1 << 30, total=total)
    except FedbusError:
        return "refused"
    end = start
    for s in sorted(specs, key=lambda s: s.start):
        item = torch.empty((), dtype=serde.DTYPES[s.dtype]).element_size()
        if s.nbytes != math.prod(s.shape) * item or start + s.start < end or s.start < 0:
            raise _WrongModel(f"header accepted with a bad tensor {s}")
        end = start + s.end
    if end != total:
        raise _WrongModel(f"header accepted whose tensors end at {end}, not at the stream's {total}")
    if total <= 1 << 16:
        serde.tensors_from_buffer(torch.zeros(total, dtype=torch.uint8), specs, start)
    return "accepted"


# --- job archives --------------------------------------------------------------------------------------

JOB_TOML = """name = "fuzz"
model = "model.safetensors"

[strategy]
name = "fedavg"
min_clients = 2
num_rounds = 3

[script]
path = "client.py"
args = ["a"]

[sites]
min = 2
max = 3
"""


def job_input(rng: random.Random) -> bytes:
    """A job archive: valid files with a mutated job.toml, hostile entry names, or mutated zip bytes."""
    files: dict[str, bytes] = {"job.toml": JOB_TOML.encode(), "client.py": b"print('hi')\n"}
    roll = rng.random()
    if roll < 0.4:
        lines = JOB_TOML.splitlines()
        i = rng.randrange(len(lines))
        if "=" in lines[i] and rng.random() < 0.7:
            key = lines[i].split("=")[0]
            packed = json.dumps(random_value(rng), allow_nan=True, default=str)
            lines[i] = f"{key}= {packed}"
        else:
            lines.insert(i, rng.choice(("[x]", "a.b = 1", "name = 1", "[strategy]", "\x00", "k = [[[[[[1]]]]]]")))
        files["job.toml"] = "\n".join(lines).encode(errors="replace")
    elif roll < 0.6:
        bad = rng.choice(("../evil.py", "/abs.py", "a/../../x", "x" * 300, "dir/", "é/\u202e.py", "job.toml", "."))
        files[bad] = rng.randbytes(rng.randint(0, 100))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if rng.random() < 0.05:
            zf.writestr("big.bin", b"\0" * (4 << 20))  # compresses to a few KiB
    out = buf.getvalue()
    return mutate_bytes(rng, out) if rng.random() < 0.3 else out


def check_job(data: bytes, root: Path) -> str:
    from fedbus.jobs import unpack_job

    dest = root / "dest"
    try:
        unpack_job(data, dest, require_model=False, max_bytes=2 << 20, max_files=50)
        outcome = "accepted"
    except FedbusError:
        outcome = "refused"
        if dest.exists() and any(dest.iterdir()):
            raise AssertionError("a refused archive left files behind") from None
    stray = [p.name for p in root.iterdir() if p.name != "dest"]
    shutil.rmtree(dest, ignore_errors=True)
    if stray:
        raise AssertionError(f"an archive wrote outside its folder: {stray}")
    return outcome


# --- configs and CLI arguments ---------------------------------------------------------------------------


def config_input(rng: random.Random) -> tuple[str, str]:
    from fedbus.config import BrokerConfig, SiteConfig

    cls = rng.choice((BrokerConfig, SiteConfig))
    keys = list(cls.__dataclass_fields__)
    lines = ['name = "s1"'] if cls is SiteConfig else []
    for _ in range(rng.randint(0, 6)):
        key = rng.choice([*keys, "heartbeat", "x"])
        value = random_value(rng)
        try:
            text = json.dumps(value, allow_nan=True, default=str)
        except ValueError:
            text = "1"
        lines.append(f"{key} = {text.replace('NaN', 'nan').replace('Infinity', 'inf')}")
    toml = "\n".join(lines)
    if rng.random() < 0.3:
        toml = mutate_bytes(rng, toml.encode()).decode("utf-8", errors="surrogateescape")
    return cls.__name__, toml


def check_config(cls_name: str, toml: str, path: Path) -> str:
    from fedbus.config import BrokerConfig, SiteConfig, load_config

    path.write_bytes(toml.encode("utf-8", errors="surrogateescape"))
    cls = BrokerConfig if cls_name == "BrokerConfig" else SiteConfig
    try:
        load_config(cls, path, environ={})  # type: ignore[type-var]
    except FedbusError:
        return "refused"
    return "accepted"


_WORDS = [
    "broker", "site", "submit", "status", "abort", "download", "bench", "transfer", "round", "fuzz", "soak",
    "--config", "--bind", "--workspace", "--name", "--broker", "--log-json", "--log-level", "--timeout",
    "--size-mb", "--sites", "--rounds", "--inputs", "--seed", "--target", "--minutes", "--kill-every", "--json",
    "-o", "--wait", "--debug", "tcp://127.0.0.1:1", "ipc://", "-1", "0", "nan", "1e999", "", "x" * 200, "é",
]  # fmt: skip


_PARSER: Any = None


def cli_input(rng: random.Random) -> list[str]:
    return [rng.choice(_WORDS) if rng.random() < 0.8 else rng.randbytes(6).hex() for _ in range(rng.randint(0, 7))]


def check_cli(argv: list[str], root: Path) -> str:
    """Parse (and, for the daemons, load and validate the config) without starting anything."""
    from fedbus import cli
    from fedbus.config import BrokerConfig, SiteConfig, load_config

    global _PARSER
    _PARSER = _PARSER or cli.build_parser()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            args = _PARSER.parse_args(argv)
    except SystemExit as exc:
        if exc.code not in (0, 2):
            raise AssertionError(f"argparse exited {exc.code}") from None
        return "refused"
    if args.command not in ("broker", "site"):
        return "accepted"
    cls = BrokerConfig if args.command == "broker" else SiteConfig
    names = ("bind", "workspace", "log_json", "log_level") if cls is BrokerConfig else ("name", "broker", "workspace")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    config = args.config if args.config is None or not os.path.exists(args.config) else None
    try:
        load_config(cls, config and str(root / "missing.toml"), overrides, environ={})  # type: ignore[type-var]
    except FedbusError:
        return "refused"
    return "accepted"


# --- the harness ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise _Hang(f"input ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _run_one(tally: Tally, what: str, fn: Callable[[], str], describe: Callable[[], str], bound: float) -> None:
    t0 = time.perf_counter()
    try:
        with _time_bound(bound):
            outcome = fn()
    except _Hang:
        tally.hangs.append(describe())
        outcome = "hang"
    except _WrongModel as exc:
        tally.wrong.append(f"{exc}: {describe()}")
        outcome = "wrong"
    except Exception as exc:
        tally.crashes.append(f"{what}: {type(exc).__name__}: {exc}: {describe()}\n{traceback.format_exc(limit=-3)}")
        outcome = "crash"
    tally.max_s = max(tally.max_s, time.perf_counter() - t0)
    tally.inputs += 1
    if outcome == "refused":
        tally.refused += 1
    elif outcome == "accepted":
        tally.accepted += 1


@dataclass
class _Seeds:
    """The valid inputs every mutation starts from, built once per run."""

    envelopes: list[bytes]
    stream: StreamCase
    header: tuple[bytes, int]
    root: Path


def _next_input(target: str, rng: random.Random, seeds: _Seeds) -> tuple[Callable[[], str], Callable[[], str]]:
    """One generated input as (check it, describe it)."""
    root = seeds.root
    if target == "envelope":
        data = envelope_input(rng, seeds.envelopes)
        return lambda: check_envelope(data), lambda: data[:200].hex()
    if target == "chunk":
        offer, events = chunk_input(rng, seeds.stream)
        return lambda: check_chunks(seeds.stream, offer, events), lambda: repr(offer)[:300]
    if target == "header":
        hdr, total = header_input(rng, *seeds.header)
        return lambda: check_header(hdr, total), lambda: f"{hdr[:300]!r} total={total}"
    if target == "job":
        arc = job_input(rng)
        return lambda: check_job(arc, root), lambda: arc[:200].hex()
    if target == "config":
        cls_name, toml = config_input(rng)
        return lambda: check_config(cls_name, toml, root / "c.toml"), lambda: toml[:300]
    argv = cli_input(rng)
    return lambda: check_cli(argv, root), lambda: repr(argv)


def _header_seed() -> tuple[bytes, int]:
    lay = serde.layout({"w": torch.zeros(8), "b": torch.zeros(3, 2, dtype=torch.int64), "h": torch.zeros(5).half()})
    return lay.header, lay.total


def fuzz_in_process(target: str, n: int, rng: random.Random, bound: float, root: Path) -> Tally:
    tally = Tally()
    before = rss()
    seeds = _Seeds(
        [encode(msg, 1) for msg in sample_messages()],
        StreamCase(0),
        _header_seed(),
        root,
    )
    for _ in range(n):
        check, describe = _next_input(target, rng, seeds)
        _run_one(tally, target, check, describe, bound)
    tally.rss_growth_mb = (rss() - before) / (1 << 20)
    return tally


# --- a real broker daemon --------------------------------------------------------------------------------


def broker_inputs(rng: random.Random, seeds: list[bytes], case: StreamCase) -> list[bytes]:
    """One multipart message for the broker: a mutated envelope or garbage, sometimes with payload frames."""
    roll = rng.random()
    if roll < 0.5:
        head = envelope_input(rng, seeds)
    elif roll < 0.8:  # a well-formed message carrying hostile values: it passes decoding and reaches handlers
        offer, events = chunk_input(rng, case)
        msg = rng.choice([offer, *(e for e, _ in events), *sample_messages()])
        try:
            head = encode(msg, rng.randint(0, 100))
        except FedbusError:
            head = envelope_input(rng, seeds)
    else:
        head = rng.randbytes(rng.randint(0, 64))
    frames = [head]
    for _ in range(rng.choice((0, 0, 1, 2))):
        frames.append(rng.randbytes(rng.choice((0, 8, CHUNK, rng.randint(1, 50_000)))))
    return frames


async def _drive_broker(n: int, rng: random.Random, bound: float, root: Path, tally: Tally) -> None:
    from fedbus.admin import Admin
    from fedbus.protocol.messages import Hello
    from fedbus.transport.context import Context
    from fedbus.transport.raw import raw_dealer

    cfg = root / "broker.toml"
    cfg.write_text("max_requests_per_s = 1000000.0\nrequest_burst = 1000000\nmax_model_mb = 64\nheartbeat_s = 0.5\n")
    log_path = root / "broker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", "broker", "--bind", "tcp://127.0.0.1:0", "--workspace",
             str(root / "ws"), "--config", str(cfg), "--log-json"],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    ctx = Context()
    try:
        address = await _broker_address(log_path, proc)
        seeds = [encode(msg, 1) for msg in sample_messages()]
        case = StreamCase(1)
        peers = []
        for i in range(8):
            sock = raw_dealer(ctx, address, b"fuzz-%d" % i)
            role = ("site", "admin", None)[i % 3]
            if role is not None:  # some peers are known to the broker, so their garbage reaches the handlers
                await sock.send(encode(Hello(role, f"fuzz-{i}", "s")))
            peers.append(sock)
        start_rss = _proc_rss(proc.pid)
        async with Admin(address, timeout=bound) as admin:
            for i in range(n):
                frames = broker_inputs(rng, seeds, case)
                await rng.choice(peers).send_multipart(frames)
                tally.inputs += 1
                if i % 50 == 49 or i == n - 1:
                    for sock in peers:  # drain what the broker answered, so its queues to us stay short
                        while await sock.poll(0):
                            await sock.recv_multipart()
                    t0 = time.perf_counter()
                    try:
                        await admin.status()
                    except FedbusError as exc:
                        tally.hangs.append(f"a valid admin got no answer within {bound} s after input {i}: {exc}")
                        if proc.poll() is not None:
                            break
                    tally.max_s = max(tally.max_s, time.perf_counter() - t0)
        tally.rss_growth_mb = (_proc_rss(proc.pid) - start_rss) / (1 << 20)
    finally:
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        ctx.destroy(linger=0)
    if not alive:
        tally.crashes.append(f"the broker died with code {code}; log tail: {log_path.read_text()[-2000:]}")
    elif code != 0:
        tally.crashes.append(f"the broker did not stop cleanly (code {code}); log tail: {log_path.read_text()[-2000:]}")
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("level") in ("error", "critical") or rec.get("event") == "message handler failed":
                tally.crashes.append(f"broker logged {rec.get('event')!r}: {line[:1500]}")
    text = log_path.read_text()
    tally.refused = text.count('"bad message refused"') + text.count('"message refused"')


async def _broker_address(log_path: Path, proc: subprocess.Popen) -> str:
    for _ in range(600):
        for line in log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("event") == "broker listening":
                    return str(rec["address"])
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the broker did not start: {log_path.read_text()[-2000:]}")


def _proc_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- entry point ---------------------------------------------------------------------------------------


def run_fuzz(
    inputs: int = 100_000,
    seed: int = 0,
    target: str = "all",
    *,
    per_input_s: float = 5.0,
    rss_cap_mb: float = 256.0,
    broker_share: float = 0.2,
) -> tuple[str, dict[str, Any]]:
    """Run the harness; returns the report text and its figures (``findings`` is the count of problems)."""
    targets = list(TARGETS) if target == "all" else [target]
    if target in ("envelope", "chunk"):
        targets.append("broker")  # the daemon-facing inputs are also thrown at a real broker socket
    shares = _split(inputs, targets, broker_share)
    rng = random.Random(seed)
    tallies: dict[str, Tally] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedbus-fuzz-") as tmp:
        for name in targets:
            root = Path(tmp) / name
            root.mkdir()
            sub = random.Random(rng.getrandbits(64))
            if name == "broker":
                tally = Tally()
                asyncio.run(_drive_broker(shares[name], sub, per_input_s, root, tally))
            else:
                tally = fuzz_in_process(name, shares[name], sub, per_input_s, root)
            if tally.rss_growth_mb > rss_cap_mb:
                tally.crashes.append(f"memory grew by {tally.rss_growth_mb:.0f} MiB (cap {rss_cap_mb:g})")
            tallies[name] = tally
    elapsed = time.perf_counter() - t0
    rows: list[tuple[str, Any]] = [("seed", seed), ("elapsed_s", round(elapsed, 1))]
    for name, t in tallies.items():
        rows.append(
            (
                name,
                f"inputs={t.inputs} refused={t.refused} accepted={t.accepted} crashes={len(t.crashes)} "
                f"hangs={len(t.hangs)} wrong_model={len(t.wrong)} max_input_s={t.max_s:.3f} "
                f"rss_growth_mib={t.rss_growth_mb:.1f}",
            )
        )
    for name, t in tallies.items():
        for finding in (t.crashes + t.hangs + t.wrong)[:3]:
            rows.append((f"finding[{name}]", finding[:1500]))
    result = {
        "inputs": sum(t.inputs for t in tallies.values()),
        "findings": sum(t.findings for t in tallies.values()),
        "seed": seed,
        "elapsed_s": round(elapsed, 1),
        "targets": {
            name: {"inputs": t.inputs, "findings": t.findings, "max_input_s": round(t.max_s, 4)}
            for name, t in tallies.items()
        },
    }
    rows.insert(0, ("inputs run", result["inputs"]))
    rows.insert(1, ("findings", result["findings"]))
    return format_report(rows, result), result


def _split(total: int, targets: list[str], broker_share: float) -> dict[str, int]:
    """Inputs per target: the broker gets ``broker_share`` of the total, the rest is split evenly."""
    out: dict[str, int] = {}
    rest = total
    if "broker" in targets:
        out["broker"] = max(1, int(total * broker_share)) if len(targets) > 1 else total
        rest -= out["broker"]
    local = [t for t in targets if t != "broker"]
    for i, name in enumerate(local):
        out[name] = rest // len(local) + (1 if i < rest % len(local) else 0)
    return out
