"""Every message type of the fedbus wire protocol, as frozen dataclasses.

A message is the envelope's typed content; raw payload frames (model chunks, job archives) travel beside
it, never inside it. Each class names its wire ``TYPE`` and its fields; the field annotations are the
schema that ``envelope.decode`` enforces on untrusted input, so adding a message is adding a class here.

Field types allowed in a schema: ``int``, ``float``, ``str``, ``bytes``, ``bool``, ``dict`` (str keys,
plain values), ``list`` and ``X | None``. ``float`` fields accept ints (msgpack may shrink them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

PROTOCOL_VERSION = 2
"""The envelope's ``v``; a peer speaking another is refused at its first message. One number covers the bus
(broker, sites, admins) and a site's link to its scripts: all fedbus's own components, released together. It changes
whenever a field's meaning or place changes, so that mismatched peers fail at once instead of misreading each other
(a site that looked for ``params_type`` where an older broker no longer put it would send FULL models to FedBuff)."""

MAX_HELD = 256
"""Task ids a site's hello may name in ``holds``: a site answers its tasks one at a time per job."""


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all messages; ``TYPE`` is the wire name."""

    TYPE: ClassVar[str] = ""


# --- sessions: registration, liveness, errors -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """A peer introduces itself: a site (data owner), an admin (operator) or a client (training script).

    ``holds``: a site's task ids whose answer it still has to deliver (an upload an earlier process began,
    kept on disk); the broker sends a restarted site again the tasks it does not hold.

    ``jobs``: a site's job ids, those whose script runs there and those whose upload it holds (at most
    ``MAX_HELD``); the broker answers ``end_job`` with a ``cause`` for each one it does not run at that site."""

    TYPE: ClassVar[str] = "hello"
    role: str
    name: str
    session: str
    caps: dict = field(default_factory=dict)
    holds: list = field(default_factory=list)
    jobs: list = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The broker accepts a Hello and tells the peer how often to heartbeat."""

    TYPE: ClassVar[str] = "welcome"
    session: str
    heartbeat_s: float
    liveness: int


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True)
class Bye(Message):
    """A peer leaves on purpose (shutdown); the other side forgets it at once instead of waiting."""

    TYPE: ClassVar[str] = "bye"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Error(Message):
    """A refusal: ``code`` is machine-readable, ``reason`` is for humans, ``ref`` the refused type."""

    TYPE: ClassVar[str] = "error"
    code: str
    reason: str
    ref: str = ""


