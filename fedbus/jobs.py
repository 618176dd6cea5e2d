"""The job folder: one format for ``fedbus submit``, the recipes' export and the site's unpacking.

A job folder holds ``job.toml``, the training script with its files, and the initial global model as a
``.safetensors`` file::

    name = "hello-pt"
    model = "model.safetensors"        # inside the folder
    [strategy]                         # name resolved through fedbus.strategy.make_strategy; the rest are its args
    name = "fedavg"
    min_clients = 3
    num_rounds = 3
    [script]
    path = "client.py"                 # relative, inside the folder
    args = ["--epochs", "1"]
    [sites]
    min = 3                            # start when this many sites are connected (default 1)
    max = 3                            # use at most this many (optional)
    include = []                       # only these site names (optional)
    [limits]
    task_timeout_s = 600               # optional
    [client]                           # optional: what the script's client API does (Task.options)
    exchange = "pytorch"               # "pytorch" (torch tensors) or "numpy" (numpy arrays) in the script
    transfer_type = "FULL"             # what send() transmits: FULL weights or DIFF (local - received)
    memory_gc_rounds = 0               # release cached params and collect garbage every N rounds (0: never)
    external_process = true            # SimEnv: the script in its own process (false: a thread of the site)
    log_streaming = false              # the script's output reaches the broker, per site (logs/SITE.log)
    [tracking]                         # optional
    types = ["tensorboard"]            # where sites' tracking records land: tensorboard, mlflow, wandb
    key_metric = "accuracy"            # the validation metric that picks the best global model
    [cross_site_eval]                  # optional: after the strategy finishes, every site scores every model
    enabled = true
    [extra]                            # optional, free-form: passed to the sites, not read by fedbus, except:
    [extra.privacy]                    # dp_clip, dp_sigma, exclude (site filters); he = true, he_plaintext = [...]
                                       # (homomorphic encryption: fedbus.he, docs/security.md)

On the wire the folder travels as a zip (:func:`pack_job`). The broker and the sites treat that zip as
untrusted (:func:`unpack_job`): names, entry types, counts and sizes are checked against the central
directory before anything is written, and every entry is read through a bounded reader, because the
sizes a zip declares are claims, not facts. Every refusal is a ConfigError naming the file, key or entry.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import shutil
import stat
import struct
import tomllib
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus.config import is_safe_name
from fedbus.errors import ConfigError, FedbusError
from fedbus.toml_writer import dumps_toml

JOB_TOML = "job.toml"
MAX_JOB_TOML_BYTES = 1 << 20
_SKIP_DIRS = frozenset({"__pycache__", ".git"})
_STORED_SUFFIXES = frozenset({".safetensors", ".pt", ".pth", ".bin", ".npy", ".npz", ".zip", ".gz", ".xz", ".zst"})
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_BLOCK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class JobSpec:
    """A validated job.toml, as plain values; the strategy is named, resolved only where it runs."""

    name: str
    model: str
    strategy: str
    strategy_args: dict[str, Any]
    script: str
    script_args: tuple[str, ...] = ()
    min_sites: int = 1
    max_sites: int | None = None
    include: tuple[str, ...] = ()
    task_timeout_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    cross_site_eval: bool = False

    def to_toml_dict(self) -> dict[str, Any]:
        """The job.toml layout of this spec (optional keys left out when unset)."""
        sites: dict[str, Any] = {"min": self.min_sites}
        if self.max_sites is not None:
            sites["max"] = self.max_sites
        if self.include:
            sites["include"] = list(self.include)
        out: dict[str, Any] = {
            "name": self.name,
            "model": self.model,
            "strategy": {"name": self.strategy, **self.strategy_args},
            "script": {"path": self.script, "args": list(self.script_args)},
            "sites": sites,
        }
        if self.task_timeout_s is not None:
            out["limits"] = {"task_timeout_s": self.task_timeout_s}
        if self.client:
            out["client"] = dict(self.client)
        if self.tracking:
            out["tracking"] = dict(self.tracking)
        if self.cross_site_eval:
            out["cross_site_eval"] = {"enabled": True}
        if self.extra:
            out["extra"] = self.extra
        return out


def write_job_toml(spec: JobSpec, path: str | os.PathLike[str]) -> None:
    """Write ``spec`` as a job.toml file that :func:`parse_job_toml` reads back equal."""
    Path(path).write_text(dumps_toml(spec.to_toml_dict()), encoding="utf-8")


# --- job.toml parsing --------------------------------------------------------------------------------------

_TABLES: dict[str, frozenset[str] | None] = {
    "strategy": None,  # "name" plus the strategy's own arguments, checked by make_strategy
    "script": frozenset({"path", "args"}),
    "sites": frozenset({"min", "max", "include"}),
    "limits": frozenset({"task_timeout_s"}),
    "client": frozenset({"exchange", "transfer_type", "memory_gc_rounds", "external_process", "log_streaming"}),
    "tracking": frozenset({"types", "key_metric"}),
    "cross_site_eval": frozenset({"enabled"}),
    "extra": None,  # free-form
}
EXCHANGE_FORMATS = ("pytorch", "numpy")
TRANSFER_TYPES = ("FULL", "DIFF")
TRACKING_TYPES = ("tensorboard", "mlflow", "wandb")
_TOP_KEYS = frozenset({"name", "model", *_TABLES})


def _unknown(source: str, what: str, key: str, known: Any) -> ConfigError:
    near = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{source}: unknown {what} {key!r}{hint}")


def _int(source: str, key: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _relpath(source: str, key: str, v: Any) -> str:
    """A path inside the job folder, in canonical POSIX form, or ConfigError."""
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{source}: {key} must be a non-empty string, got {v!r}")
    if v.startswith("/") or _DRIVE.match(v) or "\\" in v or "\x00" in v:
        raise ConfigError(f"{source}: {key} must be a relative POSIX path inside the job folder, got {v!r}")
    parts = [p for p in v.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ConfigError(f"{source}: {key} must stay inside the job folder (no '..'), got {v!r}")
    return "/".join(parts)


def parse_job_toml(text: str, source: str, *, check_strategy: bool = True) -> JobSpec:
    """A job.toml's text, strictly checked, as a JobSpec; ``source`` names the file in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from e
    for key, value in doc.items():
        if key not in _TOP_KEYS:
            raise _unknown(source, "table" if isinstance(value, dict) else "key", key, _TOP_KEYS)
        if key in _TABLES and not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be a table ([{key}]), got {value!r}")
    for table, allowed in _TABLES.items():
        if allowed is not None:
            for key in doc.get(table, {}):
                if key not in allowed:
                    raise _unknown(source, f"key in [{table}]:", key, allowed)

    name = doc.get("name")
    if not is_safe_name(name):
        raise ConfigError(f"{source}: name must be 1-64 characters from [A-Za-z0-9_.-], got {name!r}")
    if "model" not in doc:
        raise ConfigError(f"{source}: missing key 'model' (the initial model's .safetensors file)")
    model = _relpath(source, "model", doc["model"])

    strategy_table = dict(doc.get("strategy", {}))
    strategy = strategy_table.pop("name", None)
    if not isinstance(strategy, str) or not strategy:
        raise ConfigError(f'{source}: [strategy] needs a name (e.g. name = "fedavg"), got {strategy!r}')

    script_table = doc.get("script", {})
    if "path" not in script_table:
        raise ConfigError(f"{source}: missing [script] path (the training script)")
    script = _relpath(source, "[script] path", script_table["path"])
    args = script_table.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{source}: [script] args must be a list of strings, got {args!r}")

    sites = doc.get("sites", {})
    min_sites = _int(source, "[sites] min", sites.get("min", 1), 1)
    max_sites = sites.get("max")
    if max_sites is not None:
        max_sites = _int(source, "[sites] max", max_sites, min_sites)
    include = sites.get("include", [])
    if not isinstance(include, list) or not all(is_safe_name(s) for s in include):
        raise ConfigError(f"{source}: [sites] include must be a list of site names, got {include!r}")
    if len(set(include)) != len(include):
        raise ConfigError(f"{source}: [sites] include lists a site twice: {include!r}")
    if include and len(include) < min_sites:
        raise ConfigError(f"{source}: [sites] include names {len(include)} sites, fewer than min = {min_sites}")

    timeout = doc.get("limits", {}).get("task_timeout_s")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf"):
            raise ConfigError(f"{source}: [limits] task_timeout_s must be a number > 0, got {timeout!r}")
        timeout = float(timeout)

    client = _client_table(source, doc.get("client", {}))
    tracking = _tracking_table(source, doc.get("tracking", {}))
    cross_site_eval = doc.get("cross_site_eval", {}).get("enabled", False)
    if not isinstance(cross_site_eval, bool):
        raise ConfigError(f"{source}: [cross_site_eval] enabled must be true or false, got {cross_site_eval!r}")

    if check_strategy:
        _check_strategy(source, strategy, strategy_table, max_sites, include)
        _check_he(source, strategy, strategy_table, doc.get("extra", {}), cross_site_eval)
    return JobSpec(
        name=name,
        model=model,
        strategy=strategy,
        strategy_args=strategy_table,
        script=script,
        script_args=tuple(args),
        min_sites=min_sites,
        max_sites=max_sites,
        include=tuple(include),
        task_timeout_s=timeout,
        extra=dict(doc.get("extra", {})),
        client=client,
        tracking=tracking,
        cross_site_eval=cross_site_eval,
    )


