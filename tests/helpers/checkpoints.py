"""What a saved checkpoint holds, read back into a fresh model."""

import torch

from argonne_dt.checkpoint import Checkpointer, ModelOptimizerState
from argonne_dt.model import ArgonneModel
from argonne_dt.trainer import Progress


def assert_restores(path, model: ArgonneModel, step: int) -> None:
    """The checkpoint at ``path`` gives back ``model``'s weights, bit for bit, and progress at ``step``."""
    reloaded, progress = ArgonneModel(model.config), Progress()
    Checkpointer(path.parent, keep_last=0, async_save=False, model_state=ModelOptimizerState(reloaded, None),
                 states={"progress": progress}).restore(path)
    assert progress == Progress(step=step)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
