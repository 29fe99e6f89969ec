"""Run configuration: one dataclass per TOML section, loading, command-line overrides, validation.

A run is described by a TOML file with the sections below. Every field has a default, so a file
only names what differs. ``load_config("4b9.toml")`` finds the configs bundled in
``argonne_dt/configs``; any other path is read as given. Overrides are command-line words
``--section.key=value`` or ``--section.key value`` and are typed from the dataclass field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration value is missing, misspelled, of the wrong type or inconsistent."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _doc(text: str, **kwargs) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ModelConfig:
    vocab_size: int = _doc("tokenizer vocabulary size (Qwen2.5: 151,665)", default=151_665)
    hidden_size: int = _doc("model width; must equal num_heads * head_dim", default=4080)
    num_layers: int = _doc("number of pre-norm transformer blocks", default=24)
    num_heads: int = _doc("query heads", default=24)
    num_kv_heads: int = _doc("key/value heads (grouped-query attention)", default=8)
    head_dim: int = _doc("width of one attention head", default=170)
    intermediate_size: int = _doc(
        "SwiGLU hidden width; 0 derives int(8 * hidden / 3) rounded up to a multiple of 256", default=0
    )
    max_seq_len: int = _doc("longest sequence the rotary tables cover", default=4096)
    rope_theta: float = _doc("RoPE base frequency", default=10_000.0)
    norm_eps: float = _doc("RMSNorm epsilon", default=1e-6)
    init_std: float = _doc("std of the normal init; residual projections get / sqrt(2 * layers)", default=0.02)
    pad_head_dim: bool = _doc(
        "pad q/k/v to a multiple of 8 inside attention (and the KV cache): the memory-efficient and cuDNN "
        "SDPA kernels need it; the flash kernel pads by itself",
        default=False,
    )
    attention_bias: bool = _doc("biases on the q, k and v projections (Qwen2 teachers; Argonne has none)",
                                default=False)
    tie_embeddings: bool = _doc("lm_head shares the embedding's weight (Argonne; Qwen2.5 7B and larger do not)",
                                default=True)

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)

    def check(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_seq_len"):
            require(getattr(self, key) > 0, f"model.{key} must be positive, got {getattr(self, key)}")
        require(
            self.hidden_size == self.num_heads * self.head_dim,
            f"model.hidden_size={self.hidden_size} must equal model.num_heads * model.head_dim "
            f"= {self.num_heads} * {self.head_dim} = {self.num_heads * self.head_dim}",
        )
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads={self.num_heads} must be divisible by model.num_kv_heads={self.num_kv_heads}",
        )


@dataclass
class ParallelConfig:
    tp: int = _doc("tensor-parallel degree (GPUs sharing one model replica)", default=1)
    dp: int = _doc("data-parallel (FSDP2) degree; -1 means world_size / tp", default=-1)
    sequence_parallel: bool = _doc("shard norms and activations between blocks on the sequence dim", default=True)
    loss_parallel: bool = _doc("with train.loss_chunk_tokens = 0 (full logits): the loss on vocab-sharded logits, "
                               "loss_parallel() (no rank holds full logits); the fused loss is vocab-parallel anyway",
                               default=True)
    activation_checkpoint: str = _doc("per-block recompute: none, full or selective", default="none")
    ac_every: int = _doc(
        "selective mode: 0 saves matmul/attention outputs (op level); N > 0 recomputes every N-th block",
        default=0,
    )
    compile: bool = _doc("torch.compile each block", default=False)
    fsdp_reshard_after_forward: str = _doc(
        "FSDP2 frees gathered block weights after forward (true: all-gather again in backward, less memory) or "
        "keeps them to backward (false: one all-gather per micro-batch, more memory); auto: true while dp stays "
        "within one node, false when dp spans nodes", default="auto")
    timeout_minutes: float = _doc("how long a rank waits in a collective before the run fails (the process "
                                  "group's timeout; rank 0 alone plans the data and makes the first batch)",
                                  default=30.0)

    def check(self) -> None:
        require(self.tp >= 1, f"parallel.tp must be >= 1, got {self.tp}")
        require(self.dp == -1 or self.dp >= 1, f"parallel.dp must be -1 (auto) or >= 1, got {self.dp}")
        require(
            self.activation_checkpoint in ("none", "full", "selective"),
            f"parallel.activation_checkpoint={self.activation_checkpoint!r} must be none, full or selective",
        )
        require(self.ac_every >= 0, f"parallel.ac_every must be >= 0, got {self.ac_every}")
        require(
            not (self.compile and self.activation_checkpoint == "selective" and self.ac_every == 0),
            "parallel.activation_checkpoint=selective with parallel.ac_every=0 cannot be combined with "
            "parallel.compile=true: the op-level policy does not see the matmuls inside a compiled block, so it "
            "would recompute everything; use activation_checkpoint=full, selective with ac_every=N (every N-th "
            "block), or compile=false",
        )
        require(self.fsdp_reshard_after_forward in ("auto", "true", "false"),
                 f"parallel.fsdp_reshard_after_forward={self.fsdp_reshard_after_forward!r} must be auto, true or false")
        require(self.timeout_minutes > 0, f"parallel.timeout_minutes must be positive, got {self.timeout_minutes}")


@dataclass
class DataConfig:
    paths: list[str] = _doc(
        "parquet files, directories or globs (fsspec URLs work); empty uses the bundled sample corpus",
        default_factory=list,
    )
    text_column: str = _doc("column holding the document text", default="text")
    seq_len: int = _doc("training sequence length (tokens per sample)", default=4096)
    tokenizer: str = _doc("local dir, cached hub name, or 'qwen2.5' (offline default)", default="qwen2.5")
    add_bos: bool = _doc("put <|im_start|> before each document", default=True)
    add_eos: bool = _doc("put <|im_end|> after each document", default=True)
    min_chars_for_ratio_filter: int = _doc("ratio rules apply only to texts longer than this", default=50)
    max_digit_ratio: float = _doc("drop texts whose share of digits exceeds this", default=0.5)
    min_alpha_space_ratio: float = _doc("drop texts whose share of letters and spaces is below this", default=0.3)
    min_tokens: int = _doc("drop documents with fewer tokens than this", default=10)
    num_workers: int = _doc("parallel tokenization threads", default=2)
    prefetch: int = _doc("batches prepared ahead of the training step", default=4)
    tokenize_batch_size: int = _doc("documents per tokenizer call", default=64)
    loop: bool = _doc("start a new epoch when the shards are exhausted (else stop)", default=True)
    on_bad_shard: str = _doc("'skip' (warn and count) or 'error' on an unreadable file or row group",
                             default="skip")
    read_retries: int = _doc("attempts again after a read error (network / NFS) before a shard counts as bad",
                             default=3)
    retry_backoff_s: float = _doc("wait before the first retry; doubled for each next one", default=1.0)
    eval_paths: list[str] = _doc("held-out parquet files / dirs / globs for validation; empty: the sample "
                                 "corpus's held-out split when data.paths is empty too, else data.eval_split "
                                 "of data.paths", default_factory=list)
    eval_split: float = _doc("held out of data.paths when data.eval_paths is empty (never trained on, also with "
                             "train.eval_every=0): a fraction of the rows (< 1, spread evenly over the row groups "
                             "of each file), or a whole number N >= 1 of whole files (the last N); 0: none, every "
                             "row trains; fixed for a run (a resume with another value is refused)", default=0.005)

    def check(self) -> None:
        require(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}")
        require(self.on_bad_shard in ("skip", "error"),
                 f"data.on_bad_shard={self.on_bad_shard!r} must be skip or error")
        require(self.read_retries >= 0, f"data.read_retries must be >= 0, got {self.read_retries}")
        require(self.retry_backoff_s >= 0, f"data.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        require(self.num_workers >= 1, f"data.num_workers must be >= 1, got {self.num_workers}")
        require(self.eval_split >= 0 and (self.eval_split < 1 or self.eval_split.is_integer()),
                 f"data.eval_split={self.eval_split} must be a fraction of the rows (0 <= x < 1) or a whole number "
                 "of files")


@dataclass
class OptimConfig:
    lr: float = _doc("peak learning rate", default=1e-4)
    min_lr: float = _doc("learning rate at the end of the cosine decay", default=1e-5)
    warmup_steps: int = _doc("linear warmup steps", default=2000)
    weight_decay: float = _doc("AdamW weight decay (not applied to norms)", default=0.1)
    betas: list[float] = _doc("AdamW betas", default_factory=lambda: [0.9, 0.95])
    eps: float = _doc("AdamW epsilon", default=1e-8)
    grad_clip: float = _doc("global gradient-norm clip; 0 disables", default=1.0)
    fused: bool = _doc("use the fused AdamW kernel where the device supports it", default=True)

    def check(self) -> None:
        require(len(self.betas) == 2, f"optim.betas must have two values, got {self.betas}")
        require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be between 0 and optim.lr={self.lr}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    steps: int = _doc("optimizer steps of the whole run", default=1000)
    micro_batch_size: int = _doc("sequences per data-parallel rank per micro-step", default=1)
    grad_accum_steps: int = _doc("micro-batches accumulated per optimizer step (derived when "
                                 "global_batch_size is set)", default=1)
    global_batch_size: int = _doc("sequences per optimizer step over all dp ranks; 0 derives it from micro_batch_size "
                                  "x grad_accum_steps x dp. Set, it keeps tokens per step (and the schedule's "
                                  "meaning) whatever the number of nodes", default=0)
    seed: int = _doc("seed for init and everything random", default=1234)
    dtype: str = _doc("compute dtype: bf16 (autocast, fp32 master weights), fp32, or auto (bf16 on GPUs "
                      "and on CPUs with native bf16, else fp32)", default="bf16")
    max_nonfinite_steps: int = _doc("consecutive non-finite steps tolerated before stopping", default=5)
    eval_every: int = _doc("validation every N steps on the held-out data (data.eval_paths, else data.eval_split "
                           "of data.paths, else the sample corpus's held-out split); 0 disables", default=0)
    eval_batches: int = _doc("validation batches per evaluation; 0 means the whole held-out set", default=20)
    downstream_every: int = _doc("multiple-choice accuracy on train.downstream_file every N steps; 0 disables",
                                 default=0)
    downstream_file: str = _doc("JSONL multiple-choice task (HellaSwag's ctx / endings / label, or context / "
                                "choices / answer), given by the user: nothing is downloaded", default="")
    downstream_questions: int = _doc("questions of train.downstream_file scored each time (the first N); 0: all",
                                     default=0)
    loss_chunk_tokens: int = _doc("tokens per chunk of the fused lm_head + loss (pretraining at any parallel.tp, "
                                  "and distillation): its fp32 logits exist one chunk at a time; 0: full logits, "
                                  "then cross-entropy (loss_parallel under tp; not for distillation)", default=1024)

    def check(self) -> None:
        require(self.dtype in ("bf16", "fp32", "auto"), f"train.dtype={self.dtype!r} must be bf16, fp32 or auto")
        require(self.downstream_every >= 0 and self.downstream_questions >= 0,
                 "train.downstream_every and train.downstream_questions must be >= 0")
        require(not self.downstream_every or bool(self.downstream_file),
                 f"train.downstream_every={self.downstream_every} needs train.downstream_file (a JSONL multiple-choice "
                 "task)")
        for key in ("steps", "micro_batch_size", "grad_accum_steps"):
            require(getattr(self, key) >= 1, f"train.{key} must be >= 1, got {getattr(self, key)}")
        require(self.global_batch_size >= 0,
                 f"train.global_batch_size must be >= 0 (0: derived), got {self.global_batch_size}")


@dataclass
class CheckpointConfig:
    every: int = _doc("save every N steps (and at the end); 0 saves only at the end", default=500)
    keep_last: int = _doc("newest complete checkpoints kept; 0 keeps all", default=3)
    async_save: bool = _doc("write checkpoints in the background with dcp.async_save (the step waits only for "
                            "the copy to host memory, pinned on GPUs)", default=False)
    write_threads: int = _doc("threads writing each rank's checkpoint files", default=4)
    initial_load_path: str = _doc("checkpoint to start from when the run has none of its own", default="")

    def check(self) -> None:
        require(self.write_threads >= 1, f"checkpoint.write_threads must be >= 1, got {self.write_threads}")


@dataclass
class MetricsConfig:
    log_every: int = _doc("console / TensorBoard / jsonl line every N steps", default=10)
    tensorboard: bool = _doc("write TensorBoard events under job.dir/tb", default=True)
    sample_every: int = _doc("generate sample continuations every N steps; 0 disables", default=0)
    sample_prompts: list[str] = _doc(
        "prompts for the samples", default_factory=lambda: ["Long long time ago, "]
    )
    sample_tokens: int = _doc("new tokens per sample (greedy)", default=32)

    def check(self) -> None:
        require(self.log_every >= 1, f"metrics.log_every must be >= 1, got {self.log_every}")
        require(self.sample_every >= 0, f"metrics.sample_every must be >= 0 (0: no samples), got {self.sample_every}")
        require(not self.sample_every or self.sample_tokens >= 1,
                 f"metrics.sample_tokens must be >= 1 with metrics.sample_every set, got {self.sample_tokens}")


@dataclass
class DistillConfig:
    teacher: str = _doc("the teacher: a local Hugging Face Llama / Qwen2 directory (safetensors) or an argonne_dt "
                        "run or checkpoint directory; empty: no distillation", default="")
    alpha: float = _doc("weight of the cross-entropy; 1 - alpha weighs T^2 x KL(teacher || student)", default=0.5)
    temperature: float = _doc("softmax temperature T of both models in the KL term", default=1.0)
    teacher_dtype: str = _doc("the teacher's weights and matmuls: bf16, fp32, or auto (bf16 where native, as "
                              "train.dtype)", default="bf16")
    teacher_fsdp: bool = _doc("shard the teacher's blocks over dp with FSDP2 (when it does not fit replicated; "
                              "benchmarks/memory_plan.py --teacher tells)", default=False)

    def check(self) -> None:
        require(0.0 <= self.alpha <= 1.0, f"distill.alpha={self.alpha} must be between 0 and 1")
        require(self.temperature > 0, f"distill.temperature={self.temperature} must be positive")
        require(self.teacher_dtype in ("bf16", "fp32", "auto"),
                 f"distill.teacher_dtype={self.teacher_dtype!r} must be bf16, fp32 or auto")


@dataclass
class JobConfig:
    name: str = _doc("run name; defaults to the config file's stem", default="")
    dir: str = _doc("where the run writes everything; defaults to runs/<name>", default="")

    def check(self) -> None:
        """Nothing to check: any name and directory will do."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    job: JobConfig = field(default_factory=JobConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{match[0]}'?)" if match else f" (known: {', '.join(sorted(choices))})"


