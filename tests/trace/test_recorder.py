"""Recorder: every storage born and freed, in order; peaks derived from the log."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vramplan.trace.recorder import Recorder, live_at, peaks  # noqa: E402


def test_logs_births_and_deaths_in_order_with_bytes_dtype_and_phase():
    """1000 fp32 (+4000) then 500 bf16 (+1000), freed in reverse: four events."""
    with Recorder() as rec:
        rec.start_phase("forward")
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(500, dtype=torch.bfloat16)
        rec.start_phase("backward")
        del b
        del a
    assert [(e.nbytes, e.dtype, e.phase) for e in rec.events] == [
        (4000, "float32", "forward"), (1000, "bfloat16", "forward"),
        (-1000, "bfloat16", "backward"), (-4000, "float32", "backward")]
    assert rec.events[0].op == "aten::empty.memory_format"


def test_views_and_inplace_ops_make_no_events():
    """A view, a transpose and an in-place add share the storage of the one zeros tensor."""
    with Recorder() as rec:
        rec.start_phase("forward")
        a = torch.zeros(256, 4)
        v, t = a.view(-1), a.t()
        a.add_(1.0)
        del a, v, t
    assert [e.nbytes for e in rec.events] == [4096, -4096]


def test_peaks_start_from_what_warmup_left_and_phase_peaks_from_phase_start():
    """Warm-up leaves 400 B live (a state); the measured step adds 800 B then frees it."""
    with Recorder() as rec:
        rec.start_step(0)
        rec.start_phase("forward")
        state = torch.empty(100)  # 400 B, kept
        tmp = torch.empty(1000)  # 4000 B, warm-up only
        del tmp
        rec.start_step(1)
        rec.start_phase("forward")
        act = torch.empty(200)  # 800 B
        rec.start_phase("optimizer")
        del act
    pk = peaks(rec.events, rec.marks, from_step=1)
    assert pk.peak_bytes == 1200  # 400 + 800; the warm-up's 4400 is not counted
    assert pk.phase_peaks == {"forward": 1200, "optimizer": 1200}
    assert [e.nbytes for e in live_at(rec.events, pk.index).values()] == [400, 800]
    del state


def test_a_resident_storage_freed_in_the_step_is_logged_and_its_address_reused():
    """A parameter whose data is replaced frees its resident storage (-4000 B logged)."""
    p = torch.nn.Parameter(torch.empty(1000))
    resident = {p.untyped_storage()._cdata: 4000}
    with Recorder(resident=resident) as rec:
        rec.watch_resident([p.untyped_storage()])
        rec.start_phase("forward")
        p.data = p.data.to(torch.bfloat16)
    assert [(e.op, e.nbytes) for e in rec.events] == [("aten::_to_copy", 2000),
                                                      ("resident", -4000)]
