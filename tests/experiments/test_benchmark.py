"""experiments/benchmark.py --quick runs every comparison and reports finite, positive numbers (no timing goals)."""

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
def test_quick_benchmark_reports_every_row(tmp_path):
    output = tmp_path / "benchmark_quick.json"
    # One torch thread per worker: on a shared CI machine, oversubscribed OpenMP threads make steps erratic.
    completed = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--threads", "1", "--output", str(output)],
                               capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())

    expected = [row.name for row in _benchmark_module().build_rows(_benchmark_module().QUICK)]
    assert list(result["rows"]) == expected
    machine = result["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1 and machine["torch"].startswith("2.")
    for name, row in result["rows"].items():
        assert len(row["configs"]) >= 2, name
        for index, entry in enumerate(row["configs"]):
            where = f"{name}/{entry['label']}"
            assert entry["status"] == "ok", where
            timing = entry["seconds_per_unit"]
            assert timing["n"] == row["reps"], where
            assert all(_positive(timing[k]) for k in ("median", "min", "max")), where
            assert timing["min"] <= timing["median"] <= timing["max"], where
            if entry["config"]["kind"] != "matmul":  # the matmul reference has FLOP/s, not samples/s
                assert _positive(entry["samples_per_second"]), where
            assert _positive(entry["worker"]["peak_rss_mib"]), where
            if index > 0 and name != "mfu":  # mfu compares a step with a matmul: its figure is row["mfu"]
                assert all(_positive(v) for v in entry["time_ratio_vs_baseline"].values()), where
    mfu = result["rows"]["mfu"]["mfu"]
    assert _positive(mfu["median"]) and mfu["median"] < 1.5  # a step cannot beat the matmul peak by much
    assert _positive(mfu["flops_per_step"])
    # The second compile worker went through torch.compile and the first did not. --quick uses the "eager"
    # backend (Dynamo traces the UNet, no inductor code generation), so this row does not measure compiled
    # kernels; the full run uses inductor. The DDP row's baseline ran one process and its DDP worker two.
    eager, compiled = (entry["worker"] for entry in result["rows"]["compile"]["configs"])
    assert "compile_backend" not in eager
    assert compiled["compile_backend"] == _benchmark_module().QUICK.compile_backend == "eager"
    assert [entry["worker"]["world_size"] for entry in result["rows"]["ddp"]["configs"]] == [1, 2]
    overhead = result["framework_overhead"]
    assert all(math.isfinite(overhead[k]) for k in ("median", "min", "max"))

    table = completed.stdout
    for name in expected:
        assert name in table
    assert "framework overhead (sd_lightning L.Trainer step vs plain PyTorch loop)" in table


def test_only_rejects_unknown_rows(tmp_path):
    completed = subprocess.run([sys.executable, str(BENCHMARK), "--quick", "--only", "overhead,warp_drive",
                                "--output", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "--only: unknown row(s) warp_drive" in completed.stderr
    assert not (tmp_path / "x.json").exists()