def _coerce(value: Any, expected: Any, where: str) -> Any:
    """Return ``value`` as ``expected`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if expected is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {expected} at {where}")


# Keys that moved: (old section, key) -> (section, key). Old configs and checkpoints still load.
_MOVED = {("distill", "chunk_tokens"): ("train", "loss_chunk_tokens")}
# Keys added after runs were saved whose default is not what those runs did: the value a stored config
# without the key ran with (no held-out split before data.eval_split).
_ADDED = {("data", "eval_split"): 0.0}


def with_added_keys(stored: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A stored config (``Config.to_dict()`` of a checkpoint) with the keys of ``_ADDED`` it lacks."""
    filled = {section: dict(values) for section, values in stored.items()}
    for (section, key), value in _ADDED.items():
        if section in filled:
            filled[section].setdefault(key, value)
    return filled


def written_as(config: Config, dotted: str) -> str:
    """The name under which the user gave the setting ``dotted`` (a moved key's old name, if that one)."""
    return getattr(config, "written_as", {}).get(dotted, dotted)


def _apply(config: Config, section: str, key: str, value: Any, source: str) -> None:
    written = f"{section}.{key}"
    section, key = _MOVED.get((section, key), (section, key))
    if (section, key) in _MOVED.values():
        # The name the user wrote, for the messages; a setting under its old and its new name is refused.
        names = config.__dict__.setdefault("written_as", {})
        new = f"{section}.{key}"
        earlier = names.setdefault(new, written)
        if earlier != written:
            old = earlier if written == new else written
            raise ConfigError(f"{source}: {written} given, and {earlier} before it: {old} is the former name of "
                              f"{new}; give only {new}")
    types = _section_types()
    if section not in types:
        raise ConfigError(f"{source}: unknown section [{section}]{_closest(section, types)}")
    fields = _field_types(types[section])
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_closest(key, fields)}")
    typed = _coerce(value, fields[key], f"{source}: {section}.{key}")
    setattr(getattr(config, section), key, typed)


