"""Frozen descriptions of a model, a training setup and a GPU, validated on construction.

Every invalid value raises :class:`SpecError` (a ``ValueError``) with a message that says what to
change; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

METHODS = ("full", "lora", "qlora")
QUANTS = ("nf4", "fp4", "int8")
#: HF Trainer ``optim`` names (TrainingArguments), plus ``adamw_loop`` (torch AdamW with
#: ``foreach=False``), and the older vramplan names kept as aliases.
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_loop", "adamw_bnb_8bit",
              "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "lion_8bit", "paged_lion_8bit",
              "sgd")
OPTIMIZER_ALIASES = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit"}
PRECISIONS = ("bf16", "fp16", "fp32", "mixed")
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")
SHARDS = ("none", "zero1", "zero2", "zero3", "fsdp")
LOOPS = ("trainer", "custom")
#: Linear-layer names LoRA can target, across the supported families.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                "down_proj", "gate_up_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")


class SpecError(ValueError):
    """A model, training setup or GPU that cannot be used as given."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """The architecture facts the memory model needs, in HF config names where they exist."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False  # one qkv_proj (phi3)
    fused_gate_up: bool = False  # one gate_up_proj (phi3)
    rope_cat: bool = False  # RoPE output made by torch.cat (phi3's partial-rotary form)
    norms_per_layer: int = 2  # gemma2 has 4 (post_norms)
    post_norms: bool = False  # gemma2: post-attention and post-feedforward norms too
    norm_style: str = "llama"  # "gemma": fp32 norm returning the input dtype (type_as(x))
    sdpa: bool = True  # transformers has an SDPA path (gemma2 does not: soft-capping)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    num_local_experts: int = 0  # 0 = dense MLP
    num_experts_per_tok: int = 0
    final_logit_softcapping: float | None = None  # gemma2: tanh soft-capping of the logits
    attn_logit_softcapping: float | None = None  # gemma2: tanh soft-capping of attention scores
    scaled_embeddings: bool = False  # gemma: embeddings multiplied by sqrt(hidden_size)
    sliding_window: int | None = None  # gemma2: every other layer attends to this many tokens
    max_context: int | None = None  # max_position_embeddings: the longest sequence it was made for

    def __post_init__(self) -> None:
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size"):
            _require(getattr(self, f) > 0, f"model {self.name}: {f} must be positive")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"model {self.name}: num_attention_heads must be a multiple of num_key_value_heads")
        _require(self.num_local_experts >= 0 and self.num_experts_per_tok >= 0,
                 f"model {self.name}: expert counts must not be negative")
        _require(self.num_experts_per_tok <= self.num_local_experts,
                 f"model {self.name}: num_experts_per_tok exceeds num_local_experts")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def q_dim(self) -> int:
        """Width of the query projection output (heads × head_dim)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projection outputs (KV heads × head_dim)."""
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSpec:
    """One training setup. Defaults follow the seed's QLoRA recipe (DESIGN.md, CLI contract)."""

    method: str = "qlora"
    quant: str = "nf4"
    double_quant: bool = True
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # "all-linear", "attn" or a comma list of module names
    optimizer: str = ""  # "" = the method's default (see resolved_optimizer)
    precision: str = "mixed"
    attn: str = "sdpa"
    grad_ckpt: bool = True
    seq_len: int = 2048
    batch: int = 1
    shard: str = "none"
    num_gpus: int = 1
    #: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the allocator replay honours it)
    expandable_segments: bool = False
    #: micro-steps per optimizer step (HF Trainer gradient_accumulation_steps)
    grad_accum: int = 1
    #: gradient clipping before the optimizer step (HF Trainer max_grad_norm; 0 = off)
    max_grad_norm: float = 1.0
    #: "trainer" (HF Trainer: the model output is dropped before backward) or "custom" (a
    #: hand-written loop, ``outputs = model(**batch); outputs.loss.backward()``: logits kept)
    loop: str = "trainer"
    #: QLoRA: peft prepare_model_for_kbit_training (fp32 non-4-bit weights); False = skipped
    kbit_prep: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("quant", self.quant, QUANTS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("attn", self.attn, ATTENTIONS)
        _choice("shard", self.shard, SHARDS)
        _choice("loop", self.loop, LOOPS)
        if self.optimizer:
            _choice("optimizer", self.optimizer, OPTIMIZERS + tuple(OPTIMIZER_ALIASES))
        _require(isinstance(self.grad_accum, int) and self.grad_accum >= 1,
                 f"--grad-accum must be an integer >= 1, got {self.grad_accum}")
        _require(self.max_grad_norm >= 0,
                 f"--max-grad-norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        _require(self.seq_len > 0, f"--seq-len must be a positive integer, got {self.seq_len}")
        _require(self.batch > 0, f"--batch must be a positive integer, got {self.batch}")
        _require(self.num_gpus > 0, f"--num-gpus must be a positive integer, got {self.num_gpus}")
        _require(self.shard != "none" or self.num_gpus == 1,
                 "--num-gpus > 1 needs a sharding scheme (--shard zero1|zero2|zero3|fsdp)")
        if self.method != "full":
            _require(self.lora_r > 0, f"--lora-r must be a positive integer, got {self.lora_r}")
            _require(self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}")
            _require(0.0 <= self.lora_dropout < 1.0,
                     f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            self.target_modules()  # validates the target list

    @property
    def resolved_optimizer(self) -> str:
        """The optimizer actually used, by its HF Trainer name: paged_adamw_32bit for QLoRA (the
        seed's recipe), adamw_torch_fused (HF Trainer 5.x's default) otherwise, unless set."""
        if self.optimizer:
            return OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        return "paged_adamw_32bit" if self.method == "qlora" else "adamw_torch_fused"

    def target_modules(self) -> tuple[str, ...] | None:
        """Explicit LoRA target names, or None for peft's "all-linear" (every linear but lm_head)."""
        return parse_targets(self.lora_targets)

    def as_dict(self) -> dict[str, object]:
        """Every field with the optimizer resolved: the `setup` object of the JSON contract."""
        d = {name: getattr(self, name) for name in _TRAIN_FIELDS}
        d["optimizer"] = self.resolved_optimizer
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TrainSpec:
        """Rebuild from `as_dict` output (extra keys are an error, so typos do not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        _require(not unknown, f"unknown setup key(s): {', '.join(unknown)}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    """One catalog GPU: memory as NVML reports it, peak dense bf16 throughput and DRAM bandwidth
    (datasheet), indicative price."""

    key: str
    name: str
    memory_bytes: int
    gpu_class: str
    vendor: str
    bf16_tflops: float | None = None
    price_usd_per_hour: float | None = None
    memory_source: str = ""
    tflops_source: str = ""
    price_source: str = ""
    #: What CUDA lets one process allocate (``torch.cuda.mem_get_info()`` total, the "total
    #: capacity" of PyTorch's OOM message), below the NVML total; 0 = unknown (use memory_bytes).
    cuda_capacity_bytes: int = 0
    cuda_capacity_source: str = ""
    fp16_tflops: float | None = None  # dense fp16 tensor TFLOPS, for GPUs without bf16
    #: Peak DRAM bandwidth from the vendor datasheet, GB/s (10^9 bytes/s); None = unknown.
    memory_bandwidth_gbs: float | None = None
    bandwidth_source: str = ""

    def __post_init__(self) -> None:
        _require(self.memory_bytes > 0, f"gpu {self.key}: memory_bytes must be positive")

    @property
    def has_bf16(self) -> bool:
        """Tensor-core bf16 (Ampere and later, CDNA): T4 and V100 have fp16 only."""
        return self.bf16_tflops is not None or self.vendor in ("amd", "custom")

    @property
    def capacity_bytes(self) -> int:
        """The memory a run's device total is held against: the CUDA capacity when known."""
        return self.cuda_capacity_bytes or self.memory_bytes


@dataclass(frozen=True, slots=True)
class Search:
    """Bounds of the planner's searches (profiles/planner.toml, read by ``profiles.load_search``
    and handed to the planner by its caller)."""

    max_seq_len: int  # upper bound of the max-seq search
    max_batch: int  # upper bound of the max-batch search
    max_gpus: int  # GPU counts tried by min_gpus: 1..max_gpus
    fallback_shard: str  # the scheme tried when the setup asks for none and one GPU is too few

    def __post_init__(self) -> None:
        _require(min(self.max_seq_len, self.max_batch, self.max_gpus) >= 1,
                 "planner search bounds must be positive")
        _require(self.fallback_shard in SHARDS[1:],
                 f"fallback_shard {self.fallback_shard!r} is not one of {SHARDS[1:]}")


@lru_cache(maxsize=256)
def parse_targets(text: str) -> tuple[str, ...] | None:
    """--lora-targets parsed once per string: None for "all-linear", the attention projections
    for "attn", else the named modules (validated)."""
    if text == "all-linear":
        return None
    if text == "attn":
        return ATTN_MODULES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    _require(bool(names), "--lora-targets is empty")
    unknown = [n for n in names if n not in LORA_MODULES]
    _require(not unknown, f"unknown LoRA target(s) {', '.join(unknown)}; choose from "
             f"all-linear, attn or {', '.join(LORA_MODULES)}")
    return names


_TRAIN_FIELDS = tuple(f.name for f in fields(TrainSpec))


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"--{flag.replace('_', '-')} {value!r} is not one of: "
             f"{', '.join(allowed)}")
