"""`megafleet status` pieces that need no host: the loss curve read on the node (downsampled,
first and last kept), the sparkline, and log tails in the order the files were written."""

from __future__ import annotations

import json
import os

from megafleet.jobs import nodectl
from megafleet.jobs.status import progress, sparkline


def test_the_loss_curve_keeps_first_and_last_and_at_most_sixty_points(tmp_path):
    log = tmp_path / "logging.jsonl"
    rows = [{"step": s, "loss": 10.0 / s} for s in range(1, 501)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 501, "lo')  # torn last line
    curve = nodectl.loss_curve(log)
    assert len(curve) == 60 and curve[0] == [1, 10.0] and curve[-1] == [500, 0.02]
    assert progress(rows[-1], curve)["first_loss"] == 10.0
    assert nodectl.loss_curve(tmp_path / "missing.jsonl") == []


def test_sparkline_spans_lowest_to_highest():
    assert sparkline([4.0, 3.0, 2.0, 1.0]) == "█▆▃▁"
    assert len(sparkline([float(i) for i in range(500)], width=40)) == 40
    assert sparkline([]) == "" and sparkline([2.0, 2.0]) == "▁▁"


def test_log_tails_come_file_by_file_in_the_order_they_were_written(tmp_path):
    run_dir = tmp_path
    worker = run_dir / "torchrun-logs" / "x" / "attempt_0" / "0"
    worker.mkdir(parents=True)
    (worker / "stdout.log").write_text("step 5 loss 1.0\n")
    (worker / "stderr.log").write_text("a warning\n")
    (run_dir / "node.log").write_text("starting torchrun\ntorchrun exited with code 0\n")
    for age, path in (
        (30, worker / "stderr.log"),
        (20, worker / "stdout.log"),
        (10, run_dir / "node.log"),
    ):
        os.utime(path, (1e9 - age, 1e9 - age))
    lines = nodectl.recent_lines(run_dir, {"ranks": [0]}, 5)
    assert lines == [
        "[rank0] a warning",
        "[rank0] step 5 loss 1.0",
        "starting torchrun",
        "torchrun exited with code 0",
    ]
