"""The GPU check runs on a bare torch: only torch, numpy and this package, no training extras."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_THE_GPU_MACHINE = ("torchdata", "pyarrow", "tensorboard", "transformers", "tokenizers", "safetensors")

BLOCKER = f'''
import sys

class NotInstalled:
    """Imports of what the GPU machine does not have fail, as they would there."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_THE_GPU_MACHINE!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
        return None

sys.meta_path.insert(0, NotInstalled())
'''


@pytest.mark.e2e
def test_gpu_check_runs_on_cpu_without_the_training_extras_and_reports_every_check(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    # No C compiler on PATH: the compile check must say it is skipped and why.
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "PATH": str(Path(sys.executable).parent),
           "OMP_NUM_THREADS": "1"}
    env.pop("CC", None)
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small",
                           "--budget-scale", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    checks = {line["check"]: line for line in lines}
    assert list(checks) == ["machine", "train_bf16", "kv_cache_bf16", "dcp_roundtrip_sync", "dcp_roundtrip_async",
                            "compile", "memory_none", "memory_selective", "memory_full", "step_time", "collectives",
                            "summary"]
    assert checks["compile"]["pass"] is None and "no C compiler" in checks["compile"]["skipped"]
    assert checks["summary"]["all_pass"], checks["summary"]
    for mode in ("none", "selective", "full"):
        memory = checks[f"memory_{mode}"]
        assert memory["pass"] and 0.9 < memory["measured_over_planned"] < 1.1
    assert all("budget_s" in line and "seconds" in line for name, line in checks.items()
               if name not in ("machine", "summary"))