def parse_overrides(words: list[str]) -> list[tuple[str, str]]:
    """Turn ``--section.key=value`` / ``--section.key value`` words into (dotted key, value) pairs."""
    pairs, i = [], 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or "." not in word.split("=", 1)[0]:
            raise ConfigError(f"override {word!r}: expected --section.key=value or --section.key value")
        if "=" in word:
            key, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words):
                raise ConfigError(f"override {word!r} has no value")
            key, value = word[2:], words[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    bundled = BUNDLED_CONFIG_DIR / path.name
    if path.parent == Path(".") and bundled.exists():
        return bundled
    available = ", ".join(sorted(p.name for p in BUNDLED_CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a bundled config ({available})")


def _apply_file(config: Config, path: Path, seen: tuple[Path, ...]) -> None:
    """Apply a TOML file's values; ``extends = "other.toml"`` applies that file first (a path relative
    to this one, or a bundled name), so a config states only what differs from its base."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to a file that extends it")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends must name a config file, got {base!r}")
        relative = path.parent / base
        _apply_file(config, relative if relative.exists() else resolve_config_path(base), seen + (path.resolve(),))
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key '{section}' must be a [section] (or extends = \"file.toml\")")
        for key, value in values.items():
            _apply(config, section, key, value, str(path))


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (bundled name or path), apply command-line overrides, validate."""
    config = Config()
    name = "default"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        name = path.stem
        _apply_file(config, path, seen=())
    for dotted, value in parse_overrides(overrides or []):
        section, _, key = dotted.partition(".")
        _apply(config, section, key, value, f"override --{dotted}")
    if not config.job.name:
        config.job.name = name
    if not config.job.dir:
        config.job.dir = str(Path("runs") / config.job.name)
    validate(config)
    return config


def config_from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (as stored in a checkpoint)."""
    config = Config()
    for section, values in with_added_keys(data).items():
        for key, value in values.items():
            _apply(config, section, key, value, "stored config")
    validate(config)
    return config


def validate(config: Config, dp: int | None = None) -> None:
    """Each section's own ``check()``, then what crosses sections; the checks that need the
    data-parallel size run only when it is given (the layout computes it, ``distributed.build_layout``)."""
    for section in dataclasses.fields(config):
        getattr(config, section.name).check()
    m, p, d, t = config.model, config.parallel, config.data, config.train
    check_tp_divides(m, p.tp)
    require(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    require(
        not (p.sequence_parallel and p.tp > 1) or d.seq_len % p.tp == 0,
        f"data.seq_len={d.seq_len} must be divisible by parallel.tp={p.tp} with "
        "parallel.sequence_parallel=true (or turn sequence parallelism off)",
    )
    require(
        t.eval_every == 0 or bool(d.eval_paths) or not d.paths or d.eval_split > 0,
        f"train.eval_every={t.eval_every} needs held-out data: data.eval_paths (parquet files), or "
        "data.eval_split > 0 (a part of data.paths held out)",
    )
    # The chunk's checks name the key as the user wrote it (``distill.chunk_tokens`` before it moved).
    chunk = written_as(config, "train.loss_chunk_tokens")
    require(t.loss_chunk_tokens >= 0, f"{chunk} must be >= 0 (0: full logits), got {t.loss_chunk_tokens}")
    require(not config.distill.teacher or t.loss_chunk_tokens >= 1,
            f"{chunk}=0 (full logits) cannot distill: the distillation loss runs in chunks; set it >= 1")
    if dp is not None:
        require(
            not t.eval_every or t.eval_batches > 0 or dp == 1,
            f"train.eval_batches=0 (the whole held-out set) needs dp 1, not {dp}: dp ranks would run different "
            "numbers of batches; set train.eval_batches",
        )


def check_job(config: Config, distilling: bool) -> None:
    """A distillation job names a teacher (``distill.teacher``); a pretraining job does not."""
    if distilling:
        require(bool(config.distill.teacher),
                 "distill.teacher is empty: name a Hugging Face Llama / Qwen2 directory or an argonne_dt run")
    else:
        require(not config.distill.teacher,
                 f"distill.teacher={config.distill.teacher!r} makes this a distillation job: run launch/distill.py "
                 "with it")


def check_tp_divides(m: ModelConfig, tp: int) -> None:
    """Each tensor-parallel rank must get whole query heads, whole kv heads and equal MLP columns."""
    require(
        m.num_kv_heads % tp == 0,
        f"parallel.tp={tp} must divide model.num_kv_heads={m.num_kv_heads} (each rank needs whole kv heads)",
    )
    require(m.num_heads % tp == 0, f"parallel.tp={tp} must divide model.num_heads={m.num_heads}")
    require(
        m.ffn_dim % tp == 0,
        f"parallel.tp={tp} must divide the MLP width {m.ffn_dim} (model.intermediate_size)",
    )


def describe_fields() -> str:
    """A Markdown table of every section and key with its default and doc (for the README)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in _section_types().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata["doc"].replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{default!r}` | {doc} |")
    return "\n".join(lines)
