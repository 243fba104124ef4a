"""compare marks the timings a machine could not give (ranks > cores/GPUs) and keeps the rest."""

from __future__ import annotations

import csv
import json

from experiments.measure.record import METRICS_FILE, RunRecord
from experiments.report.parity import run_case
from experiments.report.plan import check_summary, check_sweep, write_check
from tests.helpers import compare

COMMON = [
    "train.steps=4",
    "train.log_every=2",
    "train.global_batch_size=16",
    "dataset.num_samples=128",
    "model=mlp",
    "model.hidden=16",
    "model.layers=2",
    "dataset.input_shape=[8]",
]
NOTE = "4 ranks share 2 cores on this node: test note"


def test_compare_marks_timings_that_are_not_meaningful(tmp_path):
    run_case([*COMMON, "strategy=single", "launcher=local"], tmp_path / "single-ws1")
    run_case(
        [*COMMON, "strategy=ddp", "launcher=torchrun", "launcher.nproc_per_node=2"], tmp_path / "ddp-ws2"
    )
    # Whatever this machine's core count, make one job the oversubscribed one and the other not.
    for name, meaningful, note in [("single-ws1", True, ""), ("ddp-ws2", False, NOTE)]:
        path = tmp_path / name / METRICS_FILE
        raw = json.loads(path.read_text())
        raw.update(timing_meaningful=meaningful, timing_note=note)
        path.write_text(json.dumps(raw))
    assert RunRecord.read(tmp_path / "ddp-ws2").timing_meaningful is False

    proc = compare(tmp_path)
    assert proc.returncode == 0, proc.stderr

    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert set(rows) == {"single-ws1", "ddp-ws2"}
    ddp, single = rows["ddp-ws2"], rows["single-ws1"]
    for col in ("samples/s", "scaling eff"):
        assert ddp[col].endswith("(oversub.)"), (col, ddp[col])
        assert "oversub" not in single[col], (col, single[col])
    # What the machine can give is not marked: memory, communication, loss.
    for col in ("state MiB (max rank)", "sent MiB/step", "final loss"):
        assert "oversub" not in ddp[col]

    lines = proc.stdout.splitlines()
    assert "(oversub.)" in next(line for line in lines if line.startswith("ddp-ws2"))
    assert "(oversub.)" not in next(line for line in lines if line.startswith("single-ws1"))
    report = (tmp_path / "report.md").read_text()
    note_lines = [line for line in report.splitlines() if NOTE in line]
    assert len(note_lines) == 1 and "ddp-ws2" in note_lines[0] and "single-ws1" not in note_lines[0]
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The advisor's prediction for each job's own config rides in its metrics.json, and the report
    # sets it beside the measurement; `make plan ARGS="check=<sweep>"` sums the errors.
    for name in ("single-ws1", "ddp-ws2"):
        assert rows[name]["plan step s"] and rows[name]["plan mem MiB"], rows[name]
        assert rows[name]["plan mem Δ"] in ("+0.0%", "-0.0%")  # an MLP's memory is counted exactly
    assert (tmp_path / "plan.png").is_file()
    checked = check_sweep(tmp_path, [])
    assert {c.job for c in checked} == {"single-ws1", "ddp-ws2"}
    summary = check_summary(checked)
    assert summary["memory_max_error"] < 0.01 and summary["timed_jobs"] == 1  # the other is oversub.
    write_check(tmp_path, checked)
    assert "step time MAPE" in (tmp_path / "plan_check.md").read_text()


def test_compare_without_oversubscription_has_no_marks(tmp_path):
    run_case([*COMMON, "strategy=single", "launcher=local"], tmp_path / "single-ws1")
    proc = compare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(oversub.)" not in proc.stdout
    report = (tmp_path / "report.md").read_text()
    assert "```\n\n## Reading this report" in report  # no note line under the table
