"""The run log's fast line for a passed phase is the very text the general encoding gives."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_runs.runlog import _ENCODER, _passed_line, report_entry

node_ids = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=()), max_size=40) | st.text(max_size=40)


@given(
    nodeid=node_ids,
    when=st.sampled_from(["setup", "call", "teardown"]),
    duration=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    worker=st.none() | st.text(max_size=8),
)
def test_the_fast_line_of_a_passed_phase_is_the_encoded_line(
    nodeid: str, when: str, duration: float, worker: str | None
) -> None:
    node = SimpleNamespace(gateway=SimpleNamespace(id=worker)) if worker is not None else None
    report = pytest.TestReport(nodeid, ("f.py", 0, "t"), {}, "passed", None, when, [], duration)  # type: ignore[arg-type]
    if node is not None:
        report.node = node  # type: ignore[attr-defined]
    ts = "2026-11-27T09:50:00.123456Z"
    fast = _passed_line(ts, report)
    assert fast is not None
    assert fast == _ENCODER.encode({"ts": ts, "event": "report", **report_entry(report)})
    json.loads(fast)


def test_a_failed_or_odd_phase_takes_the_general_way() -> None:
    failed = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "failed", "boom", "call", [], 0.5)
    assert _passed_line("ts", failed) is None
    nan = pytest.TestReport("t.py::t", ("t.py", 0, "t"), {}, "passed", None, "call", [], float("nan"))
    assert _passed_line("ts", nan) is None
