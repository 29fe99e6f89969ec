"""Multiple-choice accuracy: the file layouts, the scores against Hugging Face's model on the export,
TP 2 and FSDP dp 2 against one device, and a run that learns the right endings scoring above chance."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from argonne_dt.inference import load_model
from argonne_dt.config import DataConfig
from argonne_dt.data import DataError
from argonne_dt.downstream import MultipleChoiceScores, MultipleChoiceTask, Question, encode_choices, read_questions
from helpers.documents import write_parquet
from helpers.models import tiny_checkpoint
from helpers.multiple_choice import RIGHT, SUBJECTS, write_task
from helpers.processes import run_distributed

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "story.jsonl")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("mc") / "ckpt")


def test_both_layouts_read_alike_and_bad_lines_are_named(tmp_path, task_file):
    plain = write_task(tmp_path / "plain.jsonl", layout="plain")
    assert read_questions(task_file) == read_questions(plain)
    assert len(read_questions(task_file, limit=5)) == 5
    bad = tmp_path / "bad.jsonl"
    for line, message in [('{"ctx": "a", "endings": ["b", "c"]}', r"bad.jsonl:2: expected a JSON object with ctx"),
                          ('{"ctx": "a", "endings": ["b", "c"], "label": 2}', r"bad.jsonl:2: the answer 2 is not"),
                          ("{not json", r"bad.jsonl:2: not JSON"),
                          ('{"context": "a", "choices": ["b"], "answer": 0}', "at least two non-empty")]:
        bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n' + line + "\n")
        with pytest.raises(DataError, match=message):
            read_questions(bad)
    with pytest.raises(DataError, match="cannot read the multiple-choice file"):
        read_questions(tmp_path / "missing.jsonl")
    # A byte order mark (as some editors save UTF-8) starts the text, not the first JSON object.
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + task_file.read_bytes())
    assert read_questions(marked) == read_questions(task_file)


def test_an_empty_context_without_bos_is_refused_by_its_line(tmp_path):
    """Without data.add_bos the first token of an ending after an empty context has nothing to be
    predicted from (its log-likelihood would be that of the other tokens only, or 0 for one token)."""
    task = tmp_path / "empty.jsonl"
    task.write_text('{"context": "The sky is", "choices": ["blue", "loud"], "answer": 0}\n\n'
                    '{"context": " ", "choices": ["blue", "loud"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:3: an empty context with data.add_bos=false .*data.add_bos=true"):
        MultipleChoiceTask(task, DataConfig(add_bos=False), 64)
    assert len(MultipleChoiceTask(task, DataConfig(), 64).choices) == 4


def test_whitespace_ending_the_context_starts_the_ending():
    """As lm-evaluation-harness splits a choice: "France is " + "Paris" scores the tokens of " Paris",
    the same tokens as "France is" + "Paris", and the context's tokens are the same as without the space."""
    spaced, plain = encode_choices([Question("The capital of France is ", ("Paris", "Rome"), 0),
                                    Question("The capital of France is", ("Paris", "Rome"), 0)], DataConfig(), 64, "t")[::2]
    assert spaced.tokens == plain.tokens and spaced.scored == plain.scored == 1


def test_accuracy_per_token_per_character_and_unnormalized():
    # Choice 0: -6 over 3 tokens (-2 each) and 4 characters (-1.5); choice 1: -5 over 1 token and 10 characters.
    scores = MultipleChoiceScores([[-6.0, -5.0]], [[3, 1]], [[4, 10]], [0])
    assert (scores.accuracy(), scores.accuracy(per="character"), scores.accuracy(per=None)) == (1.0, 0.0, 0.0)
    assert scores.metrics() == {"accuracy": 1.0, "accuracy_per_char": 0.0, "accuracy_unnormalized": 0.0,
                                "questions": 1}


def _hugging_face_log_likelihoods(hf_dir: Path, task: MultipleChoiceTask) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    sums = [[] for _ in task.answers]
    with torch.no_grad():
        for choice in task.choices:
            tokens = torch.tensor([choice.tokens])
            log_probs = torch.log_softmax(hf(tokens[:, :-1]).logits.double(), dim=-1)[0]
            picked = log_probs.gather(1, tokens[0, 1:, None])[-choice.scored:]
            sums[choice.question].append(picked.sum().item())
    return sums


