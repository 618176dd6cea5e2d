"""Log streaming: with ``[client] log_streaming``, what a job's script prints reaches the broker's job folder as
``logs/<site>.log``: real child-process scripts on real site daemons (in-process federation), and SimEnv's script
threads; the site's relay (batches, bounds, partial lines) on a real file; the broker's checks of a batch."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedbus import jobs
from fedbus.broker.tracking import MAX_LOG_BATCH, check_lines
from fedbus.errors import FedbusError
from fedbus.modelio import serde
from fedbus.protocol import encode
from fedbus.protocol.messages import JobEvent
from fedbus.recipes import FedAvgRecipe, SimEnv
from fedbus.site.log_relay import BATCH_BYTES, MAX_BEHIND, MAX_LINE, LogRelay
from tests.broker.harness import federation, wait_job

pytestmark = pytest.mark.timeout(90)

SCRIPT = """
import sys
import fedbus.client as flare

flare.init()
site = flare.get_site_name()
print(f"hello from {site}")
while flare.is_running():
    model = flare.receive()
    r = model.current_round
    print(f"{site} round {r} out")
    print(f"{site} round {r} err", file=sys.stderr)
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
print(f"{site} bye", end="")  # the last words, without a newline, after the job's end
"""


def expected(site: str, rounds: int) -> list[str]:
    lines = [f"hello from {site}"]
    for r in range(rounds):
        lines += [f"{site} round {r} out", f"{site} round {r} err"]
    return [*lines, f"{site} bye"]


def write_job(folder: Path, client: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client.py").write_text(SCRIPT)
    serde.write_file(folder / "model.safetensors", serde.layout({"w": torch.zeros(3)}))
    (folder / "job.toml").write_text(
        'name = "chatty"\nmodel = "model.safetensors"\n\n[strategy]\nname = "fedavg"\nmin_clients = 2\n'
        f'num_rounds = 2\n\n[script]\npath = "client.py"\n\n[sites]\nmin = 2\nmax = 2\n{client}'
    )
    return folder


async def run_job(tmp: Path, client: str) -> Path:
    async with federation(tmp, sites=2) as (broker, _sites, admin):
        job_id = await admin.submit(write_job(tmp / "job", client))
        job = await wait_job(admin, job_id)
        assert job["state"] == "finished", job
        folder = broker.store.job_dir(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while (
            "log_streaming" in client
            and loop.time() < deadline
            and not all(
                (folder / "logs" / f"{s}.log").exists() and "bye" in (folder / "logs" / f"{s}.log").read_text()
                for s in ("site-1", "site-2")
            )
        ):
            await asyncio.sleep(0.1)  # the last lines follow the script's exit, after the job's end
    return folder


def test_child_process_output_reaches_the_broker(tmp_path: Path) -> None:
    folder = asyncio.run(run_job(tmp_path, "\n[client]\nlog_streaming = true\n"))
    for site in ("site-1", "site-2"):
        lines = (folder / "logs" / f"{site}.log").read_text().splitlines()
        assert [line for line in lines if site in line] == expected(site, 2)


def test_without_log_streaming_no_logs_folder(tmp_path: Path) -> None:
    folder = asyncio.run(run_job(tmp_path, ""))
    assert not (folder / "logs").exists()
    assert (tmp_path / "s1" / "jobs" / folder.name / "script.log").read_text().count("round") == 4  # site's own


class StreamingFedAvg(FedAvgRecipe):
    """FedAvg with ``[client] log_streaming = true`` in its job.toml."""

    def job_spec(self) -> jobs.JobSpec:
        return dataclasses.replace(super().job_spec(), client={"log_streaming": True})


def test_simenv_script_threads_output_reaches_the_broker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    recipe = StreamingFedAvg("chatty", {"w": torch.zeros(3)}, script, min_clients=3, num_rounds=2)
    run = recipe.execute(SimEnv(num_clients=3, num_threads=3, workspace=tmp_path / "ws"))
    assert run.status == "finished", run
    logs = list((tmp_path / "ws").rglob("broker/jobs/*/logs"))
    assert len(logs) == 1
    for i in (1, 2, 3):
        site = f"site-{i}"
        lines = (logs[0] / f"{site}.log").read_text().splitlines()
        assert lines == expected(site, 2)  # each thread's output at its own site, no other site's
    out = capsys.readouterr()
    assert "site-1 round 1 out" in out.out and "site-2 round 0 err" in out.err  # the console still shows it


# --- the site's relay on a real file, the broker's check of a batch ----------------------------------------------


def relay(path: Path, **kw: Any) -> tuple[LogRelay, list[JobEvent]]:
    sent: list[JobEvent] = []
    return LogRelay(path, "job-1", sent.append, **kw), sent


def lines_of(events: list[JobEvent]) -> list[str]:
    return [line for e in events for line in e.data["lines"]]


def test_relay_starts_where_the_file_stood_and_keeps_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "script.log"
    path.write_text("from an earlier deploy\n")
    r, sent = relay(path)
    with open(path, "a") as f:
        f.write("one\ntw")
    r.pump()
    assert lines_of(sent) == ["one"]
    with open(path, "a") as f:
        f.write("o\nthree")
    r.pump()
    r.pump(final=True)
    assert lines_of(sent) == ["one", "two", "three"]
    assert all(e.event == "log_text" and e.job_id == "job-1" for e in sent)


def test_relay_batches_below_the_cap_and_within_its_rate(tmp_path: Path) -> None:
    path = tmp_path / "script.log"
    path.touch()
    r, sent = relay(path, rate_bytes=1 << 20)
    line = "x" * 1000
    path.write_text((line + "\n") * 500 + "y" * (3 * MAX_LINE) + "\n")
    r.pump()
    assert lines_of(sent) == [line] * 500 + ["y" * MAX_LINE]
    for e in sent:
        assert sum(len(s) + 1 for s in e.data["lines"]) <= BATCH_BYTES
        check_lines(e.data)  # what the broker takes
        encode(e)  # and it fits an envelope
    slow, sent = relay(path, rate_bytes=10_000)
    slow.offset = 0
    slow.pump()
    assert len(lines_of(sent)) == 9  # 10,000 bytes: nine whole lines, the tenth waits for the next pump


def test_relay_skips_what_it_cannot_keep_up_with_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "script.log"
    path.touch()
    r, sent = relay(path)
    path.write_bytes(b"z" * (MAX_BEHIND + 10) + b"\nlast\n")
    r.pump()
    assert sent[0].data["dropped"] == MAX_BEHIND + 16 and sent[0].data["lines"] == []
    with open(path, "a") as f:
        f.write("after\n")
    r.pump()
    assert lines_of(sent) == ["after"] and sent[-1].data["dropped"] == 0


@pytest.mark.parametrize(
    "data",
    [{"lines": "text"}, {"lines": [1]}, {"lines": ["x" * (MAX_LOG_BATCH + 1)]}, {"lines": [], "dropped": -1}, {}],
)
def test_broker_refuses_bad_batches(data: dict[str, Any]) -> None:
    with pytest.raises(FedbusError, match="log_text"):
        check_lines(data)
