"""experiments/benchmark.py --quick runs and reports finite, positive numbers (no timing goals).

CI runs the rows behind the benchmark's claims about the framework — Lightning against the plain floor, the real
sdl-train loop, and the estimate row's whole runs. The sampler and matmul workers (rows sampling and mfu) and the
other rows (the Lightning worker with config overrides that tests/models/test_config_groups.py trains) run in the
benchmark itself only (``--quick`` without ``--only``): three more worker start-ups were a sixth of this test.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "experiments" / "benchmark.py"


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("sdl_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~2 min on a quiet 2-core machine; >15 min when other test suites share the cores
def test_quick_benchmark_reports_its_rows(tmp_path):
    output = tmp_path / "benchmark_quick.json"
    rows = ["overhead", "overhead_sdl_train", "estimate"]
    every_row = [row.name for row in _benchmark_module().build_rows(_benchmark_module().QUICK)]
    assert set(rows) <= set(every_row)
    # One torch thread per worker: on a shared CI machine, oversubscribed OpenMP threads make steps erratic.
    completed = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--threads", "1", "--only", ",".join(rows),
                                "--output", str(output)], capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())

    assert list(result["rows"]) == rows
    machine = result["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1 and machine["torch"].startswith("2.")
    (run,) = result["rows"].pop("estimate")["runs"]
    assert all(_positive(run[k]) for k in ("estimate_seconds", "actual_fit_seconds", "estimate_over_actual"))
    assert run["estimate"]["validations"] == 2  # 100 steps, 50 per epoch, validation every epoch
    for name, row in result["rows"].items():
        assert len(row["configs"]) >= 2, name
        for index, entry in enumerate(row["configs"]):
            where = f"{name}/{entry['label']}"
            assert entry["status"] == "ok", where
            timing = entry["seconds_per_unit"]
            assert timing["n"] == row["reps"], where
            assert all(_positive(timing[k]) for k in ("median", "min", "max")), where
            assert timing["min"] <= timing["median"] <= timing["max"], where
            assert _positive(entry["samples_per_second"]), where
            assert _positive(entry["worker"]["peak_rss_mib"]), where
            if index > 0:
                assert all(_positive(v) for v in entry["time_ratio_vs_baseline"].values()), where
    # The sdl-train loop ran with the default callbacks and both default loggers, as sdl-train builds them.
    loop = result["rows"]["overhead_sdl_train"]["configs"][1]["worker"]
    assert {"EMACallback", "ModelCheckpoint", "SampleGridCallback", "FitTimeCallback"} <= set(loop["callbacks"])
    assert loop["loggers"] == ["ResumableCSVLogger", "WandbLogger"]
    for key in ("framework_overhead", "sdl_train_loop_overhead"):
        assert all(math.isfinite(result[key][k]) for k in ("median", "min", "max")), key

    table = completed.stdout
    for name in rows:
        assert name in table
    assert "framework overhead (sd_lightning L.Trainer step vs plain PyTorch loop)" in table
    assert "sdl-train loop overhead" in table


def test_only_rejects_unknown_rows(tmp_path):
    completed = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--only", "overhead,warp_drive",
                                "--output", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "--only: unknown row(s) warp_drive" in completed.stderr
    assert not (tmp_path / "x.json").exists()
