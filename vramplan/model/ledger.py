"""A per-token ledger of the tensors autograd saves in one decoder layer.

The forward of an HF decoder layer is replayed symbolically: each tensor is (name, width per token,
bytes per element); each op records what its backward keeps (``ctx.save_for_backward`` /
``SavedVariable``), exactly as the op-by-op reading in PHYSICS-REFERENCE §5.1 and §8 lists it.
Tensors are deduplicated by name, so an input shared by q/k/v is counted once while per-module cast
copies (peft's ``_cast_input_dtype``, autocast's casts of activations) are counted per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

from vramplan.model.dtypes import Dtypes, dtypes_for
from vramplan.model.inventory import inventory
from vramplan.model.params import Linear
from vramplan.specs import ModelSpec, TrainSpec

FP32 = 4


@dataclass(frozen=True, slots=True)
class T:
    """A symbolic activation: `width` elements per token of `e` bytes each."""

    name: str
    width: int
    e: int


@dataclass(slots=True)
class Ledger:
    """Saved tensors by name, in bytes per token."""

    saved: dict[str, int] = field(default_factory=dict)
    mlp_e: int = 2  # bytes per element of the MLP intermediates (gate/up outputs)
    down_input_bytes: int = 0  # per token: what down_proj keeps of its input (released first)
    max_transient: int = 0  # per token: the largest in-flight output of one linear
    peak_partial: int = 0  # per token: saved-so-far + that in-flight output, at the worst linear
    #: The forward in order, for the allocator replay (:mod:`vramplan.model.timeline`):
    #: ("save", name) a tensor first saved, ("linear", name) a linear called,
    #: ("temp", bytes/token) unsaved outputs alive together for a moment (("copy", ...): dtype
    #: copies among them), ("moe_end", None) an MoE block's experts done.
    events: list[tuple[str, object]] = field(default_factory=list)
    #: What the layer saves only because its input needs grad: its input norm's saved tensors
    #: (its fp32 input, or the input itself, and rsqrt) and the LoRA dropout masks of the
    #: projections fed by that norm (dropout on an input that needs no grad is not recorded).
    #: The first layer saves none of them when its input needs no grad (:func:`frozen_first_input`).
    frozen_input_saves: tuple[str, ...] = ()
    #: Inputs the int8 matmuls keep as a ``ctx`` attribute (bytes per token), which gradient
    #: checkpointing does not drop; ``held_only``: those nothing else saves.
    held: dict[str, int] = field(default_factory=dict)
    held_only: set[str] = field(default_factory=set)

    @property
    def held_only_bytes(self) -> int:
        """Bytes per token saved only because an int8 matmul keeps them."""
        return sum(self.held[name] for name in self.held_only)

    @property
    def frozen_input_bytes(self) -> int:
        """Bytes per token the layer saves only because its input needs grad."""
        return sum(self.saved[name] for name in self.frozen_input_saves)

    def save(self, t: T) -> None:
        if t.name not in self.saved:
            self.events.append(("save", t.name))
        self.saved[t.name] = t.width * t.e

    def in_flight(self, nbytes: int, pieces: tuple[int, ...] = (), kind: str = "temp") -> None:
        """Record an op's unsaved outputs that are alive together at this point of the forward
        (``pieces``: the tensors among them made here, in order; default: one of ``nbytes``).
        ``kind`` "copy": dtype copies, memory the step-time model does not count (see
        :func:`vramplan.model.steptime.layer_traffic`)."""
        self.events.append((kind, pieces or (nbytes,)))
        self.max_transient = max(self.max_transient, nbytes)
        self.peak_partial = max(self.peak_partial, self.bytes_per_token() + nbytes)

    def bytes_per_token(self) -> int:
        return sum(self.saved.values())


def cast(x: T, e: int, name: str) -> T:
    """``x.to(dtype)``: the same tensor when the dtype already matches, else a new copy."""
    return x if x.e == e else T(name, x.width, e)


def promote(*es: int) -> int:
    """Result dtype of an elementwise op on mixed float dtypes (fp32 wins)."""
    return max(es)


@dataclass(frozen=True, slots=True)
class LayerCtx:
    """What the replay needs: the model, the setup and its resolved dtypes."""

    m: ModelSpec
    t: TrainSpec
    d: Dtypes

    @property
    def base(self) -> str:
        return {"full": "train", "lora": "frozen", "qlora": "4bit"}[self.t.method]

    def adapted(self, lin: Linear) -> bool:
        return lin.name in inventory(self.m, self.t).adapted


def linear(c: LayerCtx, led: Ledger, x: T, lin: Linear) -> T:
    """Forward of one (possibly LoRA-wrapped) linear; returns its output.

    - trainable nn.Linear saves its input (under autocast: the bf16 cast of it);
    - frozen nn.Linear and bnb Linear4bit save nothing (MatMul4Bit keeps no input since bnb 0.43.2,
      PR #1270); Linear4bit returns ``.to(inp_dtype)``;
    - LoRA: peft casts x to the adapter dtype (always in ``lora/layer.py::Linear``; only without
      autocast in ``lora/bnb.py::Linear4bit``), applies dropout (saving its mask), lora_A saves its
      input, lora_B saves lora_A's output (r per token);
    - bnb Linear8bitLt (int8 QLoRA) keeps its input as a ``ctx`` attribute, not through
      ``save_for_backward`` (``MatMul8bitLt``: ``ctx.tensors = (CAt, subA, A)`` when an input needs
      grad; ``MatMul8bitFp``, its CPU training path: ``ctx.A = A``), so gradient checkpointing
      does not drop it (found by the trace engine).
    """
    d = c.d
    led.events.append(("linear", lin.name))
    if c.base == "train":
        led.save(cast(x, d.compute, f"{lin.name}.in_cast") if d.autocast else x)
        out_e = d.compute if d.autocast else d.load
    elif c.base == "frozen":
        out_e = d.compute if d.autocast else d.load
    else:
        out_e = x.e
    width = lin.out_features
    if c.adapted(lin):
        lora_branch(c, led, x, lin)
    if c.base == "4bit" and c.t.quant == "int8":
        led.held[x.name] = x.width * x.e
        if x.name not in led.saved:
            led.held_only.add(x.name)
            led.save(x)
    live_input = 0 if x.name in led.saved else x.width * x.e  # the caller still holds x
    if c.adapted(lin):
        if temps := lora_input_temps(c, x):
            # the base result, then the LoRA branch's fp32 copy of x while autocast casts it back
            led.in_flight(live_input + width * out_e + sum(temps), (width * out_e, *temps),
                          "copy")
        # ``result + lora_B(lora_A(x)) * scaling``: base result, scaled LoRA output and their sum
        lora_e = d.compute if d.autocast else FP32
        pieces = (width * out_e, width * lora_e, width * promote(out_e, lora_e))
    elif c.base == "4bit" and out_e != d.compute:
        pieces = (width * d.compute, width * out_e)  # gemm out + ``.to(inp_dtype)``
    else:
        pieces = (width * out_e,)
    led.in_flight(live_input + sum(pieces), pieces)
    return T(f"{lin.name}.out", width, out_e)


def lora_input_temps(c: LayerCtx, x: T) -> tuple[int, ...]:
    """Per token, the LoRA branch's unsaved copies of its input alive at lora_A: under autocast
    peft's fp32 copy of x (``_cast_input_dtype``), which autocast casts back for lora_A's matmul
    (that cast is what lora_A saves), and with dropout its fp32 output beside it. None without
    autocast (lora_A saves the fp32 copy itself) or where peft leaves the cast to autocast
    (bitsandbytes layers). Found by the trace engine (CPU LoRA mixed with checkpointing)."""
    d = c.d
    if not d.autocast or c.base == "4bit" or x.e == FP32:
        return ()
    copy = x.width * FP32
    return (copy, copy) if c.t.lora_dropout > 0 else (copy,)


def lora_branch(c: LayerCtx, led: Ledger, x: T, lin: Linear) -> None:
    """What one LoRA adapter keeps for backward (peft ``tuners/lora``)."""
    d = c.d
    converts = c.base != "4bit" or not d.autocast
    xa = cast(x, FP32, f"{lin.name}.lora_cast") if converts else x
    if c.t.lora_dropout > 0:
        led.save(T(f"{lin.name}.dropout_mask", xa.width, 1 if d.bool_dropout_mask else xa.e))
        xa = T(f"{lin.name}.dropout_out", xa.width, xa.e)
    if d.autocast:
        xa = cast(xa, d.compute, f"{lin.name}.lora_A_in")
    led.save(xa)
    led.save(T(f"{lin.name}.lora_A_out", c.t.lora_r, d.compute if d.autocast else FP32))


def rmsnorm(c: LayerCtx, led: Ledger, x: T, name: str, rows: int = 1) -> T:
    """RMSNorm saves an fp32 view of x (x itself when fp32) and rsqrt; a trainable weight also
    saves the normalised input. Llama style returns weight·y (promoted dtype); Gemma style returns
    ``type_as(x)``. Ref: ``LlamaRMSNorm.forward``, ``Gemma2RMSNorm.forward``."""
    gemma = c.m.norm_style == "gemma"
    led.save(cast(x, FP32, f"{name}.x32"))
    led.save(T(f"{name}.rsqrt", rows, FP32))
    if c.t.method == "full":  # a trainable weight
        led.save(T(f"{name}.normed", x.width, FP32 if gemma else x.e))
    return T(f"{name}.out", x.width, norm_out_bytes(c.m, c.t, c.d, x.e))


def norm_out_bytes(m: ModelSpec, t: TrainSpec, d: Dtypes, x_e: int) -> int:
    """Bytes per element of an RMSNorm's output for an input of ``x_e`` bytes: Llama style
    weight · y in the promoted dtype, Gemma style ``type_as(x)``."""
    return x_e if m.norm_style == "gemma" else promote(param_bytes(t, d), x_e)


def attention(c: LayerCtx, led: Ledger, x: T, lins: dict[str, Linear]) -> T:
    """Self-attention: projections, optional q/k norms, RoPE, SDPA/FA2 or eager, o_proj.

    RoPE (``q*cos + rotate_half(q)*sin``) saves only cos/sin (shared, counted once per forward);
    SDPA/FA2 save q, k, v, the output and an fp32 logsumexp of nh per token, with GQA k/v unrepeated
    (transformers ``use_gqa_in_sdpa`` with no mask); eager repeats k/v and saves the fp32 softmax
    and its cast copy (nh·s each), and with attention soft-capping (Gemma-2) tanh's output. The SDPA
    output already has (b, s, nh, hd) strides, so HF's
    ``transpose(1, 2).contiguous()`` before o_proj makes no copy, except on CPU when RoPE made q
    with ``torch.cat`` (Phi-3): the CPU flash kernel then writes (b, nh, s, hd) and o_proj's input
    is a copy (found by the engines' cross-check). Eager's ``matmul(probs, v)``
    saves no output: its (b, s, nh, hd) copy is o_proj's input, kept only if o_proj saves its
    input (found by the engines' cross-check on Gemma-2).
    """
    m, d = c.m, c.d
    if m.fused_qkv:
        qkv = linear(c, led, x, lins["qkv_proj"])
        q, k, v = (T(qkv.name, m.q_dim, qkv.e), T(qkv.name, m.kv_dim, qkv.e),
                   T(qkv.name, m.q_dim + 2 * m.kv_dim, qkv.e))  # v is a view: keeps all of qkv
    else:
        q, k, v = (linear(c, led, x, lins[n]) for n in ("q_proj", "k_proj", "v_proj"))
    if m.qk_norm:
        q = rmsnorm(c, led, q, "q_norm", rows=m.num_attention_heads)
        k = rmsnorm(c, led, k, "k_norm", rows=m.num_key_value_heads)
    cos_e = d.nonquant  # cos/sin follow the embedding output dtype
    q = T("q_rope", m.q_dim, promote(q.e, cos_e))
    k = T("k_rope", m.kv_dim, promote(k.e, cos_e))
    if d.autocast:
        q, k = cast(q, d.compute, "q_sdpa"), cast(k, d.compute, "k_sdpa")
        v = cast(v, d.compute, "v_sdpa")
    e = q.e
    if c.t.attn == "eager":
        k, v = T("k_repeat", m.q_dim, e), T("v_repeat", m.q_dim, e)
        s, nh = c.t.seq_len, m.num_attention_heads
        # ``matmul(q, k.T) * scaling`` then ``+ mask``: two score-sized tensors at a time
        led.in_flight(2 * nh * s * e, (nh * s * e, nh * s * e))
        if m.attn_logit_softcapping:  # Gemma-2: ``tanh(scores / cap) * cap``; tanh saves its output
            led.save(T("attn_softcap_tanh", nh * s, e))
        probs = T("attn_probs_fp32", nh * s, FP32)  # softmax(..., dtype=float32)
        led.save(probs)
        led.save(cast(probs, e, "attn_probs"))  # .to(query.dtype): no copy when fp32
    else:
        led.save(T("attn_lse", m.num_attention_heads, FP32))
    for t in (q, k, v):
        led.save(t)
    out = T("attn_out", m.q_dim, e)
    if c.t.attn == "eager":  # matmul output and its .contiguous() copy, for a moment together
        led.in_flight(2 * m.q_dim * e, (m.q_dim * e, m.q_dim * e))
    else:  # SDPA returns (b, s, nh, hd) strides: .contiguous() is free, and SDPA saves it
        led.save(out)
        if m.rope_cat and d.sdpa_follows_query:
            out = T("attn_out_copy", m.q_dim, e)
    return linear(c, led, out, lins["o_proj"])


def dense_mlp(c: LayerCtx, led: Ledger, x: T, lins: dict[str, Linear]) -> T:
    """SwiGLU / GeGLU MLP: act saves its input (gate), the product saves act(gate) and up,
    down saves the product when trainable or adapted. Phi3's gate_up output is one tensor of which
    gate and up are views."""
    i = c.m.intermediate_size
    if c.m.fused_gate_up:
        gu = linear(c, led, x, lins["gate_up_proj"])
        led.save(gu)
        up_e = gate_e = gu.e
    else:
        gate, up = linear(c, led, x, lins["gate_proj"]), linear(c, led, x, lins["up_proj"])
        led.save(gate)
        led.save(up)
        gate_e, up_e = gate.e, up.e
    act = T("act_out", i, gate_e)
    led.save(act)
    led.mlp_e = promote(gate_e, up_e)
    before = led.bytes_per_token()
    out = linear(c, led, T("mlp_prod", i, led.mlp_e), lins["down_proj"])
    led.down_input_bytes = led.bytes_per_token() - before
    return out


def experts_trainable(c: LayerCtx) -> bool:
    """Expert weights carry grad: full fine-tuning, or peft "all-linear" on a transformers-5 MoE
    (``target_parameters`` LoRA merges W + B·A into the expert stack every forward)."""
    return c.t.method == "full" or inventory(c.m, c.t).all_linear


def param_bytes(t: TrainSpec, d: Dtypes) -> int:
    """Bytes per element of the base model's unquantised parameters (norm weights, lm_head, an
    MoE's fused experts): the trainable dtype in full fine-tuning, else the frozen ones' (fp32
    after k-bit preparation)."""
    return d.trainable if t.method == "full" else d.nonquant


def moe_mlp(c: LayerCtx, led: Ledger, x: T) -> T:
    """Mixtral sparse MoE (transformers 5.x ``MixtralExperts``: fused 3-D expert weights, frozen and
    unquantised in QLoRA). Per routed token copy (k per token): the gate_up output (kept by
    act/chunk views) and act output; when the expert weights carry grad also the gathered input,
    the product and the down output (``* top_k_weights``, which carries grad through the router).
    Router: fp32 softmax probabilities (E per token), top-k weights and indices.

    The expert intermediates are in the experts' weight dtype, autocast or not: ``_grouped_mm``
    has no autocast kernel, so transformers casts its input to the weight's dtype
    (``integrations/moe.py::_grouped_mm``: ``input.to(weight.dtype)``), and peft merges W + B·A
    with autocast disabled (``_LoraFactorsProxy``). QLoRA's experts are fp32 after
    ``prepare_model_for_kbit_training`` (found by the engines' cross-check: CPU mixed QLoRA)."""
    m, d, k = c.m, c.d, c.m.num_experts_per_tok
    i, h = m.intermediate_size, m.hidden_size
    e = param_bytes(c.t, d)
    trainable = experts_trainable(c)
    if trainable:
        led.save(cast(x, d.compute, "router_in_cast") if d.autocast else x)
    led.save(T("router_probs", m.num_local_experts, FP32))
    led.save(T("router_topk", k, FP32 + 8))  # top-k weights (fp32) + indices (int64)
    # per routed copy (k per token), in the order the experts' forward makes them
    pieces = (("moe_in", h), ("moe_gate_up", 2 * i), ("moe_act", i), ("moe_prod", i),
              ("moe_down_out", h)) if trainable else (("moe_gate_up", 2 * i), ("moe_act", i))
    for name, width in pieces:
        led.save(T(name, width * k, e))
    led.mlp_e = e
    # trainable experts save their down output: in flight at the end are the weighted copies
    # and their reordering for the sum over k (two R·h in fp32, the routing weights' dtype;
    # from the trace engine's event log)
    if trainable:
        led.in_flight(2 * h * FP32 * k, (h * FP32 * k, h * FP32 * k))
    else:
        led.in_flight(2 * i * e * k)
    led.events.append(("moe_end", None))
    return T("moe_out", h, e)


def layer_ledger(c: LayerCtx) -> Ledger:
    """Saved tensors of one decoder layer (no checkpointing), bytes per token."""
    led = Ledger()
    lins = inventory(c.m, c.t).linear_by_name
    x = T("layer_in", c.m.hidden_size, c.d.residual)
    gemma2 = c.m.post_norms
    normed = rmsnorm(c, led, x, "input_norm")
    norm_saves = tuple(led.saved)
    a = attention(c, led, normed, lins)
    masks = tuple(f"{name}.dropout_mask" for name in ("qkv_proj", "q_proj", "k_proj", "v_proj"))
    led.frozen_input_saves = norm_saves + tuple(x for x in masks if x in led.saved)
    if gemma2:
        a = rmsnorm(c, led, a, "post_attn_norm")
    x2 = T("resid_mid", c.m.hidden_size, promote(x.e, a.e))
    n2 = rmsnorm(c, led, x2, "pre_mlp_norm")
    mlp = moe_mlp(c, led, n2) if c.m.is_moe else dense_mlp(c, led, n2, lins)
    if gemma2:
        rmsnorm(c, led, mlp, "post_mlp_norm")
    return led


_SHAPE_FREE = tuple(f.name for f in fields(TrainSpec) if f.name not in ("seq_len", "batch"))
_PER_TOKEN: dict[tuple, TrainSpec] = {}


def per_token_setup(t: TrainSpec) -> TrainSpec:
    """The setup with the batch shape taken out (seq 1, batch 1): what the resident terms and
    the per-token layer ledger depend on. Eager attention's ledger holds s × s scores, so there
    the sequence length stays. Memoised on the other fields (a sweep makes one per setup)."""
    seq = t.seq_len if t.attn == "eager" else 1
    key = (seq, *(getattr(t, name) for name in _SHAPE_FREE))
    found = _PER_TOKEN.get(key)
    if found is None:
        if len(_PER_TOKEN) > 4096:
            _PER_TOKEN.clear()
        found = _PER_TOKEN[key] = replace(t, seq_len=seq, batch=1)
    return found


def frozen_first_input(t: TrainSpec) -> bool:
    """Whether the first decoder layer's input needs no grad: LoRA/QLoRA (frozen embedding)
    without gradient checkpointing. Its input norm then saves nothing (no grad flows into it;
    its weight is frozen). With checkpointing, transformers' ``gradient_checkpointing_enable``
    and peft's ``prepare_model_for_kbit_training`` call ``enable_input_require_grads``, so the
    embedding output requires grad. Ref: torch autograd saves only for inputs that need grad;
    found by the trace engine (tests/trace/test_crosscheck.py)."""
    return t.method != "full" and not t.grad_ckpt


def ledger_for(m: ModelSpec, t: TrainSpec, device: str) -> Ledger:
    """The layer ledger of a setup, built once per model and batch-shape-free setup (see
    :func:`per_token_setup`) and shared by the estimate, the allocator replay and the step-time
    model. Shared: read it, never change it."""
    return _ledger(m, per_token_setup(t), device)


@lru_cache(maxsize=4096)
def _ledger(m: ModelSpec, t: TrainSpec, device: str) -> Ledger:
    return layer_ledger(LayerCtx(m, t, dtypes_for(t, device)))
