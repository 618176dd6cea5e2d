"""Plain-value configs for the daemons, validated in two phases (the uvicorn lesson).

Phase one is plain data: a TOML file, then the environment, then command-line flags, each layer a dict of
field name -> value, checked key by key (unknown keys refused with a suggestion, types checked, values
checked) so that an error names the layer it came from: ``brokers/x.toml: unknown key 'heartbeat' (did you
mean 'heartbeat_s'?)``. Phase two builds the dataclass; names (a strategy, a transport) are resolved later by
whoever uses the value, never here.

File layout: the keys of the dataclass at the top level of the TOML file, no tables::

    bind = "tcp://0.0.0.0:7788"
    heartbeat_s = 0.5

Precedence, lowest first: the dataclass defaults, the file, the environment (``FEDBUS_BIND`` for a broker,
``FEDBUS_BROKER`` for a site), the overrides (CLI flags; a None value means "flag not given" and is ignored).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from fedbus.errors import ConfigError

MiB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ADDRESS_SCHEMES = ("tcp://", "ipc://", "inproc://")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)

# Which environment variable overrides which field, per config class name.
ENV_OVERRIDES: dict[str, dict[str, str]] = {
    "BrokerConfig": {
        "FEDBUS_BIND": "bind",
        "FEDBUS_METRICS_PORT": "metrics_port",
        "FEDBUS_METRICS_HOST": "metrics_host",
    },
    "SiteConfig": {"FEDBUS_BROKER": "broker", "FEDBUS_SECRET_KEY": "secret_key", "FEDBUS_BROKER_KEY": "broker_key"},
    "AdminConfig": {"FEDBUS_BROKER": "broker", "FEDBUS_SECRET_KEY": "secret_key", "FEDBUS_BROKER_KEY": "broker_key"},
}
ENV_OVERRIDES["BrokerConfig"].update({"FEDBUS_SECRET_KEY": "secret_key", "FEDBUS_PARTICIPANTS": "participants"})

PATH_KEYS = ("secret_key", "broker_key", "participants", "he_context")
"""Keys naming files: relative paths in a config file resolve against that file's folder (kits relocate)."""


def is_safe_name(value: object) -> typing.TypeGuard[str]:
    """True for a name usable as a file name and a routing id: ``[A-Za-z0-9_.-]{1,64}``, not only dots."""
    return isinstance(value, str) and bool(_SAFE_NAME.fullmatch(value)) and value.strip(".") != ""


# --- value checks: each returns the (possibly normalized) value or raises ValueError("must ...") ---------


def _safe_name(v: Any) -> Any:
    if not is_safe_name(v):
        raise ValueError("must be 1-64 characters from [A-Za-z0-9_.-] (and not only dots)")
    return v


def _address(v: Any) -> Any:
    if not v.startswith(ADDRESS_SCHEMES) or v in ADDRESS_SCHEMES:
        raise ValueError(f"must be a ZeroMQ address starting with one of {', '.join(ADDRESS_SCHEMES)}")
    return v


def _nonempty(v: Any) -> Any:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _positive(v: Any) -> Any:
    if v is not None and not v > 0:
        raise ValueError("must be > 0")
    return v


def _at_least(n: int) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v < n:
            raise ValueError(f"must be >= {n}")
        return v

    return check


def _chunk_mb(v: Any) -> Any:
    if not 0.0625 <= v <= 64:
        raise ValueError("must be within [0.0625, 64]")
    if not (v * 1024).is_integer():  # exact: 1024 is a power of two
        raise ValueError("must be a multiple of 1/1024 (whole KiB)")
    return v


def _port(v: Any) -> Any:
    if not 0 <= v <= 65535:
        raise ValueError("must be a TCP port within [0, 65535] (0: off)")
    return v


def _host(v: Any) -> Any:
    if not v or "://" in v or "/" in v or any(c.isspace() for c in v):
        raise ValueError("must be a host name or IP address to bind (e.g. 127.0.0.1 or 0.0.0.0), no scheme")
    return v


def _open_unit(v: Any) -> Any:
    if not 0 < v < 1:
        raise ValueError("must be within (0, 1)")
    return v