def test_scores_equal_hugging_face_on_the_export(checkpoint, task_file, tmp_path):
    from argonne_dt.hf import export_hf

    model, cfg = load_model(checkpoint)
    task = MultipleChoiceTask(task_file, cfg.data, cfg.model.max_seq_len)
    # Small batches: several forward passes, padding to the batch's longest choice.
    ours = task.score(model, torch.device("cpu"), tokens_per_batch=64)
    theirs = _hugging_face_log_likelihoods(export_hf(checkpoint, tmp_path / "hf", dtype="fp32"), task)
    assert len(ours.log_likelihoods) == 12 and all(len(lls) == 4 for lls in ours.log_likelihoods)
    difference = max(abs(a - b) for mine, hf in zip(ours.log_likelihoods, theirs) for a, b in zip(mine, hf))
    assert difference < 1e-4
    # The unpadded, one-choice-per-pass scores are the same: padding changes nothing.
    alone = task.score(model, torch.device("cpu"), tokens_per_batch=1)
    assert max(abs(a - b) for x, y in zip(alone.log_likelihoods, ours.log_likelihoods) for a, b in zip(x, y)) < 1e-5


def _score_under(checkpoint: str, task_file: str, parallel: dict) -> list[list[float]]:
    from argonne_dt.config import ParallelConfig
    from argonne_dt.distributed import build_layout

    layout = build_layout(ParallelConfig(**parallel), "cpu")
    model, cfg = load_model(checkpoint, "cpu", layout)
    task = MultipleChoiceTask(task_file, cfg.data, cfg.model.max_seq_len)
    return task.score(model, torch.device("cpu"), layout=layout, tokens_per_batch=96).log_likelihoods


def _tp2_and_fsdp_dp2(checkpoint: str, task_file: str, bad_file: str) -> dict:
    import traceback

    try:
        MultipleChoiceTask(bad_file, DataConfig(), 64)
        error = None
    except DataError as err:  # where it was raised: --debug shows this traceback
        error = (str(err), traceback.extract_tb(err.__traceback__)[-1].name)
    return {"tp2": _score_under(checkpoint, task_file, {"tp": 2, "dp": 1}),
            "dp2": _score_under(checkpoint, task_file, {"tp": 1, "dp": 2}), "error": error}


@pytest.mark.distributed
def test_tp2_and_fsdp_dp2_score_as_one_device(checkpoint, task_file, tmp_path):
    model, cfg = load_model(checkpoint)
    alone = MultipleChoiceTask(task_file, cfg.data, cfg.model.max_seq_len).score(model, torch.device("cpu"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 5}\n')
    per_rank = run_distributed(_tp2_and_fsdp_dp2, 2, str(checkpoint), str(task_file), str(bad))
    # A bad file stops both ranks with one message; rank 0, which read it, keeps the traceback to the line
    # that found it.
    message = f"{bad}:1: the answer 5 is not the index of one of its 2 choices"
    assert per_rank[0]["error"] == (message, "_question") and per_rank[1]["error"][0] == message
    for kind in ("tp2", "dp2"):
        assert per_rank[0][kind] == per_rank[1][kind]
        difference = max(abs(a - b) for x, y in zip(per_rank[0][kind], alone.log_likelihoods) for a, b in zip(x, y))
        assert difference < 1e-4, kind


def _train_on_the_right_endings(job: str, corpus: str, task_file: str) -> dict:
    from argonne_dt.config import load_config
    from argonne_dt.trainer import train

    words = ["--model.vocab_size=151665", "--model.hidden_size=64", "--model.num_layers=1", "--model.num_heads=4",
             "--model.num_kv_heads=2", "--model.head_dim=16", "--model.max_seq_len=64", "--data.seq_len=32",
             f"--data.paths={corpus}", "--data.eval_split=0", "--data.min_tokens=1", "--data.num_workers=1",
             "--optim.lr=1e-2", "--optim.min_lr=1e-3", "--optim.warmup_steps=2",
             "--train.steps=8", "--train.micro_batch_size=4", "--train.dtype=fp32", "--checkpoint.every=0",
             "--metrics.log_every=10", f"--train.downstream_file={task_file}", "--train.downstream_every=4",
             f"--job.dir={job}"]
    return train(load_config(None, words))


@pytest.mark.distributed
@pytest.mark.e2e
def test_a_run_trained_on_the_right_endings_scores_above_chance(tmp_path, task_file):
    texts = [f"In the story, {subject} {right}." for subject, right in zip(SUBJECTS, RIGHT)] * 8
    write_parquet(tmp_path / "right.parquet", texts, row_group_size=16)
    job = tmp_path / "job"
    run_distributed(_train_on_the_right_endings, 1, str(job), str(tmp_path / "right.parquet"), str(task_file),
                    timeout_s=240)
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "downstream_accuracy" in r]
    assert [r["step"] for r in scored] == [4, 8] and all(r["downstream_questions"] == 12 for r in scored)
    assert scored[-1]["downstream_accuracy"] >= 0.75  # chance: 0.25
    # The same accuracy from the command line, on the saved checkpoint (one process).
    done = subprocess.run([sys.executable, "launch/evaluate.py", "--checkpoint", str(job), "--multiple-choice",
                           str(task_file)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["accuracy"] == scored[-1]["downstream_accuracy"] and result["questions"] == 12
