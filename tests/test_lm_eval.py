"""The Hugging Face export under lm-evaluation-harness (the optional [eval] extra), offline, on a local
task: its per-choice log-likelihoods equal argonne_dt's multiple-choice scores of the checkpoint, and its
accuracies our accuracies; it splits a choice into context and ending tokens as our evaluator does."""

import importlib.util

import pytest
import torch

from argonne_dt.inference import load_model
from argonne_dt.downstream import MultipleChoiceTask, Question, encode_choices
from argonne_dt.hf import export_hf
from helpers.models import tiny_checkpoint
from helpers.multiple_choice import write_task

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


def test_lm_eval_on_the_export_agrees_with_our_scores(tmp_path, monkeypatch):
    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_file = write_task(tmp_path / "story.jsonl")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    hf_dir = export_hf(checkpoint, tmp_path / "hf", dtype="fp32")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "argonne_story.yaml").write_text(TASK_YAML.format(path=task_file))
    # What `lm_eval --model hf --model_args pretrained=DIR,dtype=float32,add_bos_token=True --tasks
    # argonne_story --include_path DIR --log_samples` runs, without indexing lm-eval's own thousands of
    # task files (most of that command's time on a task this small).
    lm = HFLM(pretrained=str(hf_dir), dtype="float32", add_bos_token=True, device="cpu", batch_size=48)
    out = simple_evaluate(model=lm, tasks=["argonne_story"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    samples = sorted(out["samples"]["argonne_story"], key=lambda sample: sample["doc_id"])
    results = out["results"]["argonne_story"]

    model, cfg = load_model(checkpoint)
    ours = MultipleChoiceTask(task_file, cfg.data, cfg.model.max_seq_len).score(model, torch.device("cpu"))
    theirs = [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]
    assert len(theirs) == len(ours.log_likelihoods) == 12
    assert max(abs(a - b) for x, y in zip(theirs, ours.log_likelihoods) for a, b in zip(x, y)) < 1e-4
    # lm-eval's acc is the unnormalized one; its acc_norm divides by the ending's characters (len(str)).
    assert results["acc,none"] == ours.accuracy(per=None)
    assert results["acc_norm,none"] == ours.accuracy(per="character")

    # A context ending in whitespace: lm-eval moves it to the front of the ending, tokenizes the two as
    # one text and scores the tokens past the context's. Our choices are the same tokens, split alike.
    for context, ending in [("The capital of France is ", "Paris"), ("In the story,\n", "the fox ran."),
                            ("In the story, the red fox", " jumped")]:
        (choice,) = encode_choices([Question(context, (ending, "x"), 0)], cfg.data, 64, "task")[:1]
        context_tokens, ending_tokens = lm._encode_pair(context, ending)
        assert choice.tokens == tuple(context_tokens + ending_tokens) and choice.scored == len(ending_tokens)