# --- admin requests (CLI, recipes) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request(Message):
    """An admin request: ``op`` is submit | status | abort | download | sites; one payload frame for submit."""

    TYPE: ClassVar[str] = "request"
    rid: int
    op: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The answer to a Request with the same ``rid``; ``ok`` false means ``error`` says why."""

    TYPE: ClassVar[str] = "reply"
    rid: int
    ok: bool
    data: dict = field(default_factory=dict)
    error: str = ""


# --- jobs between broker, site and training script -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deploy(Message):
    """Broker → site: run a job here; its files follow as one payload frame (a zip archive)."""

    TYPE: ClassVar[str] = "deploy"
    job_id: str
    script: str
    args: list
    config: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Task(Message):
    """Broker → site → script: train or evaluate global model ``version``; the model arrives as stream ``sid``.

    ``meta`` is for the script (it reaches ``FLModel.meta`` as it is); what the components act on has fields of
    its own, set by the broker (``params_type``, ``model_name``) or by the site for its script (``path``, ``take``).
    """

    TYPE: ClassVar[str] = "task"
    job_id: str
    task_id: str
    kind: str
    version: int
    round: int
    total_rounds: int
    sid: int | None = None
    meta: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    """What the job asks of the script's client API (exchange format, transfer type, FedProx's mu, SCAFFOLD ...):
    the strategy's ``client_options()`` merged with the job's ``[client]`` table."""
    params_type: str | None = None
    """What the strategy wants back, ``FULL`` or ``DIFF`` (None: the job's default, from its deploy config)."""
    model_name: str = ""
    """The model an evaluation task carries, by name (cross-site evaluation: ``server``, a site's, a server
    model of the job folder); empty for the global model."""
    path: str | None = None
    """Site → script only: the task's model file (``inbox/TASK.safetensors``); None when no model came with it."""
    take: bool = False
    """Site → script only: the script may take ``path`` (map it, train or write a DIFF into it, send it back as its
    result): no privacy filter of the site reads it again at upload."""


@dataclass(frozen=True, slots=True)
class Result(Message):
    """Script → site → broker: the outcome of a task; params (if any) follow as stream ``sid``.

    ``meta`` is the script's ``FLModel.meta``, relayed untouched; the site acts on ``path`` and ``train_s`` only."""

    TYPE: ClassVar[str] = "result"
    job_id: str
    task_id: str
    version: int
    params_type: str
    weight: float
    metrics: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    sid: int | None = None
    path: str | None = None
    """Script → site only: the params file (``outbox/TASK.safetensors``); None when no params were sent. The
    site never passes it on: local paths stay local."""
    train_s: float | None = None
    """Script → site only: seconds from ``receive()`` to ``send()``, the script's measure of its work (the site
    takes it when plausible: the simulator's slow-site model and overhead figures)."""


@dataclass(frozen=True, slots=True)
class JobEvent(Message):
    """Site → broker: something happened to a job's script (``started``, ``exited``, ``crashed``, ``log``)."""

    TYPE: ClassVar[str] = "job_event"
    job_id: str
    event: str
    code: int = 0
    detail: str = ""
    data: dict = field(default_factory=dict)


END_CAUSES = ("", "ended", "unknown")
"""``EndJob.cause``: ``""`` the job just ended; ``ended`` the broker knows it ended before (told again to a site
that still holds it); ``unknown`` the broker has no record of the job at that site (a workspace replaced, a job
lost): the site drops it and forgets its kept uploads, as nothing will ever take them."""


@dataclass(frozen=True, slots=True)
class EndJob(Message):
    """Broker → site → script: the job is over (finished, failed or aborted); stop its script.

    With a ``cause`` (``END_CAUSES``) it answers a site that named a job the broker does not run there (in its
    hello, or in a message); ``session`` is then the broker session that decided, and a site acts on it only when
    that is the session that welcomed it (not a verdict of a broker it no longer talks to)."""

    TYPE: ClassVar[str] = "end_job"
    job_id: str
    reason: str = ""
    cause: str = ""
    session: str = ""


# --- model streams (see protocol.stream) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """Sender → receiver: a stream of ``total`` bytes whose first bytes are ``header`` (safetensors)."""

    TYPE: ClassVar[str] = "offer"
    sid: int
    total: int
    chunk: int
    alg: str
    digest: str
    header: bytes
    route: dict = field(default_factory=dict)
    """Where the stream belongs, for the receiver to route it (``job_id``, ``task_id``, ``kind``)."""


@dataclass(frozen=True, slots=True)
class Credit(Message):
    """Receiver → sender: you may send every byte below ``until`` (cumulative, so duplicates are harmless)."""

    TYPE: ClassVar[str] = "credit"
    sid: int
    until: int


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Sender → receiver: bytes [off, off + len(payload)) follow as payload frames; ``sum`` is their digest."""

    TYPE: ClassVar[str] = "chunk"
    sid: int
    off: int
    sum: int


@dataclass(frozen=True, slots=True)
class End(Message):
    """Sender → receiver: every chunk was sent; ``digest`` covers the whole stream."""

    TYPE: ClassVar[str] = "end"
    sid: int
    digest: str


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """Receiver → sender: the whole stream arrived and its digest matched."""

    TYPE: ClassVar[str] = "ack"
    sid: int
    digest: str


@dataclass(frozen=True, slots=True)
class Nack(Message):
    """Receiver → sender: bytes from ``off`` on were corrupt; send them again."""

    TYPE: ClassVar[str] = "nack"
    sid: int
    off: int
    reason: str


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Receiver → sender: continue from ``off`` (after a reconnect, a gap or a stall)."""

    TYPE: ClassVar[str] = "resume"
    sid: int
    off: int


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Either side gives the stream up; ``reason`` says why."""

    TYPE: ClassVar[str] = "abort"
    sid: int
    reason: str


# --- secure aggregation (fedbus.secagg): relayed by the broker, which cannot read the shares ------------


@dataclass(frozen=True, slots=True)
class SecAggAdvert(Message):
    """Site → broker: its two X25519 public keys for secure-aggregation round ``round`` of a job: ``c_pk``
    encrypts the shares sent to it, ``s_pk`` agrees its pairwise masks."""

    TYPE: ClassVar[str] = "secagg_advert"
    job_id: str
    round: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True, slots=True)
class SecAggRoster(Message):
    """Broker → site: every advertised key of the round, ``keys`` site -> [c_pk, s_pk]."""

    TYPE: ClassVar[str] = "secagg_roster"
    job_id: str
    round: int
    keys: dict


@dataclass(frozen=True, slots=True)
class SecAggShares(Message):
    """Encrypted Shamir shares. Site → broker: ``shares`` recipient -> ciphertext; broker → site: sender ->
    ciphertext, from every site that shared (the round's share holders)."""

    TYPE: ClassVar[str] = "secagg_shares"
    job_id: str
    round: int
    shares: dict


@dataclass(frozen=True, slots=True)
class SecAggUnmask(Message):
    """Broker → site: the sites whose masked inputs are in the sum (``survivors``) and the share holders whose
    are not (``dropped``); the site answers once per round."""

    TYPE: ClassVar[str] = "secagg_unmask"
    job_id: str
    round: int
    survivors: list
    dropped: list


@dataclass(frozen=True, slots=True)
class SecAggReveal(Message):
    """Site → broker: its shares of each survivor's self-mask seed (``seeds``) and of each dropped site's
    mask key (``keys``), by site."""

    TYPE: ClassVar[str] = "secagg_reveal"
    job_id: str
    round: int
    seeds: dict
    keys: dict


SECAGG_TO_SITE = (SecAggRoster, SecAggShares, SecAggUnmask)
SECAGG_TO_BROKER = (SecAggAdvert, SecAggShares, SecAggReveal)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Heartbeat,
        Bye,
        Error,
        Request,
        Reply,
        Deploy,
        Task,
        Result,
        JobEvent,
        EndJob,
        Offer,
        Credit,
        Chunk,
        End,
        Ack,
        Nack,
        Resume,
        Abort,
        SecAggAdvert,
        SecAggRoster,
        SecAggShares,
        SecAggUnmask,
        SecAggReveal,
    )
}

STREAM_TYPES = frozenset({"offer", "credit", "chunk", "end", "ack", "nack", "resume", "abort"})


def fields_of(msg: Message) -> dict[str, Any]:
    """The message's fields as a plain dict (what the envelope carries besides version and type)."""
    return {f.name: getattr(msg, f.name) for f in fields(msg)}
