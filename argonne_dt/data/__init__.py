"""The training data pipeline on ``torchdata.nodes``, with an exact, checkpointable position.

Four modules, each importing only the ones before it:

    files.py    patterns expanded, parquet files opened and read, retries, ``DataError``
    shares.py   share plans (one contiguous share per dp rank), the held-out split, positions dealt anew
    nodes.py    the nodes: reader -> quality filter + tokenizer -> packer
    loader.py   ``batches_for``: the one entry point, and the broadcast to a tp group's peers
"""

from .files import DataError, expand_paths
from .loader import TensorParallelBatches, batches_for, share_loader
from .nodes import ParquetDocumentReader, QualityFilterTokenizer, TextBatch, TokenPacker
from .shares import Position, Resumption, Segment, SharePlan, computed_once, plan_shares, reshard_positions

__all__ = ["DataError", "ParquetDocumentReader", "Position", "QualityFilterTokenizer", "Resumption", "Segment",
           "SharePlan", "TensorParallelBatches", "TextBatch", "TokenPacker", "batches_for", "computed_once",
           "expand_paths", "plan_shares", "reshard_positions", "share_loader"]
