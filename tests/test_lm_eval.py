"""The Hugging Face export under lm-evaluation-harness (the optional [eval] extra), offline, on a local
task: its per-choice log-likelihoods equal argonne_dt's multiple-choice scores of the checkpoint."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from argonne_dt.inference import load_model
from argonne_dt.downstream import MultipleChoiceTask
from argonne_dt.hf import export_hf
from test_downstream import tiny_checkpoint, write_task

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None,
                       reason='lm-evaluation-harness is not installed (pip install -e ".[eval]")'),
]

# HellaSwag's yaml in lm-eval, pointed at a local JSONL file: the `json` builder ships with `datasets`.
TASK_YAML = """task: argonne_story
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_on_the_export_agrees_with_our_scores(tmp_path):
    task_file = write_task(tmp_path / "story.jsonl")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    hf_dir = export_hf(checkpoint, tmp_path / "hf", dtype="fp32")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "argonne_story.yaml").write_text(TASK_YAML.format(path=task_file))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    lm_eval = str(Path(sys.executable).with_name("lm_eval"))
    done = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32,add_bos_token=True",
         "--tasks", "argonne_story", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples_file,) = glob.glob(str(tmp_path / "out" / "*" / "samples_argonne_story_*.jsonl"))
    samples = sorted((json.loads(line) for line in Path(samples_file).read_text().splitlines()),
                     key=lambda sample: sample["doc_id"])
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    accuracy = json.loads(Path(results_file).read_text())["results"]["argonne_story"]["acc,none"]

    model, cfg = load_model(checkpoint)
    ours = MultipleChoiceTask(task_file, cfg.data, cfg.model.max_seq_len).score(model, torch.device("cpu"))
    theirs = [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]
    assert len(theirs) == len(ours.log_likelihoods) == 12
    assert max(abs(a - b) for x, y in zip(theirs, ours.log_likelihoods) for a, b in zip(x, y)) < 1e-4
    # lm-eval's acc is the unnormalized one (its acc_norm divides by bytes, ours by tokens).
    assert accuracy == ours.accuracy(normalized=False)