def _accountant(v: Any) -> Any:
    if v not in ("rdp", "prv"):
        raise ValueError("must be rdp or prv")
    return v


DURABILITY = ("full", "none")
"""The broker's ``durability`` settings: "full" (every acknowledgement waits for its fsyncs, docs/daemons.md) or
"none" (no fsync at all: a throwaway workspace, for simulations and tests)."""


def _durability(v: Any) -> Any:
    if v not in DURABILITY:
        raise ValueError("must be full or none (none: a throwaway workspace, for simulations and tests only)")
    return v


def _log_level(v: Any) -> Any:
    if v.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return v.lower()


@dataclass
class BrokerConfig:
    """The broker daemon's settings; see brokers/local.toml for what each key means."""

    bind: str = "tcp://127.0.0.1:7788"
    workspace: str = "./fedbus-broker"
    heartbeat_s: float = 1.0
    liveness: int = 5
    chunk_mb: float = 2
    window_mb: float | None = None  # per upload in flight; None: 64 MiB shared by the upload slots (broker.uploads)
    max_model_mb: float = 16384
    upload_slots: int | None = None  # None: by the machine's cores (fedbus.broker.uploads.default_upload_slots)
    stall_timeout_s: float = 60.0
    upload_stall_s: float = 10.0  # a big upload without a chunk this long loses its slot to a waiting one
    round_timeout_s: float | None = None
    keep_versions: int = 0
    max_requests_per_s: float = 200.0
    request_burst: int = 400
    max_streams_per_peer: int = 8
    max_mb_per_s: float = 64.0  # per peer, every message but a model stream's own traffic (fedbus.broker.limits)
    mb_burst: float = 256.0
    peer_queue: int = 10_000  # messages queued to one peer before more are dropped (fedbus.transport.overflow)
    stuck_peer_s: float = 10.0  # a peer whose queue stays full this long is cut off ...
    stuck_peer_cooldown_s: float = 60.0  # ... for this long (with CURVE its key is refused meanwhile)
    event_record_kb: float = 128
    """Largest job event (a metrics record, a batch of output lines) a site may have the broker store."""
    events_mb_per_site: float = 64
    """Bytes of job events (rows, metrics records) one site may add to one job's store (fedbus.broker.budgets)."""
    events_mb_per_job: float = 256
    logs_mb_per_site: float = 256
    """Bytes of script output one site may add to ``<job>/logs/<site>.log``."""
    logs_mb_per_job: float = 1024
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    secret_key: str | None = None
    participants: str | None = None
    he_context: str | None = None
    """The project's CKKS parameters without any key (``he_context.public`` from ``fedbus provision``): needed to
    run jobs with homomorphic encryption; a context holding a secret key is refused."""
    log_json: bool = False
    log_level: str = "info"
    durability: str = "full"  # "none": no fsync at all, a throwaway workspace (simulations, tests; docs/daemons.md)

    def __post_init__(self) -> None:
        _validate_instance(self)

    @property
    def chunk_bytes(self) -> int:
        """Chunk size of model streams, in bytes (a whole number of KiB)."""
        return int(self.chunk_mb * MiB)

    @property
    def window_bytes(self) -> int | None:
        """Credit window of model streams, in bytes (None: the broker's default, by its upload slots)."""
        return None if self.window_mb is None else int(self.window_mb * MiB)

    @property
    def max_model_bytes(self) -> int:
        """Largest model stream the broker accepts, in bytes."""
        return int(self.max_model_mb * MiB)


@dataclass
class SiteConfig:
    """The site daemon's settings; ``name`` is required (it is the site's identity at the broker)."""

    name: str
    broker: str = "tcp://127.0.0.1:7788"
    workspace: str = "./fedbus-site"
    heartbeat_s: float = 1.0
    liveness: int = 5
    python: str = sys.executable
    task_timeout_s: float | None = None
    secret_key: str | None = None
    broker_key: str | None = None
    dp_clip: float | None = None
    dp_sigma: float | None = None
    dp_delta: float | None = None
    """Turns the privacy budget on: the site accounts every DP release and reports epsilon for this delta."""
    dp_max_epsilon: float | None = None
    """The budget per job: an update whose release would take the job's epsilon past it is refused."""
    dp_accountant: str = "rdp"
    """``rdp`` (Mironov's Rényi DP) or ``prv`` (privacy random variables: tighter, slower), from Opacus."""
    exclude_vars: tuple[str, ...] = ()
    he_context: str | None = None
    """The project's CKKS context with its secret key (``he_context.secret``, mode 0600, from ``fedbus provision``):
    needed to take jobs with homomorphic encryption."""
    log_json: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        _validate_instance(self)


