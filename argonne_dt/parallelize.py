"""The model factory, and what makes the plain model parallel: the tensor-parallel plan, FSDP2,
activation checkpointing, compile.

Order of application: tensor parallel -> compile -> activation checkpointing -> FSDP2. The model
module itself is never edited for parallelism; styles from ``torch.distributed.tensor.parallel``
replace its parameters with DTensors and insert the (autograd-aware) collectives at module
boundaries.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .config import ConfigError, ModelConfig, ParallelConfig, check_tp_divides
from .distributed import ParallelLayout
from .model import ArgonneModel


def _replicate_on(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Replicated parameters for a module that sees replicated activations (norms without SP).

    Keeps every parameter a DTensor on the tp mesh, so optimizer and grad clipping see one kind.
    """
    distribute_module(
        module,
        tp_mesh,
        input_fn=lambda mod, inputs, mesh: tuple(
            DTensor.from_local(t, mesh, [Replicate()], run_check=False) for t in inputs
        ),
        output_fn=lambda mod, output, mesh: output.to_local(),
    )


def apply_tensor_parallel(model: ArgonneModel, tp_mesh: DeviceMesh, sequence_parallel: bool, vocab_parallel_loss: bool) -> None:
    """The TP plan: module name -> ParallelStyle (see TENSOR_PARALLEL_USAGE.md for the table)."""
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(
        model,
        tp_mesh,
        {
            # Vocab-sharded embedding: each rank looks up its rows, the partial sums are reduced
            # (reduce-scatter onto the sequence dim under SP).
            "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks),
            # Vocab-sharded logits: with loss_parallel no rank materializes all 151,665 columns.
            "lm_head": ColwiseParallel(
                input_layouts=between_blocks,
                output_layouts=Shard(-1) if vocab_parallel_loss else Replicate(),
                use_local_output=not vocab_parallel_loss,
            ),
        },
    )
    block_plan = {
        "attn": PrepareModuleInput(
            input_layouts=(between_blocks, None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=between_blocks),
        "mlp": PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=between_blocks),
    }
    norms = ["attn_norm", "mlp_norm"]
    if sequence_parallel:
        block_plan.update({name: SequenceParallel() for name in norms})
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    else:
        _replicate_on(model.norm, tp_mesh)
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan)
        if not sequence_parallel:
            for name in norms:
                _replicate_on(getattr(block, name), tp_mesh)
    # parallelize_module gave embed and lm_head a DTensor each; both are Shard(0) over the vocab,
    # so one parameter serves both again.
    # The vocabulary is sharded: the fused loss becomes vocab-parallel (its chunk unchanged); the
    # full-logits loss (chunk 0) runs under loss_parallel when the logits stay sharded (the layout says).
    model.tie_weights()


# Outputs worth keeping in selective (op-level) checkpointing: the expensive matmuls and
# attention. Everything else (norms, activations, rotary) is recomputed in backward. Compiled blocks
# hide them: the policy then sees inductor's aten.mm.out calls into its own buffers, not these ops,
# so config validation refuses op-level selective checkpointing with parallel.compile.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: ArgonneModel, mode: str, every: int) -> None:
    """none | full (recompute each block) | selective (save matmul outputs, or every N-th block)."""
    if mode == "none":
        return
    for index, block in enumerate(model.layers):
        if mode == "full" or (mode == "selective" and every > 0 and index % every == 0):
            model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective" and every == 0:
            context = partial(create_selective_checkpoint_contexts, _save_matmuls_policy)
            model.layers[index] = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)


def compile_blocks(model: ArgonneModel) -> None:
    """torch.compile the attention and MLP of every block, in place (parameter names unchanged).

    The norms stay eager: under sequence parallelism the compiled backward of a
    ``SequenceParallel`` norm hands a plain tensor to DTensor's redistribute (torch 2.13).
    """
    for block in model.layers:
        block.attn.compile()
        block.mlp.compile()


@dataclass(frozen=True)
class ModelTransforms:
    """What a model that trains gets besides its layout: per-block recompute and compile (a teacher,
    which never runs backward, and inference get none)."""

    activation_checkpoint: str = "none"
    ac_every: int = 0
    compile: bool = False

    @classmethod
    def of(cls, parallel: ParallelConfig) -> "ModelTransforms":
        """The transforms ``parallel.activation_checkpoint``, ``parallel.ac_every`` and ``parallel.compile`` ask for."""
        return cls(parallel.activation_checkpoint, parallel.ac_every, parallel.compile)

    def apply(self, model: ArgonneModel) -> None:
        if self.compile:
            compile_blocks(model)
        apply_activation_checkpointing(model, self.activation_checkpoint, self.ac_every)


