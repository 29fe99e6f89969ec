"""The README's main-job command, end to end under torchrun (CPU, gloo, TP 2), and the loss plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_torchrun_tiny_trains_and_plots(tmp_path):
    job = tmp_path / "tiny"
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "launch/train_dt.py", "--config", "tiny.toml", "--train.steps=4", "--metrics.log_every=2",
                "--data.seq_len=32", "--train.micro_batch_size=2", f"--job.dir={job}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert (job / "checkpoints" / "step-00000004" / ".metadata").exists()
    plotted = run([sys.executable, "launch/plot_loss.py", str(job)])
    assert plotted.returncode == 0, plotted.stderr
    png = job / "training_loss_vs_tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_override_exits_with_a_message():
    done = run([sys.executable, "launch/train_dt.py", "--config", "tiny.toml", "--trian.steps=3"])
    assert done.returncode == 2
    assert "unknown section [trian] (did you mean 'train'?)" in done.stderr
