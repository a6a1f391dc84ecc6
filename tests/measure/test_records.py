"""Records (atomic JSONL append, truncated lines, resume ids) and matrix validation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from vramplan.measure.matrix import load_matrix, select
from vramplan.measure.records import (TruncatedRecordWarning, append_record, read_records,
                                      recorded_case_ids)
from vramplan.specs import SpecError


def _rec(case_id: str, outcome: str = "ok") -> dict:
    """A minimal record."""
    return {"case_id": case_id, "outcome": outcome, "measured": {"peak_allocated_bytes": 1}}


def test_append_and_read_roundtrip(tmp_path):
    """Appended records read back in order; ids for resume."""
    path = tmp_path / "sub" / "r.jsonl"
    append_record(path, _rec("a"))
    append_record(path, _rec("b", "oom"))
    text = path.read_text()
    assert text.count("\n") == 2 and text.endswith("\n")
    assert [r["case_id"] for r in read_records(path)] == ["a", "b"]
    assert recorded_case_ids(path) == {"a", "b"}
    assert recorded_case_ids(tmp_path / "missing.jsonl") == set()


def test_append_never_rewrites(tmp_path):
    """Appending keeps the inode and the earlier bytes."""
    path = tmp_path / "r.jsonl"
    append_record(path, _rec("a"))
    ino, first = path.stat().st_ino, path.read_bytes()
    append_record(path, _rec("b"))
    assert path.stat().st_ino == ino and path.read_bytes().startswith(first)


def test_append_rejects_unknown_outcome(tmp_path):
    """Only ok / oom / error are valid outcomes."""
    with pytest.raises(SpecError):
        append_record(tmp_path / "r.jsonl", _rec("a", "maybe"))


def test_truncated_last_line_is_reported_and_skipped(tmp_path):
    """A half-written line is warned about and skipped; later appends stay readable."""
    path = tmp_path / "r.jsonl"
    append_record(path, _rec("a"))
    with path.open("a") as fh:
        fh.write('{"case_id": "b", "outc')  # a writer died mid-line
    with pytest.warns(TruncatedRecordWarning, match="truncated last line"):
        assert [r["case_id"] for r in read_records(path)] == ["a"]
    with pytest.raises(SpecError, match=r"r.jsonl:2"):
        read_records(path, strict=True)
    assert recorded_case_ids(path) == {"a"}  # so resume measures b again
    append_record(path, _rec("c"))  # starts on a fresh line
    with pytest.warns(TruncatedRecordWarning, match="malformed line"):
        assert [r["case_id"] for r in read_records(path)] == ["a", "c"]


def test_concurrent_appends_do_not_interleave(tmp_path):
    """Two processes appending 5 kB lines never interleave."""
    path = tmp_path / "r.jsonl"
    code = textwrap.dedent(f"""
        import sys
        from vramplan.measure.records import append_record
        for i in range(50):
            append_record({str(path)!r}, {{"case_id": sys.argv[1] + str(i), "outcome": "ok",
                                          "pad": "x" * 5000}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, tag]) for tag in "pq"]
    assert all(p.wait() == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["pad"] for line in lines)


MATRIX = """
name = "t"
description = "test"
[defaults]
warmup_steps = 1
measured_steps = 2
lora_dropout = 0
[[case]]
id = "a"
model = "validation/configs/llama-tiny.json"
method = "lora"
seq_len = 128
[[case]]
id = "b-stream"
model = "llama-2-70b"
build = "streaming"
"""


def _write(tmp_path, text):
    """Write a matrix file."""
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_load_matrix(tmp_path):
    """Defaults merge into cases; selection by id and glob."""
    m = load_matrix(_write(tmp_path, MATRIX))
    assert m.name == "t" and [c.id for c in m.cases] == ["a", "b-stream"]
    a, b = m.cases
    assert a.train.method == "lora" and a.train.seq_len == 128 and a.measured_steps == 2
    assert a.train.lora_dropout == 0.0 and isinstance(a.train.lora_dropout, float)
    assert b.build == "streaming" and b.train.method == "qlora"
    assert [c.id for c in select(m.cases, "b-*")] == ["b-stream"]
    assert [c.id for c in select(m.cases, ["a", "zzz"])] == ["a"]


@pytest.mark.parametrize("extra, match", [
    ('seq_lenn = 3', "case 'c'.*unknown key.*seq_lenn"),
    ('method = "qlorra"', "case 'c'.*--method 'qlorra'"),
    ('seq_len = "512"', "case 'c'.*seq_len must be int"),
    ('grad_ckpt = 1', "case 'c'.*grad_ckpt must be bool"),
    ('build = "fast"', "case 'c'.*build 'fast'"),
    ('measured_steps = 0', "case 'c'.*measured_steps"),
    ('lora_dropout = 1.5', "case 'c'.*lora-dropout"),
])
def test_invalid_case_values_name_the_case(tmp_path, extra, match):
    """Bad keys, values and types raise SpecError naming the case."""
    text = MATRIX + f'[[case]]\nid = "c"\nmodel = "x"\n{extra}\n'
    with pytest.raises(SpecError, match=match):
        load_matrix(_write(tmp_path, text))


def test_duplicate_ids_and_missing_fields(tmp_path):
    """Duplicate ids, missing id/model and unknown keys are errors."""
    with pytest.raises(SpecError, match="duplicate case id 'a'"):
        load_matrix(_write(tmp_path, MATRIX + '[[case]]\nid = "a"\nmodel = "x"\n'))
    with pytest.raises(SpecError, match="needs a 'model'"):
        load_matrix(_write(tmp_path, MATRIX + '[[case]]\nid = "z"\n'))
    with pytest.raises(SpecError, match="needs an 'id'"):
        load_matrix(_write(tmp_path, MATRIX + '[[case]]\nmodel = "x"\n'))
    with pytest.raises(SpecError, match="unknown top-level"):
        load_matrix(_write(tmp_path, "nmae = 1\n" + MATRIX))
    with pytest.raises(SpecError, match=r"\[defaults\].*unknown key"):
        load_matrix(_write(tmp_path, MATRIX.replace("warmup_steps = 1", "warmup = 1")))


def test_shipped_matrices_load_without_torch(root):
    """The shipped matrices are valid and loading them never imports torch."""
    code = ("import sys, glob\nfrom vramplan.measure.matrix import load_matrix\n"
            "for p in sorted(glob.glob('validation/matrices/*.toml')): load_matrix(p)\n"
            "assert 'torch' not in sys.modules, 'matrix loading imported torch'\n"
            "import vramplan.measure.records\nassert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    names = {p.stem for p in (root / "validation/matrices").glob("*.toml")}
    assert {"cpu-ci", "cpu-smoke", "h200"} <= names
    ci = load_matrix(root / "validation/matrices/cpu-ci.toml")
    assert len(ci.cases) >= 24
    for case in ci.cases:
        assert (root / case.model).is_file(), case.model


def test_harness_never_imports_the_estimator(root):
    """vramplan.measure must not import vramplan.model."""
    import re

    pattern = re.compile(r"^\s*(from\s+vramplan\.model\b|import\s+vramplan\.model\b|"
                         r"from\s+vramplan\s+import\s+.*\bmodel\b)", re.M)
    for path in (root / "vramplan" / "measure").glob("*.py"):
        assert not pattern.search(path.read_text()), path
