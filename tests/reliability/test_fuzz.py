"""A small sample of ``fedbus bench fuzz`` (the benchmark runs 100,000+ inputs): every target, a real
broker process included, with no crash, hang, memory growth or wrong model accepted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedbus.bench import fuzz

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("target", ["envelope", "chunk", "header", "job", "config", "cli"])
def test_in_process_targets_survive_a_sample(target: str, tmp_path: Path) -> None:
    tally = fuzz.fuzz_in_process(target, 400, random.Random(7), 5.0, tmp_path)
    assert tally.inputs == 400
    assert tally.findings == 0, (tally.crashes + tally.hangs + tally.wrong)[:3]
    assert tally.refused > 0  # the sample reaches the refusals...
    assert tally.accepted > 0 or target == "cli"  # ...and valid input still gets through (cli mostly refuses)


def test_a_real_broker_survives_garbage_and_keeps_answering() -> None:
    report, figures = fuzz.run_fuzz(600, seed=3, target="broker", per_input_s=10.0)
    assert figures["inputs"] == 600
    assert figures["findings"] == 0, report


def test_the_harness_reports_a_crash_it_is_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle works: a decoder that raises a non-fedbus error is a finding, not a refusal."""

    def broken(data, max_size=0):
        raise IndexError("planted")

    monkeypatch.setattr(fuzz, "decode", broken)
    tally = fuzz.fuzz_in_process("envelope", 20, random.Random(1), 5.0, tmp_path)
    assert len(tally.crashes) == 20 and "planted" in tally.crashes[0]


def test_a_stream_completed_with_other_bytes_is_a_wrong_model() -> None:
    case = fuzz.StreamCase(0)
    other = fuzz.StreamCase(5)  # another model's stream, offered under the first one's name
    events = [(fuzz.m.Chunk(9, off, other.sums[off // fuzz.CHUNK]), other.data[off : off + fuzz.CHUNK])
              for off in range(0, other.total, fuzz.CHUNK)]  # fmt: skip
    events.append((fuzz.m.End(9, other.digest), b""))
    with pytest.raises(fuzz._WrongModel):
        fuzz.check_chunks(case, other.offer, events)


def test_found_by_the_fuzz_encode_refuses_an_int_msgpack_cannot_carry() -> None:
    """Was an OverflowError escaping ``encode`` (a script's metric of 2**70 crashed its send)."""
    from fedbus.errors import LocalProtocolError
    from fedbus.protocol.envelope import encode

    with pytest.raises(LocalProtocolError, match="cannot send job_event"):
        encode(fuzz.m.JobEvent("job", "log", data={"steps": 2**70}))
