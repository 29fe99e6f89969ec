"""The batches of a tensor-parallel group: tensors by ``dist.broadcast``, the end of the data and
any error of the reading rank reach its peers."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from helpers.documents import documents, dp_layout, write_parquet
from helpers.processes import run_distributed

pytestmark = pytest.mark.distributed


def _as_arrays(batch: dict) -> dict:
    return {"input": batch["input"].numpy(), "target": batch["target"].numpy(), "dropped": batch["dropped"],
            "documents": batch["documents"]}


def _tp_group_reads(files: list[str]) -> dict:
    """On 2 ranks of one tp group (rank 0 reads): steady-state batches with the collectives spied
    on, the end of the data, and an error of the reader that is not a ``DataError``."""
    import torch.distributed as dist

    from argonne_dt.config import DataConfig
    from argonne_dt.data import QualityFilterTokenizer, batches_for

    cfg = DataConfig(paths=files, seq_len=15, num_workers=1, prefetch=2, tokenize_batch_size=3, min_tokens=1,
                     loop=False)
    group = dist.new_group([0, 1])
    # dp rank 0 of 1, read by rank 0; planned before the spies (the plan goes to every rank as an object).
    layout = dp_layout(0, 1, reads_data=dist.get_rank() == 0, tp_group=group)
    batches = batches_for(cfg, 2, layout)
    failing_batches = batches_for(cfg, 1, layout)
    calls = {"broadcast": [], "broadcast_object_list": 0}
    real_broadcast, real_objects = dist.broadcast, dist.broadcast_object_list

    def broadcast(tensor, *args, **kwargs):
        calls["broadcast"].append(type(tensor).__name__)
        return real_broadcast(tensor, *args, **kwargs)

    def broadcast_object_list(objects, *args, **kwargs):
        calls["broadcast_object_list"] += 1
        return real_objects(objects, *args, **kwargs)

    dist.broadcast, dist.broadcast_object_list = broadcast, broadcast_object_list
    out = {}
    try:
        out["batches"] = [_as_arrays(b) for b in iter(batches)]  # to the end of the data
        out["calls"] = {"broadcast": list(calls["broadcast"]), "broadcast_object_list": calls["broadcast_object_list"]}
        # The reader's tokenizer fails at the sixth document: an error that is not a DataError.
        real_call = QualityFilterTokenizer.__call__

        def failing(self, batch):
            if any(text.startswith("doc5 ") for text in batch.texts):
                raise UnicodeError("the tokenizer met something it cannot encode")
            return real_call(self, batch)

        QualityFilterTokenizer.__call__ = failing
        try:
            list(islice(iter(failing_batches), 1000))
        except Exception as err:
            out["error"] = (type(err).__name__, str(err))
        finally:
            QualityFilterTokenizer.__call__ = real_call
    finally:
        dist.broadcast, dist.broadcast_object_list = real_broadcast, real_objects
    return out


def test_a_tp_group_receives_tensors_equal_to_the_readers_batches_and_its_errors(tmp_path):
    from argonne_dt.config import DataConfig
    from argonne_dt.data import batches_for

    files = [write_parquet(tmp_path / "a.parquet", documents(30, seed=3), row_group_size=4)]
    reader, peer = run_distributed(_tp_group_reads, 2, files)
    cfg = DataConfig(paths=files, seq_len=15, num_workers=1, prefetch=2, tokenize_batch_size=3, min_tokens=1,
                     loop=False)
    alone = [_as_arrays(b) for b in batches_for(cfg, 2)]  # one process, no tp group
    assert len(alone) > 10
    for got in (reader["batches"], peer["batches"]):
        assert len(got) == len(alone)
        for mine, expected in zip(got, alone):
            assert np.array_equal(mine["input"], expected["input"]) and np.array_equal(mine["target"], expected["target"])
            assert mine["input"].dtype == expected["input"].dtype
            assert mine["dropped"] == expected["dropped"] and mine["documents"] == expected["documents"]
    for rank in (reader, peer):
        # Header and windows per batch, a header at the end: tensors only, nothing pickled.
        assert rank["calls"] == {"broadcast": ["Tensor"] * (2 * len(alone) + 1), "broadcast_object_list": 0}
    assert reader["error"][0] == "UnicodeError" and "the tokenizer met something it cannot encode" in reader["error"][1]
    assert peer["error"][0] == "DataError"
    assert peer["error"][1].startswith("UnicodeError: ") and reader["error"][1] in peer["error"][1]


def _dp_rank_whose_data_fails(job_dir: str, corpus: str) -> tuple[str, str, int]:
    """dp 2: rank 1's data raises before step 3 (an error that is not a ``DataError``)."""
    import torch.distributed as dist

    from argonne_dt.trainer import Trainer
    from helpers.runs import fail_data_at_step, make_config

    trainer = Trainer(make_config(job_dir, corpus, **{"checkpoint.every": 0}))
    if dist.get_rank() == 1:
        fail_data_at_step(trainer, 2)
    try:
        trainer.run()
    except Exception as err:
        return type(err).__name__, str(err), trainer.progress.step
    return "none", "", trainer.progress.step


def test_a_data_error_of_one_dp_rank_stops_every_rank_with_its_message(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_parquet(corpus / "part-0.parquet", documents(60, seed=1))
    first, second = run_distributed(_dp_rank_whose_data_fails, 2, str(tmp_path / "job"), str(corpus))
    assert second == ("UnicodeError", "undecodable bytes", 2)
    assert first == ("DataError", "the training data of rank 1 failed: UnicodeError: undecodable bytes", 2)


def _resume_with_other_paths(saved_paths: list[str], paths: list[str]) -> tuple[str, str]:
    """tp 2 (rank 0 reads), or one process: resume a data position saved with ``saved_paths`` while
    data.paths lists ``paths``; ``iter`` outside the try, as the trainer calls it."""
    import torch.distributed as dist

    from argonne_dt.config import DataConfig
    from argonne_dt.data import batches_for

    def batches(paths, layout=None):
        cfg = DataConfig(paths=paths, seq_len=15, num_workers=1, prefetch=2, tokenize_batch_size=3, min_tokens=1)
        return batches_for(cfg, 1, layout)

    first = batches(saved_paths)
    list(islice(iter(first), 3))
    distributed = dist.is_initialized()
    resumed = batches(paths, dp_layout(0, 1, reads_data=not distributed or dist.get_rank() == 0,
                                       tp_group=dist.group.WORLD if distributed else None))
    resumed.load_state_dict(first.state_dict())
    resumed_batches = iter(resumed)
    try:
        next(resumed_batches)
    except Exception as err:
        return type(err).__name__, str(err)
    return "none", ""


def test_a_resume_error_of_the_reader_reaches_its_tp_peer_from_next(tmp_path):
    """Making the loader's iterator resets the pipeline and raises a resume's errors: it happens at
    the first ``next``, where the error is forwarded (the peer would otherwise wait for the timeout)."""
    files = [str(write_parquet(tmp_path / f"{name}.parquet", documents(30, seed=seed), row_group_size=5))
             for name, seed in (("a", 1), ("b", 2))]
    reader, peer = run_distributed(_resume_with_other_paths, 2, files, files[::-1], timeout_s=20)
    assert reader[0] == "DataError" and "the data position points into" in reader[1] and "a.parquet" in reader[1]
    assert peer == reader
    assert _resume_with_other_paths(files, files[::-1]) == reader  # no tp group: from next() too