def reshard_after_forward(parallel: ParallelConfig, world_size: int) -> bool:
    """``parallel.fsdp_reshard_after_forward`` resolved for a world of ``world_size`` ranks.

    auto: free each block's gathered weights after its forward (and all-gather them again in
    backward) while every dp group lies within one node, where the all-gather is cheap; keep them
    to backward when dp spans nodes, saving one inter-node all-gather per block and micro-batch for
    one tp shard of the model in the gather dtype. A node is torchrun's ``LOCAL_WORLD_SIZE`` ranks
    (the same on every node, so every rank decides alike).
    """
    if parallel.fsdp_reshard_after_forward != "auto":
        return parallel.fsdp_reshard_after_forward == "true"
    return world_size <= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def apply_fsdp(model: ArgonneModel, dp_mesh: DeviceMesh, param_dtype: torch.dtype, shard_root: bool = True,
               reshard_blocks: bool = True) -> None:
    """FSDP2 per block, then the root (embedding, final norm and the tied lm_head) unless ``shard_root``
    is false (a distillation teacher, whose lm_head the student's loss reads outside its forward).

    Parameters are gathered in ``param_dtype``; block inputs are not cast, so the residual
    stream and the rotary tables stay fp32 as under pure tensor parallelism (autocast runs the
    matmuls in bf16 either way). ``reshard_blocks``: blocks free their gathered weights after
    forward (see ``reshard_after_forward``), also when each is its own FSDP root (no sharded root
    above them): FSDP2 keeps a root gathered by default.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_blocks)
    if shard_root:
        fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def _check_sequence_length(tp: int, module, args) -> None:
    seq = args[0].shape[1]
    if seq % tp:
        raise ConfigError(
            f"sequence length {seq} is not divisible by the tensor-parallel degree {tp}, which "
            "sequence parallelism requires: change data.seq_len or set parallel.sequence_parallel=false"
        )


def local_view(param: torch.Tensor):
    """(this rank's block of ``param``, its offset in the full tensor, the full shape)."""
    if isinstance(param, DTensor):
        _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), offset, param.shape
    return param, (0,) * param.ndim, param.shape


def materialize(model: ArgonneModel, device: torch.device | str, seed: int | None) -> None:
    """Allocate a meta-device (tensor-parallel) model on ``device`` and initialize it shard by shard.

    Each rank draws only its own block of every parameter (``ArgonneModel.init_weights`` with a
    local view), so no rank ever holds a full copy, and the values equal a single-device init
    with the same seed. ``seed=None`` leaves the parameters unset, for a checkpoint to fill.
    """
    model.to_empty(device=device)
    if seed is None:
        model.init_buffers()
    else:
        model.init_weights(seed, local_view)


def parallelize(
    model: ArgonneModel,
    layout: ParallelLayout,
    param_dtype: torch.dtype = torch.float32,
    before_fsdp: Callable[[ArgonneModel], None] | None = None,
    shard_root: bool = True,
    transforms: ModelTransforms = ModelTransforms(),
) -> ArgonneModel:
    """Apply TP (+SP, vocab-parallel embedding / loss), ``transforms`` (compile, activation
    checkpointing) and FSDP2.

    ``param_dtype`` is the dtype FSDP2 gathers parameters in for compute (bf16 for mixed
    precision); master weights stay fp32. Pure TP relies on autocast for the same effect.
    ``before_fsdp`` runs once tensor parallelism is applied and before FSDP2 shards further: the
    place to allocate a meta-device model (``build_model`` does).
    """
    check_tp_divides(model.config, layout.tp)
    if layout.tp > 1:
        apply_tensor_parallel(model, layout.tp_mesh, layout.sequence_parallel, layout.loss_parallel)
        if layout.sequence_parallel:
            model.register_forward_pre_hook(partial(_check_sequence_length, layout.tp))
    transforms.apply(model)
    if before_fsdp is not None:
        before_fsdp(model)
    if layout.dp_mesh is not None:
        # A teacher (no sharded root) runs no backward: nothing to keep its weights gathered for.
        reshard = reshard_after_forward(layout.parallel, layout.world_size) if shard_root else True
        apply_fsdp(model, layout.dp_mesh, param_dtype, shard_root, reshard)
    return model


def build_model(model_config: ModelConfig, layout: ParallelLayout | None = None, device: torch.device | str = "cpu",
                seed: int | None = None, param_dtype: torch.dtype = torch.float32,
                weights_dtype: torch.dtype = torch.float32, fill: Callable[[ArgonneModel], None] | None = None,
                shard_root: bool = True, transforms: ModelTransforms = ModelTransforms()) -> ArgonneModel:
    """The one way a model is made: on the meta device, parallelized, then allocated shard by shard.

    ``layout`` None gives a plain single-device model. ``seed`` initializes the weights (the same
    values whatever the layout); None leaves them for a checkpoint to fill, or for ``fill(model)``,
    which runs on the allocated tensor-parallel shards before FSDP2 shards further (a weights
    reader). ``weights_dtype`` is the parameters' storage dtype (a bf16 teacher). ``device="meta"``
    leaves the model unallocated (the memory planner counts its shards). ``transforms``: activation
    checkpointing and compile, for a model that trains.
    """
    with torch.device("meta"):
        model = ArgonneModel(model_config)
    if weights_dtype != torch.float32:
        # Parameters only: the rotary tables stay fp32.
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.to(weights_dtype), requires_grad=param.requires_grad))
        model.tie_weights()

    def allocate(model: ArgonneModel) -> None:
        materialize(model, device, seed)
        if fill is not None:
            fill(model)

    allocate_here = None if str(device) == "meta" else allocate
    if layout is not None:
        return parallelize(model, layout, param_dtype, before_fsdp=allocate_here, shard_root=shard_root,
                           transforms=transforms)
    transforms.apply(model)
    if allocate_here is not None:
        allocate_here(model)
    return model