@dataclass
class AdminConfig:
    """An admin's startup kit (``admin.toml``): whom to connect to, with which keys."""

    name: str = "admin"
    broker: str = "tcp://127.0.0.1:7788"
    secret_key: str | None = None
    broker_key: str | None = None

    def __post_init__(self) -> None:
        _validate_instance(self)


_VALUE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "bind": _address,
    "broker": _address,
    "name": _safe_name,
    "workspace": _nonempty,
    "python": _nonempty,
    "heartbeat_s": _positive,
    "liveness": _at_least(1),
    "chunk_mb": _chunk_mb,
    "window_mb": _positive,
    "max_model_mb": _positive,
    "upload_slots": _at_least(1),
    "stall_timeout_s": _positive,
    "upload_stall_s": _positive,
    "round_timeout_s": _positive,
    "task_timeout_s": _positive,
    "keep_versions": _at_least(0),
    "max_requests_per_s": _positive,
    "request_burst": _at_least(1),
    "max_streams_per_peer": _at_least(1),
    "max_mb_per_s": _positive,
    "mb_burst": _positive,
    "peer_queue": _at_least(100),
    "stuck_peer_s": _positive,
    "stuck_peer_cooldown_s": _positive,
    "event_record_kb": _positive,
    "events_mb_per_site": _positive,
    "events_mb_per_job": _positive,
    "logs_mb_per_site": _positive,
    "logs_mb_per_job": _positive,
    "metrics_port": _port,
    "metrics_host": _host,
    "secret_key": _nonempty,
    "he_context": _nonempty,
    "broker_key": _nonempty,
    "participants": _nonempty,
    "dp_clip": _positive,
    "dp_sigma": _at_least(0),
    "dp_delta": _open_unit,
    "dp_max_epsilon": _positive,
    "dp_accountant": _accountant,
    "log_level": _log_level,
    "durability": _durability,
}

