"""``fedbus provision PROJECT.toml -o OUTDIR``: one startup kit per participant, CurveZMQ keys included.

The project file::

    name = "demo"
    broker = "tcp://broker.example.org:7788"   # the address sites and admins dial
    bind = "tcp://0.0.0.0:7788"                 # optional: what the broker binds (this is the default)
    revoked = ["old-site"]                      # optional: names whose keys the broker must refuse

    he = true                                   # optional: homomorphic encryption (CKKS) for jobs that ask
                                                # (or a table: [he] poly_modulus_degree, coeff_mod_bit_sizes,
                                                # scale_bits; fedbus.he.context.CkksParams has the defaults)

    [[participant]]
    name = "hospital-a"
    role = "site"                               # "site" or "admin"

The output (every kit folder 0700, every secret key 0600)::

    OUTDIR/broker/   broker.toml  broker.key  broker.key_secret  participants.toml  README.txt
    OUTDIR/SITE/     site.toml    SITE.key    SITE.key_secret    broker.key         README.txt
    OUTDIR/ADMIN/    admin.toml   ADMIN.key   ADMIN.key_secret   broker.key         README.txt

With ``he``, one CKKS context serves the whole project: ``OUTDIR/he_context.secret`` (0600; keep it off the
broker's machine), a copy in every site kit (``he_context.secret``, named by ``he_context`` in site.toml) and,
in the broker's kit, ``he_context.public``: the parameters without any key, so the broker can fold
ciphertexts and never read them. Every site holds the same secret key, so a site that captured another's
update on the wire could decrypt it: CurveZMQ keeps the wire closed to them (docs/security.md).

Why re-running is safe: keys that exist are kept (a kit already handed out stays valid), new participants
get new keys, and participants.toml is rewritten (atomically, the broker re-reads it) with the revocations
of the project file. A participant left out of the project file stays listed, as it was: removing access
is done by revoking, explicitly. Paths inside the configs are relative to their folder, so a kit can be
copied anywhere.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedbus.config import _address, is_safe_name, read_toml
from fedbus.errors import ConfigError
from fedbus.he.context import (
    BROKER_FILE,
    SITE_FILE,
    CkksParams,
    broker_bytes,
    from_bytes,
    new_site_context,
    site_bytes,
    write_private,
)
from fedbus.security import ROLES, Participant, parse_participants, write_participants
from fedbus.toml_writer import dumps_toml
from fedbus.transport.curve import create_keypair, load_public_key

DEFAULT_BIND = "tcp://0.0.0.0:7788"
RESERVED = ("broker",)


@dataclass(frozen=True)
class Project:
    name: str
    broker: str
    bind: str
    participants: tuple[tuple[str, str], ...]  # (name, role)
    revoked: frozenset[str]
    he: CkksParams | None = None


def load_project(path: str | os.PathLike[str]) -> Project:
    """A project file, checked entry by entry; ConfigError names the file and the problem."""
    doc = read_toml(path)
    where = str(path)
    unknown = set(doc) - {"name", "broker", "bind", "participant", "revoked", "he"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (name, broker, bind, revoked, he, [[participant]])")
    name, broker, bind = doc.get("name"), doc.get("broker"), doc.get("bind", DEFAULT_BIND)
    if not is_safe_name(name):
        raise ConfigError(f"{where}: name must be 1-64 characters from [A-Za-z0-9_.-], got {name!r}")
    for key, value in (("broker", broker), ("bind", bind)):
        try:
            if not isinstance(value, str):
                raise ValueError("must be a string")
            _address(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key} {exc}, got {value!r}") from None
    entries = doc.get("participant", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: list the participants as [[participant]] tables (name, role)")
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for i, e in enumerate(entries):
        at = f"{where}: participant #{i + 1}"
        if not isinstance(e, dict) or set(e) - {"name", "role"}:
            raise ConfigError(f"{at}: a table with exactly the keys name and role")
        pname, role = e.get("name"), e.get("role")
        if not is_safe_name(pname) or pname in RESERVED:
            raise ConfigError(f"{at}: name must be a safe name other than {RESERVED}, got {pname!r}")
        if role not in ROLES:
            raise ConfigError(f"{at} ({pname}): role must be one of {', '.join(ROLES)}, got {role!r}")
        if pname in seen:
            raise ConfigError(f"{at}: {pname!r} is listed twice")
        seen.add(pname)
        out.append((pname, str(role)))
    revoked = doc.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
        raise ConfigError(f"{where}: revoked must be a list of participant names")
    return Project(name, str(broker), str(bind), tuple(out), frozenset(revoked), _he_params(doc.get("he"), where))


def _he_params(value: Any, where: str) -> CkksParams | None:
    """The project's CKKS parameters: None without ``he``, the defaults for ``he = true``, else its table's."""
    if value is None or value is False:
        return None
    if value is True:
        return CkksParams()
    if not isinstance(value, dict) or set(value) - {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits"}:
        raise ConfigError(f"{where}: he must be true or a table (poly_modulus_degree, coeff_mod_bit_sizes, scale_bits)")
    bits = value.get("coeff_mod_bit_sizes", list(CkksParams.coeff_mod_bit_sizes))
    if not isinstance(bits, list):
        raise ConfigError(f"{where}: he coeff_mod_bit_sizes must be a list of bit sizes, got {bits!r}")
    try:
        return CkksParams(
            value.get("poly_modulus_degree", CkksParams.poly_modulus_degree),
            tuple(bits),
            value.get("scale_bits", CkksParams.scale_bits),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def provision(project_path: str | os.PathLike[str], outdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write (or complete) the kits; returns a summary: which kits were created, which kept, who is revoked."""
    project = load_project(project_path)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    broker_dir = _kit_dir(out / "broker")
    broker_public, created_broker = _keypair(broker_dir, "broker")
    listed = _existing(broker_dir / "participants.toml")
    created, kept = (["broker"] if created_broker else []), ([] if created_broker else ["broker"])
    he_secret = _he_context(out, broker_dir, project.he)
    for name, role in project.participants:
        kit = _kit_dir(out / name)
        public, new = _keypair(kit, name)
        (created if new else kept).append(name)
        old = listed.get(name)
        if old is not None and old.role != role:
            raise ConfigError(f"{project_path}: {name!r} was provisioned as {old.role}, now listed as {role}")
        listed[name] = Participant(name, role, load_public_key(public).decode("ascii"), revoked=name in project.revoked)
        shutil.copyfile(broker_public, kit / "broker.key")
        if he_secret is not None and role == "site":
            write_private(kit / SITE_FILE, he_secret)
        _write_kit_config(kit, name, role, project)
    unknown = project.revoked - set(listed)
    if unknown:
        raise ConfigError(f"{project_path}: revoked names no participant: {sorted(unknown)}")
    for name in project.revoked:
        listed[name] = replace(listed[name], revoked=True)
    write_participants(broker_dir / "participants.toml", listed.values(), project.name)
    _write(broker_dir / "broker.toml", _config_text(project, "broker", {
        "bind": project.bind, "secret_key": "broker.key_secret", "participants": "participants.toml",
        **({"he_context": BROKER_FILE} if he_secret is not None else {}),
    }))  # fmt: skip
    _write(
        broker_dir / "README.txt",
        f"Broker of fedbus project {project.name}. Start it with:\n"
        f"  fedbus broker --config broker/broker.toml --workspace /var/lib/fedbus\n"
        f"Revoke a participant: set revoked = true in participants.toml (taken into account within seconds).\n",
    )
    return {"created": created, "kept": kept, "revoked": sorted(project.revoked), "out": str(out)}


