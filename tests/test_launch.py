"""The README's main-job command, end to end under torchrun (CPU, gloo, TP 2), and the loss plot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[1]


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_torchrun_tiny_trains_plots_and_teaches_a_student(tmp_path):
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
    png = job / "loss_vs_tokens.png"
    assert plotted.stdout.strip() == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The trained run teaches a fresh student (launch/distill.py, the same TP 2 machinery).
    student = tmp_path / "student"
    distilled = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "launch/distill.py", "--config", "distill-tiny.toml", f"--distill.teacher={job}",
                     "--train.steps=2", "--metrics.log_every=1", "--data.seq_len=32", "--train.micro_batch_size=2",
                     f"--job.dir={student}"])
    assert distilled.returncode == 0, distilled.stdout[-3000:] + distilled.stderr[-3000:]
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["kl"] > 0 and r["ce"] > 0 for r in records)
    refused = run([sys.executable, "launch/train_dt.py", "--config", "distill-tiny.toml"])
    assert refused.returncode == 2 and "run launch/distill.py with it" in refused.stderr


def test_bad_override_exits_with_a_message():
    done = run([sys.executable, "launch/train_dt.py", "--config", "tiny.toml", "--trian.steps=3"])
    assert done.returncode == 2
    assert "unknown section [trian] (did you mean 'train'?)" in done.stderr


@pytest.mark.parametrize("command, message", [
    (["launch/generate.py", "--checkpoint", "nowhere", "--prompt", "a", "--top-p", "0"],
     "config error: sampling top_p must be in (0, 1] (1: off), got 0.0"),
    (["launch/export_hf.py", "--checkpoint", "nowhere", "--out", "nowhere-hf"],
     "checkpoint error: nowhere: no complete checkpoint here"),
    (["launch/import_hf.py", "--hf", "nowhere", "--out", "nowhere-imported"],
     "hugging face format error: nowhere/config.json not found: not a Hugging Face model directory"),
    (["launch/prepare_data.py", "--out", "nowhere-shards", "nowhere.txt"], "data error: no such input file: nowhere.txt"),
])
def test_the_tools_end_a_bad_value_with_one_line(command, message):
    done = run([sys.executable, *command])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_sigterm_to_the_workers_saves_and_the_run_continues_on_fewer_ranks(tmp_path):
    """What a cluster scheduler does on preemption: SIGTERM to every process of the job. The run then
    continues on one process instead of two (dp 2 -> 1) with the same global batch."""
    import signal
    import time

    job = tmp_path / "preempted"
    settings = ["--config", "tiny.toml", "--parallel.tp=1", "--metrics.log_every=1", "--checkpoint.every=0",
                "--data.seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_size=4", f"--job.dir={job}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "launch/train_dt.py", *settings, "--train.steps=1000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait until training runs
            lines.append(line)
            if line.startswith("step 2/"):
                break
        workers = _children(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            time.sleep(1)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("preempted at step")]
    assert stopped, output[-3000:]
    step = int(stopped[0].split()[3].rstrip(";"))
    assert (job / "checkpoints" / f"step-{step:08d}" / ".metadata").exists()

    resumed = run([sys.executable, "launch/train_dt.py", *settings, f"--train.steps={step + 2}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "data: positions saved by 2 dp rank(s), continuing on 1" in resumed.stdout
    assert f"completed at step {step + 2}" in resumed.stdout
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, step + 3))
    assert [r["tokens_seen"] for r in train_records] == [4 * 32 * s for s in range(1, step + 3)]


def test_a_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path):
    import signal

    job = tmp_path / "restarted"
    # Without it, a restarted group can read the dead round's gloo addresses from torchrun's
    # shared store and fail to connect (pytorch/pytorch#135712); the README says to set it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
         "launch/train_dt.py", "--config", "tiny.toml", "--train.steps=6", "--metrics.log_every=1",
         "--checkpoint.every=2", "--data.seq_len=32", "--train.micro_batch_size=2", f"--job.dir={job}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                break
        os.kill(_children(proc.pid)[1], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    # The restarted group resumed from the newest checkpoint at the time of the kill.
    assert re.search(r"loading checkpoint \S+step-0000000[24] ", rest), rest[-3000:]
    assert "completed at step 6" in rest
