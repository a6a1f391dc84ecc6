"""StorageTracker: exact live bytes of storages created under it, peaks and phases."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vramplan.measure.tracker import StorageTracker  # noqa: E402


def test_counts_new_storage_bytes_and_frees():
    """+4000 bytes for 1000 fp32, back to zero when freed, peak kept."""
    with StorageTracker() as tr:
        a = torch.empty(1000, dtype=torch.float32)
        assert tr.current_bytes == 4000
        b = torch.empty(500, dtype=torch.bfloat16)
        assert tr.current_bytes == 5000
        del a
        assert tr.current_bytes == 1000
        del b
        assert tr.current_bytes == 0
    assert tr.peak_bytes == 5000


def test_views_and_inplace_do_not_double_count():
    """Views, slices and in-place ops share one storage."""
    with StorageTracker() as tr:
        a = torch.zeros(256, 4, dtype=torch.float32)
        v = a.view(-1)
        t = a.t()
        s = a[10:20]
        a.add_(1.0)
        assert tr.current_bytes == 4096
        del a, v, t
        assert tr.current_bytes == 4096  # the slice keeps the storage alive
        del s
        assert tr.current_bytes == 0
    assert tr.peak_bytes == 4096


def test_ignored_preexisting_storages_and_reset_peak():
    """Ignored storages are not counted; reset_peak restarts from live bytes."""
    w = torch.randn(64, 64)
    with StorageTracker(ignore={w.untyped_storage()._cdata}) as tr:
        x = w.detach()  # same storage as w: ignored
        assert tr.current_bytes == 0
        y = w * 2
        assert tr.current_bytes == 64 * 64 * 4
        del y, x
        assert tr.peak_bytes == 16384
        keep = torch.empty(10, dtype=torch.float64)
        tr.reset_peak()
        assert tr.peak_bytes == 80
        tmp = torch.empty(100, dtype=torch.float32)
        del tmp
        assert tr.current_bytes == 80 and tr.peak_bytes == 480
        del keep


def test_phase_peaks():
    """Each phase's peak starts from the bytes live when it begins."""
    with StorageTracker() as tr:
        tr.start_phase("forward")
        a = torch.empty(100, dtype=torch.float32)
        tr.start_phase("backward")
        b = torch.empty(1000, dtype=torch.float32)
        del b
        tr.start_phase("optimizer")
        del a
    assert tr.phase_peaks == {"forward": 400, "backward": 4400, "optimizer": 400}
    assert tr.peak_bytes == 4400


def test_autograd_saved_tensors_are_counted_until_backward():
    """Saved activations and gradients are counted."""
    w = torch.randn(32, 32, requires_grad=True)
    with StorageTracker(ignore={w.untyped_storage()._cdata}) as tr:
        x = torch.randn(8, 32)
        y = (x @ w).relu().sum()
        held = tr.current_bytes
        assert held >= 8 * 32 * 4 * 2  # x and the saved relu output
        y.backward()
        assert w.grad is not None
        assert tr.current_bytes >= 32 * 32 * 4  # the gradient is new and live


def fake_cuda(monkeypatch, nvml=True):
    """torch.cuda faked (no GPU), and pynvml faked (or absent: importing it fails)."""
    import sys
    import types

    state = {"alloc": 1000, "peak": 1000, "used": 5000}

    def reset():
        """Fake reset_peak_memory_stats."""
        state["peak"] = state["alloc"]

    def bump():  # every read sees a little more memory, as if the step allocated
        """Fake max_memory_allocated."""
        state["alloc"] += 10
        state["peak"] = max(state["peak"], state["alloc"])
        return state["peak"]

    fake = types.SimpleNamespace(
        NVMLError=RuntimeError, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlSystemGetDriverVersion=lambda: "570.1",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=state["used"], total=10**9),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            types.SimpleNamespace(pid=__import__("os").getpid(), usedGpuMemory=state["used"])])
    monkeypatch.setitem(sys.modules, "pynvml", fake if nvml else None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: reset())
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: bump())
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: state["peak"] + 512)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10**9 - state["used"] - 99, 10**9))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *a: {"num_alloc_retries": 2})
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a: {"segments": [
        {"total_size": 2 << 20, "allocated_size": 4096, "segment_type": "small"},
        {"total_size": 40 << 20, "allocated_size": 30 << 20, "segment_type": "large"}]})
    return state


