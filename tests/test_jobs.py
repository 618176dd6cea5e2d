"""Job folders and job archives: strict job.toml, deterministic packing, and untrusted unpacking."""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbus.errors import ConfigError
from fedbus.jobs import (
    JobSpec,
    dumps_toml,
    load_job_folder,
    pack_job,
    parse_job_toml,
    unpack_job,
    write_job_toml,
)
from fedbus.modelio import serde

JOB_TOML = """\
name = "demo"
model = "model.safetensors"
[strategy]
name = "fedavg"
min_clients = 2
num_rounds = 3
[script]
path = "client.py"
args = ["--epochs", "1"]
[sites]
min = 2
max = 3
"""


def make_job(folder: Path, toml: str = JOB_TOML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(toml)
    (folder / "client.py").write_text("print('hello')\n")
    (folder / "lib").mkdir(exist_ok=True)
    (folder / "lib" / "util.py").write_text("X = 1\n")
    (folder / "model.safetensors").write_bytes(serde.save_bytes({"w": torch.ones(4, 3), "b": torch.zeros(3)}))
    return folder


def zip_of(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def job_entries(folder: Path) -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    return [(p.relative_to(folder).as_posix(), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return make_job(tmp_path / "job")


@pytest.fixture(scope="module")
def valid_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return pack_job(make_job(tmp_path_factory.mktemp("valid") / "job"))


# --- job.toml --------------------------------------------------------------------------------------------


def test_parse_job_toml() -> None:
    spec = parse_job_toml(JOB_TOML, "job.toml")
    assert spec == JobSpec(
        name="demo",
        model="model.safetensors",
        strategy="fedavg",
        strategy_args={"min_clients": 2, "num_rounds": 3},
        script="client.py",
        script_args=("--epochs", "1"),
        min_sites=2,
        max_sites=3,
        include=(),
        task_timeout_s=None,
        extra={},
    )


def test_job_toml_round_trip(tmp_path: Path) -> None:
    text = JOB_TOML + '\n[limits]\ntask_timeout_s = 600\n[extra]\nlr = 0.01\ntags = ["a", "b"]\n[extra.nested]\nk = 1\n'
    text = text.replace("max = 3\n", 'max = 3\ninclude = ["s1", "s2", "s3"]\n')
    spec = parse_job_toml(text, "job.toml")
    assert spec.task_timeout_s == 600.0 and spec.include == ("s1", "s2", "s3")
    write_job_toml(spec, tmp_path / "job.toml")
    assert parse_job_toml((tmp_path / "job.toml").read_text(), "job.toml") == spec


def test_client_tracking_and_cross_site_tables_round_trip(tmp_path: Path) -> None:
    text = JOB_TOML + (
        '[client]\nexchange = "numpy"\ntransfer_type = "DIFF"\nmemory_gc_rounds = 2\nexternal_process = true\n'
        'log_streaming = true\n[tracking]\ntypes = ["tensorboard", "mlflow"]\nkey_metric = "accuracy"\n'
        "[cross_site_eval]\nenabled = true\n"
    )
    spec = parse_job_toml(text, "job.toml")
    assert spec.client == {
        "exchange": "numpy",
        "transfer_type": "DIFF",
        "memory_gc_rounds": 2,
        "external_process": True,
        "log_streaming": True,
    }
    assert spec.tracking == {"types": ["tensorboard", "mlflow"], "key_metric": "accuracy"}
    assert spec.cross_site_eval is True
    write_job_toml(spec, tmp_path / "job.toml")
    assert parse_job_toml((tmp_path / "job.toml").read_text(), "job.toml") == spec


def test_dot_slash_paths_are_normalized() -> None:
    spec = parse_job_toml(JOB_TOML.replace('"client.py"', '"./lib//client.py"'), "job.toml")
    assert spec.script == "lib/client.py"


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ('name = "demo"', 'name = "de mo"', "name must be 1-64 characters"),
        ('name = "demo"', 'nmae = "demo"', "unknown key 'nmae' .did you mean 'name'"),
        ("[sites]", "[site]", "unknown table 'site' .did you mean 'sites'"),
        ("max = 3", "maximum = 3", r"unknown key in \[sites\]: 'maximum' .did you mean 'max'"),
        ("args = [", "arg = [", r"unknown key in \[script\]: 'arg' .did you mean 'args'"),
        ('model = "model.safetensors"\n', "", "missing key 'model'"),
        ('path = "client.py"', 'path = "/etc/client.py"', "relative POSIX path"),
        ('path = "client.py"', 'path = "../client.py"', "inside the job folder"),
        ('path = "client.py"', 'path = "C:client.py"', "relative POSIX path"),
        ('path = "client.py"', 'path = "lib\\\\client.py"', "relative POSIX path"),
        ('path = "client.py"', "path = 3", "non-empty string"),
        ('args = ["--epochs", "1"]', 'args = ["--epochs", 1]', "list of strings"),
        ('args = ["--epochs", "1"]', 'args = "--epochs 1"', "list of strings"),
        ("min = 2", "min = 0", r"\[sites\] min must be an integer >= 1"),
        ("min = 2", "min = 2.0", r"\[sites\] min must be an integer"),
        ("max = 3", "max = 1", r"\[sites\] max must be an integer >= 2"),
        ("min = 2\nmax = 3", "min = 1\nmax = 1", r"\[sites\] max = 1 is below \[strategy\] min_clients = 2"),
        ("max = 3", 'include = ["a", "a"]', "lists a site twice"),
        ("max = 3", 'include = ["a"]', "include names 1 sites, fewer than min = 2"),
        ("max = 3", 'include = ["a/b", "c"]', "list of site names"),
        ('name = "fedavg"', 'name = "fedavgg"', r"\[strategy\]: unknown strategy 'fedavgg' .did you mean 'fedavg'"),
        ('name = "fedavg"\n', "", r"\[strategy\] needs a name"),
        ("num_rounds = 3", "num_round = 3", r"\[strategy\]: .*no argument 'num_round'"),
        ("num_rounds = 3", "num_rounds = 0", r"\[strategy\]: .*num_rounds"),
        ("max = 3", "max = 3\n[limits]\ntask_timeout_s = -1", "task_timeout_s must be a number > 0"),
        ("max = 3", "max = 3\n[limits]\ntask_timeout_s = true", "task_timeout_s must be a number > 0"),
        ("max = 3", "max = 3 =", "invalid TOML"),
        ("max = 3", 'max = 3\n[client]\nexchange = "jax"', r"\[client\] exchange must be one of 'pytorch', 'numpy'"),
        ("max = 3", 'max = 3\n[client]\ntransfer_type = "full"', r"\[client\] transfer_type must be one of"),
        ("max = 3", "max = 3\n[client]\nmemory_gc_rounds = -1", r"memory_gc_rounds must be an integer >= 0"),
        ("max = 3", "max = 3\n[client]\nexternal_process = 1", r"external_process must be true or false"),
        ("max = 3", "max = 3\n[client]\nlog_stream = true", r"unknown key in \[client\]: 'log_stream' .did you mean"),
        ("max = 3", 'max = 3\n[tracking]\ntypes = ["tensorbord"]', r"\[tracking\] types entry must be one of"),
        ("max = 3", 'max = 3\n[tracking]\ntypes = ["mlflow", "mlflow"]', r"without repeats"),
        ("max = 3", "max = 3\n[tracking]\nkey_metric = 1", r"key_metric must be a metric name"),
        ("max = 3", 'max = 3\n[cross_site_eval]\nenabled = "yes"', r"enabled must be true or false"),
    ],
)
def test_parse_refusals(old: str, new: str, match: str) -> None:
    assert old in JOB_TOML
    with pytest.raises(ConfigError, match=match) as e:
        parse_job_toml(JOB_TOML.replace(old, new, 1), "jobs/demo/job.toml")
    assert str(e.value).startswith("jobs/demo/job.toml: ")


def test_table_given_as_a_value() -> None:
    text = 'script = "client.py"\n' + JOB_TOML.replace('[script]\npath = "client.py"\nargs = ["--epochs", "1"]\n', "")
    with pytest.raises(ConfigError, match=r"job.toml: 'script' must be a table \(\[script\]\)"):
        parse_job_toml(text, "job.toml")


def test_missing_script_table() -> None:
    text = JOB_TOML.replace('[script]\npath = "client.py"\nargs = ["--epochs", "1"]\n', "")
    with pytest.raises(ConfigError, match=r"missing \[script\] path"):
        parse_job_toml(text, "job.toml")


_toml_scalars = (
    st.text(max_size=8)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
# st.deferred, not st.recursive: hypothesis' check that st.recursive's extend uses its argument fires at random
# on this union (a HypothesisDeprecationWarning, an error under -W error) although it does use it.
_toml_values: st.SearchStrategy = st.deferred(
    lambda: (
        _toml_scalars
        | st.lists(_toml_values, max_size=3)
        | st.dictionaries(st.text(max_size=6), _toml_values, max_size=3)
    )
)


@given(st.dictionaries(st.text(max_size=6), _toml_values, max_size=5))
def test_dumps_toml_round_trips(doc: dict) -> None:
    assert tomllib.loads(dumps_toml(doc)) == doc


def test_dumps_toml_special_floats() -> None:
    back = tomllib.loads(dumps_toml({"a": math.inf, "b": -math.inf, "c": math.nan, "d": 1e300, "e": -0.0}))
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"]) and back["d"] == 1e300


def test_dumps_toml_refuses_other_types() -> None:
    with pytest.raises(ConfigError, match="cannot write"):
        dumps_toml({"a": {"b": None}})


# --- the folder ------------------------------------------------------------------------------------------


def test_load_job_folder(job: Path) -> None:
    assert load_job_folder(job) == parse_job_toml(JOB_TOML, "job.toml")


def test_missing_folder_script_model(tmp_path: Path, job: Path) -> None:
    with pytest.raises(ConfigError, match="not a job folder"):
        load_job_folder(tmp_path / "nope")
    (job / "client.py").unlink()
    with pytest.raises(ConfigError, match=r"client.py: \[script\] path is missing"):
        load_job_folder(job)
    (job / "client.py").write_text("")
    (job / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors: model is missing"):
        load_job_folder(job)
    (job / "job.toml").unlink()
    with pytest.raises(ConfigError, match="job.toml is missing"):
        load_job_folder(job)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02", (2**40).to_bytes(8, "little") + b"{}", (8).to_bytes(8, "little") + b"not json"],
)
def test_invalid_model_header(job: Path, data: bytes) -> None:
    (job / "model.safetensors").write_bytes(data)
    with pytest.raises(ConfigError, match="model.safetensors: not a valid safetensors model"):
        load_job_folder(job)


def test_truncated_model_refused(job: Path) -> None:
    path = job / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ConfigError, match="not a valid safetensors model"):
        load_job_folder(job)


def test_script_symlink_leaving_the_folder(tmp_path: Path, job: Path) -> None:
    (tmp_path / "outside.py").write_text("")
    (job / "client.py").unlink()
    (job / "client.py").symlink_to(tmp_path / "outside.py")
    with pytest.raises(ConfigError, match="leaves the job folder"):
        load_job_folder(job)


# --- packing ---------------------------------------------------------------------------------------------


def test_pack_is_deterministic_and_skips_junk(job: Path) -> None:
    first = pack_job(job)
    (job / "__pycache__").mkdir()
    (job / "__pycache__" / "client.cpython-311.pyc").write_bytes(b"x")
    (job / "lib" / "util.pyc").write_bytes(b"x")
    (job / ".git").mkdir()
    (job / ".git" / "HEAD").write_text("ref")
    os.utime(job / "client.py", (0, 0))
    assert pack_job(job) == first
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    assert list(infos) == ["client.py", "job.toml", "lib/util.py", "model.safetensors"]
    assert infos["client.py"].compress_type == zipfile.ZIP_DEFLATED
    assert infos["model.safetensors"].compress_type == zipfile.ZIP_STORED
    assert {i.date_time for i in infos.values()} == {(1980, 1, 1, 0, 0, 0)}


def test_pack_follows_symlinks_inside_refuses_outside(tmp_path: Path, job: Path) -> None:
    (job / "alias.py").symlink_to(job / "lib" / "util.py")
    with zipfile.ZipFile(io.BytesIO(pack_job(job))) as zf:
        assert zf.read("alias.py") == b"X = 1\n"
    (tmp_path / "secret").write_text("key")
    (job / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(ConfigError, match="leak: symlink points outside the job folder"):
        pack_job(job)


def test_pack_refuses_a_directory_symlink_loop(job: Path) -> None:
    (job / "lib" / "loop").symlink_to(job / "lib")
    with pytest.raises(ConfigError, match="symlink loop"):
        pack_job(job)


def test_pack_size_cap(job: Path) -> None:
    with pytest.raises(ConfigError, match="over the 100-byte cap"):
        pack_job(job, max_bytes=100)


def test_pack_validates_first(job: Path) -> None:
    (job / "job.toml").write_text(JOB_TOML.replace("fedavg", "fedavgx"))
    with pytest.raises(ConfigError, match="unknown strategy"):
        pack_job(job)


# --- unpacking -------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, job: Path) -> None:
    spec = unpack_job(pack_job(job), tmp_path / "out")
    assert spec == load_job_folder(job)
    for rel in ["job.toml", "client.py", "lib/util.py", "model.safetensors"]:
        assert (tmp_path / "out" / rel).read_bytes() == (job / rel).read_bytes()


def test_unpack_into_existing_empty_dir(tmp_path: Path, job: Path) -> None:
    (tmp_path / "out").mkdir()
    unpack_job(pack_job(job), tmp_path / "out")
    with pytest.raises(ConfigError, match="not an empty directory"):
        unpack_job(pack_job(job), tmp_path / "out")


def refused(tmp_path: Path, data: bytes, match: str, **caps: int) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        unpack_job(data, dest, **caps)
    assert not dest.exists(), "a refused archive leaves nothing behind"


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("/etc/passwd", "'/etc/passwd': absolute path"),
        ("../evil.py", "'../evil.py': '..' component"),
        ("lib/../../evil.py", "'..' component"),
        ("lib\\evil.py", "backslash"),
        ("C:/evil.py", "absolute path"),
        ("lib//evil.py", "empty or '.' component"),
        ("./evil.py", "empty or '.' component"),
    ],
)
def test_unsafe_names(tmp_path: Path, job: Path, name: str, match: str) -> None:
    refused(tmp_path, zip_of([*job_entries(job), (name, b"x")]), match)


def test_symlink_entry(tmp_path: Path, job: Path) -> None:
    link = zipfile.ZipInfo("lib/link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(tmp_path, zip_of([*job_entries(job), (link, b"/etc/passwd")]), "'lib/link': symlink entry")


def test_duplicate_names(tmp_path: Path, job: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = zip_of([*job_entries(job), ("client.py", b"evil")])
    refused(tmp_path, data, "'client.py': duplicate name")
    refused(tmp_path, zip_of([*job_entries(job), ("CLIENT.py", b"x")]), "'CLIENT.py': duplicate name")


def test_file_where_a_directory_is_needed(tmp_path: Path, job: Path) -> None:
    refused(tmp_path, zip_of([*job_entries(job), ("client.py/x", b"x")]), "needs a directory")


def test_too_many_files(tmp_path: Path, job: Path) -> None:
    refused(tmp_path, pack_job(job), "4 entries, over the limit of 3", max_files=3)


def test_declared_size_over_cap(tmp_path: Path, job: Path) -> None:
    bomb = zip_of([*job_entries(job), ("zeros.bin", bytes(8 << 20))])
    assert len(bomb) < 64 << 10
    refused(tmp_path, bomb, "'zeros.bin': declared sizes add up to over", max_bytes=1 << 20)


def lie_about_size(data: bytes, name: bytes, size: int) -> bytes:
    """Patch the uncompressed size of entry ``name`` in its local header and its central directory entry."""
    buf = bytearray(data)
    local = buf.index(b"PK\x03\x04")
    while buf[local + 30 : local + 30 + len(name)] != name:
        local = buf.index(b"PK\x03\x04", local + 4)
    buf[local + 22 : local + 26] = size.to_bytes(4, "little")
    central = buf.index(b"PK\x01\x02")
    while buf[central + 46 : central + 46 + len(name)] != name:
        central = buf.index(b"PK\x01\x02", central + 4)
    buf[central + 24 : central + 28] = size.to_bytes(4, "little")
    return bytes(buf)


def test_zip_bomb_lying_about_its_size(tmp_path: Path, job: Path) -> None:
    bomb = lie_about_size(zip_of([*job_entries(job), ("zeros.bin", bytes(64 << 20))]), b"zeros.bin", 100)
    assert len(bomb) < 256 << 10
    refused(tmp_path, bomb, "'zeros.bin'|invalid zip", max_bytes=1 << 20)


def test_entry_larger_than_declared_is_caught_by_the_bounded_reader(tmp_path: Path, job: Path) -> None:
    data = lie_about_size(zip_of([*job_entries(job), ("big.txt", b"y" * 5000)]), b"big.txt", 10)
    refused(tmp_path, data, "big.txt|invalid zip")


def test_archive_larger_than_cap(tmp_path: Path, job: Path) -> None:
    refused(tmp_path, pack_job(job), "job archive: .* bytes, over the 100-byte cap", max_bytes=100)


def test_encrypted_and_exotic_compression(tmp_path: Path, job: Path) -> None:
    info = zipfile.ZipInfo("x.bin")
    info.compress_type = zipfile.ZIP_BZIP2
    refused(tmp_path, zip_of([*job_entries(job), (info, b"x")]), "'x.bin': unsupported compression")
    data = bytearray(zip_of([*job_entries(job), ("x.bin", b"x")]))
    central = data.rindex(b"PK\x01\x02")  # the last entry is x.bin
    data[central + 8] |= 1
    refused(tmp_path, bytes(data), "'x.bin': encrypted")


def test_unpacked_job_is_validated(tmp_path: Path, job: Path) -> None:
    (job / "job.toml").write_text(JOB_TOML.replace('"fedavg"', '"fedbufff"'))
    entries = job_entries(job)
    refused(tmp_path, zip_of(entries), "unknown strategy 'fedbufff'")
    entries = [(n, b"garbage" if n == "model.safetensors" else d) for n, d in job_entries(make_job(tmp_path / "j2"))]
    refused(tmp_path, zip_of(entries), "model.safetensors: not a valid safetensors model")
    refused(tmp_path, zip_of([e for e in entries if e[0] != "client.py"]), r"\[script\] path is missing")


def test_not_a_zip(tmp_path: Path) -> None:
    refused(tmp_path, b"hello", "invalid zip")


# --- fuzz: only ConfigError ever escapes ------------------------------------------------------------------

_fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def unpack_must_refuse_or_succeed(data: bytes, tmp: Path) -> None:
    dest = tmp / "out"
    try:
        unpack_job(data, dest, max_bytes=4 << 20, max_files=50)
    except ConfigError:
        assert not dest.exists()


@_fuzz
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    unpack_must_refuse_or_succeed(data, tmp_path_factory.mktemp("fuzz"))


@_fuzz
@given(st.data())
def test_fuzz_mutated_archive(tmp_path_factory: pytest.TempPathFactory, valid_archive: bytes, data) -> None:
    buf = bytearray(valid_archive)
    for _ in range(data.draw(st.integers(1, 8), label="mutations")):
        pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
        kind = data.draw(st.sampled_from(["set", "flip", "cut", "insert"]), label="kind")
        if kind == "set":
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "flip":
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del buf[pos : pos + data.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        if not buf:
            break
    unpack_must_refuse_or_succeed(bytes(buf), tmp_path_factory.mktemp("fuzz"))


_toml_atoms = st.sampled_from(
    ['"x"', "0", "-1", "1e400", "nan", "true", "[]", "[1, 2]", "{}", "{a = 1}", "2024-01-01", '"fedbuff"', "\n"]
)


@_fuzz
@given(st.data())
def test_fuzz_job_toml(data) -> None:
    """Any value in any known place: a ConfigError or a JobSpec, never another exception."""
    lines = JOB_TOML.splitlines()
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        if "=" in lines[i] and data.draw(st.booleans()):
            lines[i] = lines[i].split("=")[0] + "= " + data.draw(_toml_atoms)
        else:
            pos = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + data.draw(st.text(max_size=6)) + lines[i][pos:]
    with contextlib.suppress(ConfigError):
        parse_job_toml("\n".join(lines), "job.toml")
