"""benchmarks/memory_check.py: its reading of throughput results, and the recorded GPU peaks.

`test_recorded_peaks_are_within_20_percent` is the acceptance check of the memory model: it reads
every `benchmarks/results/*.json` written by `benchmarks/train_throughput.py` and requires each
megatron run's estimate to be within 20% of the measured peak (skipped until results exist).
"""

import importlib.util
import json
from pathlib import Path

import pytest

from megafleet.memory import Parallel, Recompute, estimate_memory
from megafleet.model_shape import NAMED_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "memory_check", ROOT / "benchmarks" / "memory_check.py"
)
memory_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_check)


def run(**kw):
    base = {
        "shape": "qwen3-1.7b",
        "seq_len": 4096,
        "micro_batch_size": 1,
        "tp": 1,
        "pp": 1,
        "world_size": 1,
        "recompute_granularity": "none",
    }
    return {**base, **kw}


def estimate(par=Parallel(), rc=Recompute(), seq=4096, **kw):
    return estimate_memory(NAMED_CONFIGS["qwen3-1.7b"], par, seq, 1, rc, **kw).allocated_gib


def test_reads_runs_and_flags_errors_beyond_tolerance(tmp_path, capsys):
    good = estimate() * 1.1
    results = {
        "device": "H200",
        "runs": [
            run(name="close", peak_mem_gb=good),
            run(name="hf baseline", framework="transformers", peak_mem_gb=1.0),  # skipped
            run(
                name="tp2",
                tp=2,
                world_size=2,
                sequence_parallel=True,
                peak_mem_gb=estimate(Parallel(tp=2, sequence_parallel=True)),
            ),
        ],
    }
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(results))
    assert memory_check.main([str(path), "--min-runs", "2"]) == 0
    assert "2 run(s) checked" in capsys.readouterr().out
    assert memory_check.main([str(path), "--min-runs", "3"]) == 1  # too few runs
    capsys.readouterr()
    results["runs"].append(run(name="far", peak_mem_gb=estimate() * 1.5))
    path.write_text(json.dumps(results))
    assert memory_check.main([str(path), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert [r["ok"] for r in rows] == [True, True, False]
    assert rows[0]["error"] == pytest.approx(1 / 1.1 - 1, abs=1e-3)
    # memory the runtime kept on purpose (deferred MoE expert gradients) joins the estimate
    kept = estimate() * 0.5
    results["runs"] = [run(name="deferred", peak_mem_gb=estimate() * 1.5, moe_wgrad_kept_gib=kept)]
    path.write_text(json.dumps(results))
    assert memory_check.main([str(path)]) == 0


def test_units_kinds_nested_groups_and_assumptions(tmp_path):
    est = estimate(rc=Recompute("full", "uniform", 1))
    nested = {
        "model_config": NAMED_CONFIGS["qwen3-1.7b"],
        "seq_len": 4096,
        "parallel": {"tensor_model_parallel_size": 1},
        "recompute": {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        },
        "peak_mem_gb": est * 2**30 / 1e9,
        "peak_mem_unit": "GB",
    }
    (row,) = memory_check.check_file(_write(tmp_path, nested), 0.2)
    assert row["error"] == pytest.approx(0, abs=1e-3)
    foreach = dict(nested, assumptions={"optimizer_impl": "foreach"})
    (row,) = memory_check.check_file(_write(tmp_path, foreach), 0.2)
    assert row["estimate_gib"] > est  # the optimizer-step temporaries now set the peak
    assert memory_check.runs_in({"convert": "other evidence"}) == []


def _write(tmp_path, obj) -> Path:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(obj))
    return path


def _result_files() -> list[Path]:
    folder = ROOT / "benchmarks" / "results"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            if memory_check.runs_in(json.loads(path.read_text())):
                out.append(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
    return out


@pytest.mark.parametrize("path", _result_files() or [None], ids=lambda p: p.name if p else "none")
def test_recorded_peaks_are_within_20_percent(path):
    if path is None:
        pytest.skip("no throughput results with peak_mem_gb in benchmarks/results/ yet")
    rows = memory_check.check_file(path, 0.2)
    bad = [
        f"{r['run']}: estimate {r['estimate_gib']} GiB vs measured {r['measured_gib']} GiB "
        f"({100 * r['error']:+.0f}%)"
        for r in rows
        if not r["ok"]
    ]
    assert not bad, "\n".join(bad)