def run_fake_cuda_steps(baseline, snapshot=False):
    """Three phases of a tiny full fine-tune measured through CudaProbe."""
    import types

    from vramplan.measure import probes
    from vramplan.measure.steps import run_steps
    from vramplan.specs import TrainSpec

    model = torch.nn.Linear(8, 8)
    model.config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(vocab_size=8))
    model.forward = lambda input_ids, labels: types.SimpleNamespace(
        loss=torch.nn.functional.linear(input_ids.float(), model.weight).sum())
    train = TrainSpec(method="full", precision="fp32", optimizer="sgd", seq_len=8)
    return run_steps(model, train, "cpu", warmup=1, measured=2,
                     probe=probes.CudaProbe(baseline, snapshot=snapshot))


def test_cuda_probe_protocol_with_fake_cuda_and_nvml(monkeypatch):
    """CudaProbe + NvmlSampler driven through run_steps with torch.cuda and pynvml faked (no GPU)."""
    from vramplan.measure import probes

    fake_cuda(monkeypatch)
    baseline, facts = probes.nvml_baseline()
    assert baseline == 5000 and facts == {"driver": "570.1", "device_memory_bytes": 10**9}
    m = run_fake_cuda_steps(baseline)["measured"]
    assert m["resident_bytes"] == 1000 and m["baseline_bytes"] == 5000
    assert set(m["phases"]) == {"forward", "backward", "optimizer"}
    assert m["peak_allocated_bytes"] == max(m["phases"].values())
    assert m["peak_reserved_bytes"] == max(m["phases_reserved"].values())
    assert m["device_total_bytes"] == 5000  # the process's NVML usage
    assert m["device_level"].startswith("measured")
    # CUDA's own view of the device (sees managed memory), and the allocator's retries
    assert m["phases_cuda_used"] == {p: 5099 for p in ("forward", "backward", "optimizer")}
    assert m["cuda_total_bytes"] == 10**9 and m["num_alloc_retries"] == 2
    assert "snapshots" not in m


def test_snapshot_stores_a_segment_summary_per_phase(monkeypatch):
    from vramplan.measure import probes

    fake_cuda(monkeypatch)
    m = run_fake_cuda_steps(probes.nvml_baseline()[0], snapshot=True)["measured"]
    snap = m["snapshots"]["backward"]
    assert snap["segments"] == 2 and snap["reserved_bytes"] == 42 << 20
    assert snap["by_segment"][0] == [40 << 20, 30 << 20, "large"]


def test_without_nvml_the_record_and_check_say_device_level_not_measured(monkeypatch, capsys,
                                                                           calib):
    """pynvml absent: the record says why the device level is missing, stderr says so, and
    check reports "device level not measured" instead of counting it as agreement."""
    from vramplan.compare import compare_record
    from vramplan.measure import probes
    from vramplan.specs import TrainSpec

    fake_cuda(monkeypatch, nvml=False)
    baseline, facts = probes.nvml_baseline()
    assert baseline == 0 and "nvml_error" in facts
    m = run_fake_cuda_steps(baseline)["measured"]
    assert m["device_total_bytes"] is None
    assert m["device_level"].startswith("not measured: pynvml is not installed")
    assert "device level not measured" in capsys.readouterr().err
    record = {"case_id": "no-nvml", "model": "qwen2.5-0.5b", "device": "cuda", "outcome": "ok",
              "setup": TrainSpec(seq_len=256).as_dict(), "env": facts,
              "measured": {**m, "peak_allocated_bytes": 10**9, "peak_reserved_bytes": 10**9}}
    c = compare_record(record, calib, tolerance=10.0)
    assert "device_total_bytes" not in c.errors
    assert any(n.startswith("device level not measured (not measured: pynvml") for n in c.notes)


def test_a_resident_storage_that_dies_leaves_the_count_and_its_address_can_be_reused():
    """bitsandbytes' Linear4bit replaces a bias of another dtype by a cast copy: the old resident
    storage dies in the step. Its bytes leave the count, and a new storage at its address is
    counted (it used to be ignored forever)."""
    bias = torch.randn(1024)
    key, nbytes = bias.untyped_storage()._cdata, bias.untyped_storage().nbytes()
    tr = StorageTracker(ignore={key})
    tr.watch_resident([bias.untyped_storage()])
    with tr:
        del bias
        assert tr.current_bytes == -nbytes
        new = torch.empty(1024)
        assert tr.current_bytes == 0  # counted, whatever its address
        del new
    assert key not in tr._ignore