def _he_context(out: Path, broker_dir: Path, params: CkksParams | None) -> bytes | None:
    """The project's secret CKKS context (``OUTDIR/he_context.secret``: kept if it exists, else created), with the
    broker's keyless part written to its kit; None without ``he``. Kits provisioned before stay valid."""
    if params is None:
        return None
    master = out / SITE_FILE
    if master.exists():
        data = master.read_bytes()
        ctx = from_bytes(data, str(master))
        os.chmod(master, 0o600)
    else:
        ctx = new_site_context(params)
        data = site_bytes(ctx)
        write_private(master, data)
    _write_bytes(broker_dir / BROKER_FILE, broker_bytes(ctx))
    return data


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _kit_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _keypair(folder: Path, name: str) -> tuple[Path, bool]:
    """The public key file of ``name`` in ``folder``: kept if it exists, else created. (path, created)."""
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() and secret.exists():
        os.chmod(secret, 0o600)
        return public, False
    public, _ = create_keypair(folder, name)
    return public, True


def _existing(path: Path) -> dict[str, Participant]:
    if not path.exists():
        return {}
    return {p.name: p for p in parse_participants(read_toml(path), str(path))}


def _write_kit_config(kit: Path, name: str, role: str, project: Project) -> None:
    values = {"name": name, "broker": project.broker, "secret_key": f"{name}.key_secret", "broker_key": "broker.key"}
    if role == "site" and project.he is not None:
        values["he_context"] = SITE_FILE
    if role == "site":
        _write(kit / "site.toml", _config_text(project, "site", values))
        start = f"  fedbus site --config {name}/site.toml --workspace /var/lib/fedbus-site\n"
    else:
        _write(kit / "admin.toml", _config_text(project, "admin", values))
        start = f"  fedbus status --kit {name}        (also submit, abort, download; or FEDBUS_KIT={name})\n"
    _write(kit / "README.txt", f"{role} {name} of fedbus project {project.name}. Run from the kits' folder:\n{start}")


def _config_text(project: Project, role: str, values: dict[str, Any]) -> str:
    head = f"# {role} kit of fedbus project {project.name!r}, written by `fedbus provision`; paths are relative\n"
    return head + "# to this file's folder. Keep the .key_secret file private (mode 0600).\n" + dumps_toml(values)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