def _choice(source: str, key: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return str(v)


def _bool(source: str, key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {v!r}")
    return v


def _client_table(source: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """The [client] table checked value by value (every key is optional)."""
    out: dict[str, Any] = {}
    if "exchange" in table:
        out["exchange"] = _choice(source, "[client] exchange", table["exchange"], EXCHANGE_FORMATS)
    if "transfer_type" in table:
        out["transfer_type"] = _choice(source, "[client] transfer_type", table["transfer_type"], TRANSFER_TYPES)
    if "memory_gc_rounds" in table:
        out["memory_gc_rounds"] = _int(source, "[client] memory_gc_rounds", table["memory_gc_rounds"], 0)
    for key in ("external_process", "log_streaming"):
        if key in table:
            out[key] = _bool(source, f"[client] {key}", table[key])
    return out


def _tracking_table(source: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """The [tracking] table: a list of known tracking types, no repeats, and an optional key metric name."""
    out: dict[str, Any] = {}
    if "types" in table:
        types = table["types"]
        if not isinstance(types, list) or len(set(map(str, types))) != len(types):
            raise ConfigError(f"{source}: [tracking] types must be a list without repeats, got {types!r}")
        out["types"] = [_choice(source, "[tracking] types entry", t, TRACKING_TYPES) for t in types]
    if "key_metric" in table:
        metric = table["key_metric"]
        if not isinstance(metric, str) or not 0 < len(metric) <= 128:
            raise ConfigError(f"{source}: [tracking] key_metric must be a metric name, got {metric!r}")
        out["key_metric"] = metric
    return out


def _check_strategy(source: str, name: str, args: dict[str, Any], max_sites: int | None, include: list[str]) -> None:
    """Resolve the strategy once, so a bad name or argument fails at submit time, not mid-job."""
    from fedbus.strategy import make_strategy

    try:
        make_strategy(name, **args)
    except (FedbusError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: [strategy]: {e}") from e
    secagg = args.get("secure_aggregation")
    t = secagg.get("threshold") if isinstance(secagg, Mapping) else None
    if isinstance(t, int) and max_sites is not None and max_sites < t:
        raise ConfigError(
            f"{source}: [sites] max = {max_sites} is below [strategy] secure_aggregation threshold = {t}: "
            "no round could reveal its sum"
        )
    need = args.get("min_clients")
    if isinstance(need, int) and not isinstance(need, bool):
        if max_sites is not None and max_sites < need:
            raise ConfigError(f"{source}: [sites] max = {max_sites} is below [strategy] min_clients = {need}")
        if include and len(include) < need:
            raise ConfigError(f"{source}: [sites] include names {len(include)} sites, below min_clients = {need}")


def _check_he(source: str, name: str, args: dict[str, Any], extra: Any, cross_site_eval: bool) -> None:
    """A request for homomorphic encryption (``[extra.privacy] he``) the job's strategy can honour, or ConfigError."""
    from fedbus.he.options import he_options
    from fedbus.strategy.encrypted import make_encrypted

    options = he_options(extra if isinstance(extra, Mapping) else {}, source)
    if options is None:
        return
    if cross_site_eval:
        raise ConfigError(f"{source}: [cross_site_eval] cannot run with he = true (sites would score ciphertexts)")
    try:
        make_encrypted(name, args, context=None, options=options)
    except (FedbusError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: [extra.privacy] he = true: {e}") from e


# --- the folder --------------------------------------------------------------------------------------------


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root/rel`` as a regular file whose real path stays inside ``root`` (no symlink leaving it)."""
    path = root / rel
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ConfigError(f"{path}: {what} leaves the job folder (through a symlink)")
    if not real.is_file():
        raise ConfigError(f"{path}: {what} is missing or not a regular file")
    return real


def load_job_folder(
    folder: str | os.PathLike[str], *, require_model: bool = True, check_strategy: bool = True
) -> JobSpec:
    """Parse and check a job folder: job.toml, the script, and the model's safetensors header.

    A site unpacks jobs with ``require_model=False, check_strategy=False``: the initial model travels to
    the broker as a stream, never to sites, and resolving the strategy is the broker's business.
    """
    from fedbus.errors import HeaderError
    from fedbus.modelio import serde

    root = Path(folder).resolve()
    if not root.is_dir():
        raise ConfigError(f"{folder}: not a job folder (no such directory)")
    toml_path = _inside(root, JOB_TOML, "job.toml")
    if toml_path.stat().st_size > MAX_JOB_TOML_BYTES:
        raise ConfigError(f"{toml_path}: over {MAX_JOB_TOML_BYTES} bytes")
    try:
        text = toml_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{toml_path}: not UTF-8 text: {e}") from e
    spec = parse_job_toml(text, str(Path(folder) / JOB_TOML), check_strategy=check_strategy)
    _inside(root, spec.script, "[script] path")
    if not require_model:
        return spec
    model = _inside(root, spec.model, "model")
    try:
        with model.open("rb") as f:
            serde.read_header(f.fileno(), max_total=os.fstat(f.fileno()).st_size)
    except HeaderError as e:
        raise ConfigError(f"{model}: not a valid safetensors model: {e}") from e
    return spec


# --- zip archives ------------------------------------------------------------------------------------------


def _entry_name_problem(name: str) -> str | None:
    """Why ``name`` (a file name, '/'-separated) is unsafe to extract, or None."""
    if not name:
        return "empty name"
    if "\\" in name or "\x00" in name:
        return "backslash or NUL in the name"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    if len(name) > 1024 or any(len(p.encode()) > 255 for p in parts):
        return "name too long"
    return None


def pack_job(folder: str | os.PathLike[str], *, max_bytes: int = 256 << 20, include_model: bool = True) -> bytes:
    """The job folder as a deterministic zip: sorted names, fixed timestamps, checked before it leaves."""
    spec = load_job_folder(folder)
    root = Path(folder).resolve()
    files: list[tuple[str, Path]] = []
    _collect(root, root, "", files, {root})
    if not include_model:  # the model goes to the broker as a stream, not inside the archive
        files = [(rel, p) for rel, p in files if rel != Path(spec.model).as_posix()]
    total = sum(p.stat().st_size for _, p in files)
    if total > max_bytes:
        raise ConfigError(f"{folder}: job folder holds {total} bytes, over the {max_bytes}-byte cap")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for rel, path in files:
            info = zipfile.ZipInfo(rel, date_time=_ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            stored = path.suffix.lower() in _STORED_SUFFIXES
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with path.open("rb") as src, zf.open(info, "w", force_zip64=path.stat().st_size > 1 << 31) as dst:
                shutil.copyfileobj(src, dst, _BLOCK)
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise ConfigError(f"{folder}: job archive is {len(data)} bytes, over the {max_bytes}-byte cap")
    return data


def _collect(root: Path, directory: Path, prefix: str, out: list[tuple[str, Path]], seen: set[Path]) -> None:
    """Regular files under ``directory`` in sorted order; symlinks followed only while inside ``root``."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        rel = prefix + entry.name
        if entry.name in _SKIP_DIRS or entry.name.endswith(".pyc"):
            continue
        path = Path(entry.path)
        real = path.resolve()
        if entry.is_symlink() and not real.is_relative_to(root):
            raise ConfigError(f"{path}: symlink points outside the job folder ({real})")
        if real.is_dir():
            if real in seen:
                raise ConfigError(f"{path}: symlink loop")
            _collect(root, real, rel + "/", out, seen | {real})
        elif real.is_file():
            problem = _entry_name_problem(rel)
            if problem:
                raise ConfigError(f"{path}: cannot pack this file name: {problem}")
            out.append((rel, real))
        elif entry.is_symlink():
            raise ConfigError(f"{path}: broken symlink")


_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
)


def _check_entries(infos: list[zipfile.ZipInfo], max_bytes: int, max_files: int) -> None:
    """Refuse an archive from its central directory alone, before a byte is written."""
    if len(infos) > max_files:
        raise ConfigError(f"job archive: {len(infos)} entries, over the limit of {max_files}")
    names: set[str] = set()
    folded: set[str] = set()
    dirs: set[str] = set()
    files: list[str] = []
    declared = 0
    for info in infos:
        name = info.filename
        is_dir = name.endswith("/")
        clean = name[:-1] if is_dir else name
        problem = _entry_name_problem(clean)
        mode = info.external_attr >> 16
        if problem is None and stat.S_ISLNK(mode):
            problem = "symlink entry"
        elif problem is None and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            problem = "not a regular file or directory"
        elif problem is None and info.flag_bits & 0x1:
            problem = "encrypted"
        elif problem is None and info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            problem = f"unsupported compression method {info.compress_type}"
        elif problem is None and (clean in names or clean.casefold() in folded):
            problem = "duplicate name"
        if problem is None and not is_dir:
            declared += info.file_size
            if declared > max_bytes:
                problem = f"declared sizes add up to over the {max_bytes}-byte cap"
        if problem:
            raise ConfigError(f"job archive: entry {name!r}: {problem}")
        names.add(clean)
        folded.add(clean.casefold())
        parts = clean.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if is_dir:
            dirs.add(clean)
        else:
            files.append(clean)
    for name in files:
        if name in dirs:
            raise ConfigError(f"job archive: entry {name!r}: a file where another entry needs a directory")


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], dest: Path, max_bytes: int) -> None:
    """Write every entry under ``dest``, counting the bytes actually decompressed against the caps."""
    total = 0
    for info in infos:
        name = info.filename
        target = dest.joinpath(*name.rstrip("/").split("/"))
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, target.open("xb") as dst:
            while block := src.read(_BLOCK):
                written += len(block)
                total += len(block)
                if written > info.file_size:
                    raise ConfigError(f"job archive: entry {name!r}: expands past its declared {info.file_size} bytes")
                if total > max_bytes:
                    raise ConfigError(f"job archive: entry {name!r}: expands past the {max_bytes}-byte cap")
                dst.write(block)
        if written != info.file_size:
            raise ConfigError(f"job archive: entry {name!r}: {written} bytes, declared {info.file_size}")


def unpack_job(
    data: bytes,
    dest: str | os.PathLike[str],
    *,
    max_bytes: int = 1 << 30,
    max_files: int = 10_000,
    require_model: bool = True,
    check_strategy: bool = True,
) -> JobSpec:
    """Extract an untrusted job archive into ``dest`` (created, or empty) and load it as a job folder.

    On any refusal the extracted files are removed again and a ConfigError names the entry.
    """
    if len(data) > max_bytes:
        raise ConfigError(f"job archive: {len(data)} bytes, over the {max_bytes}-byte cap")
    dest = Path(dest)
    created = not dest.exists()
    if not created and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest}: destination exists and is not an empty directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = zf.infolist()
                _check_entries(infos, max_bytes, max_files)
                _extract(zf, infos, dest, max_bytes)
        except _ZIP_ERRORS as e:
            raise ConfigError(f"job archive: invalid zip: {type(e).__name__}: {e}") from e
        return load_job_folder(dest, require_model=require_model, check_strategy=check_strategy)
    except BaseException:
        _remove(dest, created)
        raise


def _remove(dest: Path, created: bool) -> None:
    """Undo a failed extraction: the folder if we made it, else only what we put in it."""
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
