"""Multiple-choice accuracy (HellaSwag-style) of the model being trained, or of a checkpoint.

A task is a JSONL file the user gives (nothing is downloaded): one question per line, in
HellaSwag's layout ``{"ctx": ..., "endings": [...], "label": 0}`` or as ``{"context": ...,
"choices": [...], "answer": 0}``. Each choice is the context followed by that ending; its score
is the mean log-likelihood of the ending's tokens (per token, as build-nanogpt reports HellaSwag);
the log-likelihood divided by the ending's characters (lm-evaluation-harness's ``acc_norm``) and the
unnormalized sum (its ``acc``) are reported too. The per-token losses come from the
model as it trains: its final hidden states through its own lm_head (vocab-sharded under tensor
parallelism, gathered by FSDP2 inside the forward pass), ``logsumexp - logit[target]`` by
``F.cross_entropy(reduction="none")`` (under ``loss_parallel`` when the logits are vocab-sharded),
a few sequences at a time. No export, no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from .config import Config, DataConfig
from .data import DataError, computed_once
from .distributed import ParallelLayout, compute_dtype, full_value, local_device, mixed_precision
from .tokenizer import BOS_TOKEN, load_tokenizer

# Tokens of logits (tokens x vocab shard, fp32) formed at once by the scoring head.
HEAD_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    answer: int
    where: str = field(default="", compare=False)  # FILE:LINE, for errors found later


def _question(record, where: str) -> Question:
    """A JSON object in either layout as a ``Question``; anything else is a ``DataError`` naming ``where``."""
    layouts = (("ctx", "endings", "label"), ("context", "choices", "answer"))
    for context_key, choices_key, answer_key in layouts:
        if isinstance(record, dict) and {context_key, choices_key, answer_key} <= record.keys():
            context, choices, answer = record[context_key], record[choices_key], record[answer_key]
            break
    else:
        raise DataError(f"{where}: expected a JSON object with ctx / endings / label (HellaSwag) or "
                        "context / choices / answer")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if (not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(choice, str) and choice.strip() for choice in choices)):
        raise DataError(f"{where}: the context must be text and the choices a list of at least two non-empty texts")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: the answer {answer!r} is not the index of one of its {len(choices)} choices")
    return Question(context, tuple(choices), answer, where)


def read_questions(path: str | Path, limit: int = 0) -> list[Question]:
    """The questions of a JSONL file (the first ``limit``; 0: all)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte order mark is not JSON
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the multiple-choice file ({err})") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        questions.append(_question(record, f"{path}:{number}"))
        if limit and len(questions) == limit:
            break
    if not questions:
        raise DataError(f"{path}: no questions in the file")
    return questions


@dataclass(frozen=True)
class Choice:
    """One choice as the model reads it: ``tokens`` (context then ending), the last ``scored`` of
    which are the ending's; ``characters``: the length of the ending's text as given."""

    question: int
    index: int
    tokens: tuple[int, ...]
    scored: int
    characters: int


def encode_choices(questions: list[Question], data_cfg: DataConfig, max_len: int, source: str) -> list[Choice]:
    """Every choice tokenized as training documents are (BOS first), at most ``max_len`` + 1 tokens
    (the context's start is dropped when longer). The ending follows the context after one space,
    unless either side brings its own whitespace. As lm-evaluation-harness splits a choice: the
    context's trailing whitespace starts the ending; the context's own tokens come first, then those
    of context and ending tokenized as one text past the context's count."""
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    encode = tokenizer.backend_tokenizer.encode
    bos = [tokenizer.convert_tokens_to_ids(BOS_TOKEN)] if data_cfg.add_bos else []
    choices = []
    for number, question in enumerate(questions):
        context = question.context.rstrip()
        if not context and not bos:
            raise DataError(f"{question.where or source}: an empty context with data.add_bos=false leaves the "
                            "first token of each ending nothing to be predicted from: give a context, or set "
                            "data.add_bos=true")
        context_tokens = bos + encode(context, add_special_tokens=False).ids
        for index, text in enumerate(question.choices):
            trailing = question.context[len(context):]
            ending = trailing + text if trailing or text[:1].isspace() else " " + text
            ending_tokens = (bos + encode(context + ending, add_special_tokens=False).ids)[len(context_tokens):]
            tokens, scored = context_tokens + ending_tokens, len(ending_tokens)
            if not 0 < scored <= max_len:
                raise DataError(f"{question.where or source}: choice {index} has {scored} tokens of its own, "
                                f"not 1 to the model's {max_len} positions")
            choices.append(Choice(number, index, tuple(tokens[-(max_len + 1):]), scored, len(text)))
    return choices