C = TypeVar("C", BrokerConfig, SiteConfig, AdminConfig)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)"}
    if tp == tuple[str, ...]:
        return "a list of strings"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(source: str, key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to the field type ``tp`` (int -> float allowed), or ConfigError naming the key."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        (tp,) = args
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif tp == tuple[str, ...]:
        ok = isinstance(value, list | tuple) and all(isinstance(x, str) for x in value)
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{source}: key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _check_layer(cls: type, source: str, layer: Mapping[str, Any]) -> dict[str, Any]:
    """One layer's keys checked for name, type and value; returns the converted values."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in layer.items():
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            if isinstance(value, dict):
                hint += "; tables are not used: write the keys at the top level"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        value = _check_type(source, key, value, hints[key])
        check = _VALUE_CHECKS.get(key)
        if check is not None and value is not None:
            try:
                value = check(value)
            except ValueError as e:
                raise ConfigError(f"{source}: key {key!r} {e}, got {value!r}") from None
        out[key] = value
    return out


def _check_cross(cls_name: str, values: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """Checks between fields, naming where each value came from."""
    if cls_name == "BrokerConfig":
        chunk, window = values.get("chunk_mb", 2), values.get("window_mb")
        if window is not None and window < chunk:
            where = ", ".join(sorted({origin.get("chunk_mb", "default"), origin.get("window_mb", "default")}))
            raise ConfigError(f"{where}: window_mb ({window:g}) must be >= chunk_mb ({chunk:g})")
        _check_queue(values, origin)
    pair = {"BrokerConfig": ("secret_key", "participants")}.get(cls_name, ("secret_key", "broker_key"))
    if cls_name not in ("BrokerConfig", "SiteConfig", "AdminConfig"):
        return
    given = [k for k in pair if values.get(k) is not None]
    if len(given) == 1:
        (missing,) = set(pair) - set(given)
        where = origin.get(given[0], cls_name)
        raise ConfigError(f"{where}: CURVE needs both {pair[0]} and {pair[1]}; {missing} is missing")
    if cls_name == "SiteConfig" and values.get("dp_sigma") is not None and values.get("dp_clip") is None:
        raise ConfigError(f"{origin.get('dp_sigma', cls_name)}: dp_sigma needs dp_clip (the noise is sigma x clip)")
    if cls_name == "SiteConfig":
        _check_budget(values, origin)


SITE_WINDOW_MB = 64
"""The credit window a site grants a download (``fedbus.transport.streams.DEFAULT_WINDOW``, in MiB)."""


def _check_queue(values: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """``peer_queue`` must hold every download to one site in full windows, so that credited chunks never find
    a site's queue full (a full queue drops messages and, if it stays full, cuts the peer off)."""
    chunk, queue = values.get("chunk_mb", 2), values.get("peer_queue", 10_000)
    streams = values.get("max_streams_per_peer", 8)
    need = streams * math.ceil(SITE_WINDOW_MB / chunk) + 100
    if queue < need:
        keys = ("peer_queue", "chunk_mb", "max_streams_per_peer")
        where = ", ".join(sorted({origin.get(k, "default") for k in keys}))
        raise ConfigError(
            f"{where}: peer_queue ({queue}) must be >= {need}: max_streams_per_peer ({streams}) downloads of "
            f"{SITE_WINDOW_MB} MiB windows in chunks of chunk_mb ({chunk:g}), and 100 messages more"
        )


def _check_budget(values: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    """The privacy budget's keys: a max needs the delta it is for, and accounting needs noise to account."""
    if values.get("dp_max_epsilon") is not None and values.get("dp_delta") is None:
        where = origin.get("dp_max_epsilon", "SiteConfig")
        raise ConfigError(f"{where}: dp_max_epsilon needs dp_delta (epsilon is spent for a given delta)")
    if values.get("dp_delta") is not None and not (values.get("dp_clip") and values.get("dp_sigma")):
        where = origin.get("dp_delta", "SiteConfig")
        raise ConfigError(
            f"{where}: dp_delta (the privacy budget) needs dp_clip and dp_sigma > 0: it accounts their noise"
        )


def _validate_instance(cfg: BrokerConfig | SiteConfig | AdminConfig) -> None:
    """Direct construction (recipes, tests) gets the same checks as a loaded file."""
    name = type(cfg).__name__
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    checked = _check_layer(type(cfg), name, values)
    _check_cross(name, checked, {})
    for key, value in checked.items():
        object.__setattr__(cfg, key, value)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict; a missing file or invalid TOML is a ConfigError naming the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def _env_value(cls: type, source: str, key: str, text: str) -> Any:
    """An environment variable's text as the field's type (``FEDBUS_METRICS_PORT=9100`` is an int)."""
    tp = typing.get_type_hints(cls)[key]
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{source}: key {key!r} must be an integer, got {text!r}") from None
    return text


def load_config(
    cls: type[C],
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Defaults <- TOML file <- environment <- overrides (None values ignored), each layer validated."""
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if path is not None:
        doc = read_toml(path)
        for key in PATH_KEYS:  # relative to the file's folder, so a startup kit can be moved as a whole
            if isinstance(doc.get(key), str) and doc[key] and not os.path.isabs(doc[key]):
                doc[key] = str(Path(path).resolve().parent / doc[key])
        layers.append((str(path), doc))
    for var, key in ENV_OVERRIDES.get(cls.__name__, {}).items():
        if environ.get(var):
            layers.append((f"${var}", {key: _env_value(cls, f"${var}", key, environ[var])}))
    if overrides:
        layers.append(("command line", {k: v for k, v in overrides.items() if v is not None}))

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, layer in layers:
        for key, value in _check_layer(cls, source, layer).items():
            values[key] = value
            origin[key] = source
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        where = str(path) if path is not None else cls.__name__
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    merged = {f.name: f.default for f in fields(cls) if f.default is not MISSING} | values
    _check_cross(cls.__name__, merged, origin)
    return cls(**values)
