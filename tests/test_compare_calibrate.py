"""check's comparison logic and calibrate's least-squares fit, on synthetic records."""

from __future__ import annotations

import pytest

from vramplan.calibrate import check_fittable, fit
from vramplan.compare import compare_record, estimate_for
from vramplan.specs import SpecError, TrainSpec


def record(calib, device="cuda", scale=1.0, outcome="ok", capacity=None, **setup):
    """A record whose measured levels are the estimate's own, scaled."""
    r = {"case_id": f"c{len(setup)}-{scale}", "model": "qwen2.5-0.5b", "device": device,
         "setup": TrainSpec(seq_len=512, **setup).as_dict(), "outcome": outcome,
         "env": {"device_memory_bytes": capacity} if capacity else {}}
    est = estimate_for(r, calib)
    r["measured"] = {"peak_allocated_bytes": int(est.peak_allocated_bytes * scale),
                     "peak_reserved_bytes": int(est.peak_reserved_bytes * scale),
                     "device_total_bytes": int(est.device_total_bytes * scale)}
    return r


def test_exact_record_passes(calib):
    c = compare_record(record(calib), calib)
    assert c.ok and all(abs(e) < 1e-6 for e in c.errors.values())


def test_record_off_by_more_than_tolerance_fails(calib):
    c = compare_record(record(calib, scale=1.10), calib, tolerance=0.05)
    assert not c.ok and "off by" in c.problems[0]


def test_oom_that_the_model_says_fits_fails(calib):
    r = record(calib, outcome="oom", capacity=10**12)
    assert not compare_record(r, calib).ok
    r = record(calib, outcome="oom", capacity=10**6)  # predicted not to fit: consistent
    assert compare_record(r, calib).ok


def records_outside_the_allocator(calib, extras_mib):
    """CUDA records at seq 512/1024/2048 whose device total sits the given MiB above their
    (exactly predicted) reserved level."""
    records = []
    for seq, extra in zip((512, 1024, 2048), extras_mib):
        r = record(calib, method="lora", optimizer="adamw")
        r["setup"]["seq_len"] = seq
        est = estimate_for(r, calib)
        res = est.peak_reserved_bytes
        r["measured"] = {"peak_allocated_bytes": est.peak_allocated_bytes,
                         "peak_reserved_bytes": res, "device_total_bytes": res + extra * 2**20}
        r["case_id"] = f"s{seq}"
        records.append(r)
    return records


def test_calibrate_recovers_the_constant_outside_the_allocator(calib):
    records = records_outside_the_allocator(calib, (700, 701, 720))
    out = fit(records, base=calib)
    assert out["non_allocator"]["bytes"] == 701 * 2**20  # the median, robust to the 720
    assert out["fitted_on"] == ["s512", "s1024", "s2048"]
    # with the fitted constant the device level is off by at most (720 - 701) MiB here
    assert 0 < out["verdict"]["device_error"] <= 0.01


def test_calibrate_refuses_implausible_or_inconsistent_records(calib):
    r = record(calib)
    r["measured"]["device_total_bytes"] = r["measured"]["peak_reserved_bytes"] - 2**30
    with pytest.raises(SpecError, match="implausible"):
        fit([r, r])
    a, b = record(calib), record(calib)
    b["measured"]["device_total_bytes"] += 2**30
    with pytest.raises(SpecError, match="disagree"):
        fit([a, b])


def test_calibrate_refuses_analytic_terms_and_the_retired_slack():
    with pytest.raises(SpecError, match="derived by the analytic model"):
        check_fittable(["non_allocator", "weights.base"])
    with pytest.raises(SpecError, match="allocator replay"):
        check_fittable(["allocator_slack"])


def test_calibrate_refuses_a_fit_worse_than_its_base(calib):
    """Records whose device level sits 700 MiB above reserved, fitted from a base that already
    says 700 MiB: fine. The same records against a base of 900 MiB are also fine (the fit is
    better); a base that matches them better than the median does makes the fit refused."""
    records = records_outside_the_allocator(calib, (600, 700, 701))
    assert fit(records, base={**calib, "non_allocator": {"bytes": 900 * 2**20}})
    with pytest.raises(SpecError, match="worse than the base"):
        fit(records, base={**calib, "non_allocator": {"bytes": 650 * 2**20}})