def _token_losses(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) next-token losses from the final hidden states, through the model's lm_head, a few
    sequences at a time (a ``head`` for ``ArgonneModel.forward``: FSDP2 has the lm_head gathered there)."""
    rows = max(1, HEAD_CHUNK_TOKENS // targets.shape[1])
    losses = []
    for start in range(0, targets.shape[0], rows):
        logits = model.lm_head(hidden[start : start + rows])
        chunk_targets = targets[start : start + rows]
        vocab_sharded = isinstance(logits, DTensor) and any(p.is_shard(logits.ndim - 1) for p in logits.placements)
        with loss_parallel() if vocab_sharded else contextlib.nullcontext():
            token_losses = F.cross_entropy(logits.flatten(0, 1).float(), chunk_targets.flatten(), reduction="none")
        losses.append(full_value(token_losses).view(chunk_targets.shape))
    return torch.cat(losses)


def _batches(choices: list[Choice], tokens_per_batch: int, pad_multiple: int) -> list[list[Choice]]:
    """Consecutive choices grouped so that a batch padded to its longest holds at most ``tokens_per_batch``."""
    batches: list[list[Choice]] = []
    longest = 0
    for choice in choices:
        length = _padded(len(choice.tokens) - 1, pad_multiple)
        if batches and (len(batches[-1]) + 1) * max(longest, length) <= tokens_per_batch:
            batches[-1].append(choice)
            longest = max(longest, length)
        else:
            batches.append([choice])
            longest = length
    return batches


def _padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


@dataclass
class MultipleChoiceScores:
    """Per question and choice: summed log-likelihood of the ending, its token count and the
    characters of its text."""

    log_likelihoods: list[list[float]]
    token_counts: list[list[int]]
    character_counts: list[list[int]]
    answers: list[int]

    def accuracy(self, per: str | None = "token") -> float:
        """The share of questions whose answer scores highest, a choice's score being its log-likelihood
        per ``"token"`` or ``"character"`` of its ending, or (None) the log-likelihood itself."""
        lengths = {"token": self.token_counts, "character": self.character_counts,
                   None: [[1] * len(lls) for lls in self.log_likelihoods]}[per]
        right = 0
        for lls, counts, answer in zip(self.log_likelihoods, lengths, self.answers):
            scores = [ll / count for ll, count in zip(lls, counts)]
            right += max(range(len(scores)), key=scores.__getitem__) == answer
        return right / len(self.answers)

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy(), "accuracy_per_char": self.accuracy(per="character"),
                "accuracy_unnormalized": self.accuracy(per=None), "questions": len(self.answers)}


class MultipleChoiceTask:
    """A multiple-choice file read and tokenized once, on global rank 0, and received by every rank
    (a bad file stops every rank at start-up with the same message); ``score`` runs a model on it."""

    def __init__(self, path: str | Path, data_cfg: DataConfig, max_len: int, limit: int = 0):
        self.path = str(path)

        def read_and_encode():
            questions = read_questions(path, limit)
            return [q.answer for q in questions], encode_choices(questions, data_cfg, max_len, self.path)

        self.answers, self.choices = computed_once(read_and_encode)

    @classmethod
    def for_run(cls, cfg: Config) -> MultipleChoiceTask:
        """The task ``train.downstream_every`` asks for (``train.downstream_file``)."""
        return cls(cfg.train.downstream_file, cfg.data, cfg.model.max_seq_len, cfg.train.downstream_questions)

    @torch.no_grad()
    def score(self, model, device: torch.device, autocast=contextlib.nullcontext(),
              layout: ParallelLayout | None = None, tokens_per_batch: int = 2048) -> MultipleChoiceScores:
        """Score every choice with ``model`` (sharded as ``layout`` says). Each dp rank scores every
        dp-th question, its tp group together; all ranks run as many forward passes (FSDP2 gathers in
        each), and the log-likelihoods are summed over the dp group."""
        dp, dp_rank = (layout.dp, layout.dp_rank) if layout is not None else (1, 0)
        pad_multiple = layout.sequence_multiple if layout is not None else 1
        shares = [[c for c in self.choices if c.question % dp == rank] for rank in range(dp)]
        rounds = max(len(_batches(share, tokens_per_batch, pad_multiple)) for share in shares)
        batches = _batches(shares[dp_rank], tokens_per_batch, pad_multiple)
        widest = max(c.index for c in self.choices) + 1
        sums = torch.zeros(len(self.answers), widest, dtype=torch.float64, device=device)
        for round_index in range(rounds):
            # A rank with fewer batches repeats one and drops its result: every rank joins each pass.
            batch = batches[round_index] if round_index < len(batches) else (batches or [self.choices[:1]])[-1]
            losses = self._losses(model, batch, device, autocast, pad_multiple)
            if round_index < len(batches):
                for row, choice in enumerate(batch):
                    end = len(choice.tokens) - 1
                    sums[choice.question, choice.index] = -losses[row, end - choice.scored : end].double().sum()
        if dp > 1:
            dist.all_reduce(sums, group=layout.dp_group)
        counts: list[list[int]] = [[] for _ in self.answers]
        characters: list[list[int]] = [[] for _ in self.answers]
        for choice in self.choices:
            counts[choice.question].append(choice.scored)
            characters[choice.question].append(choice.characters)
        sums = sums.cpu()
        return MultipleChoiceScores([sums[q, : len(c)].tolist() for q, c in enumerate(counts)], counts, characters,
                                    self.answers)

    @staticmethod
    def _losses(model, batch: list[Choice], device: torch.device, autocast, pad_multiple: int) -> torch.Tensor:
        """Per-token losses (len(batch), T) of a batch padded on the right (causal attention keeps the
        padding out of every real position's loss)."""
        width = _padded(max(len(c.tokens) for c in batch) - 1, pad_multiple)
        tokens = torch.zeros(len(batch), width + 1, dtype=torch.long)
        for row, choice in enumerate(batch):
            tokens[row, : len(choice.tokens)] = torch.tensor(choice.tokens)
        tokens = tokens.to(device)
        with autocast:
            return model(tokens[:, :-1], targets=tokens[:, 1:], head=_token_losses)


def evaluate_multiple_choice(checkpoint: str, path: str, limit: int = 0, tokens_per_batch: int = 2048) -> dict:
    """Multiple-choice accuracy of a checkpoint (one process; its GPU when it has one)."""
    from .inference import load_model

    device = local_device()
    model, cfg = load_model(checkpoint, device=device)
    task = MultipleChoiceTask(path, cfg.data, cfg.model.max_seq_len, limit)
    autocast = mixed_precision(compute_dtype(cfg, device), device)
    scores = task.score(model, device, autocast, tokens_per_batch=tokens_per_batch)
    return {"task": path, **scores.metrics()}

