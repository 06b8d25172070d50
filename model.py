"""A from-scratch Llama (Llama-2 layout) in plain PyTorch, exact against Hugging Face checkpoints.

Read top to bottom: config -> the attention mask description -> the one attention function -> the model
(RMSNorm, rotary embeddings, attention, SwiGLU MLP, blocks, output projection and loss) -> KV cache, prefill and
generation -> CLI. Hugging Face checkpoint folders are read and written by hf_checkpoint.py, LoRA lives in lora.py.

Conventions that matter for exactness:
- Rotary embeddings use the Hugging Face "rotate-half" layout. HF checkpoints store q_proj/k_proj rows permuted for
  it (Meta's original weights interleave the pairs), so HF weights load here unchanged.
- Parameter names equal Hugging Face's minus the leading "model.", so loading and saving is a rename, not a remap.
- Models are built on the meta device (no memory), then `to_empty()` + `init_weights()` or `hf_checkpoint.load_weights()`:
  a 70B model can be created instantly and sharded before any memory is used (torchtitan's habit).
"""
import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fused_attention import flex_attention_path, prepend_prefix, shared_prefix_attention


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention (Llama-2-70B uses 8)
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or Llama-3.x's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or {"rope_type": "linear", "factor"} (transformers' rope_parameters)
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # "rope": rotary embeddings (every Llama); "learned": GPT-2-style absolute position embeddings added to the input
    # (max_seq_len of them), rotary off -- the official backbone of the CFT paper's synthetic experiment
    positions: str = "rope"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: dim {self.dim} must divide into n_heads {self.n_heads}, "
                             f"and n_heads into n_kv_heads {self.n_kv_heads}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"config: positions {self.positions!r} must be 'rope' or 'learned'")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset '{name}'; choose from {', '.join(MODEL_PRESETS)}")
        return replace(MODEL_PRESETS[name], **overrides)

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        """Read a Hugging Face Llama config.json (or the folder holding it). Every setting either loads with logits
        equal to transformers' LlamaForCausalLM or is refused with one line naming the field."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (expected a Hugging Face Llama config.json)")
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields, found {type(hf).__name__}")
        _check_supported(hf, path)
        sizes = {key: _positive_int(hf, key, path) for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                               "num_attention_heads", "intermediate_size")}
        n_kv = _positive_int(hf, "num_key_value_heads", path) if hf.get("num_key_value_heads") is not None \
            else sizes["num_attention_heads"]
        theta, scaling = _rope_settings(hf, path)
        try:
            cfg = cls(vocab_size=sizes["vocab_size"], dim=sizes["hidden_size"], n_layers=sizes["num_hidden_layers"],
                      n_heads=sizes["num_attention_heads"], n_kv_heads=n_kv, ffn_dim=sizes["intermediate_size"],
                      norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=theta, rope_scaling=scaling,
                      max_seq_len=_positive_int(hf, "max_position_embeddings", path, default=4096),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 2))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
        if hf.get("head_dim") is not None and hf["head_dim"] != cfg.head_dim:
            raise ValueError(f"{path}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads {cfg.head_dim}")
        return cfg

    def to_hf_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        if self.positions != "rope":
            raise ValueError("config: a model with learned positions has no Hugging Face Llama config")
        rope = {"rope_type": "default", "rope_theta": self.rope_theta} | (self.rope_scaling or {})
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.ffn_dim, "rms_norm_eps": self.norm_eps,
                # both spellings: rope_theta/rope_scaling (transformers < 5, vLLM), rope_parameters (transformers 5)
                "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling, "rope_parameters": rope,
                "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
                "attention_bias": False, "mlp_bias": False, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id, "torch_dtype": str(dtype).removeprefix("torch.")}

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + embeddings + self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token for MFU: 6N for the matmuls + 12·layers·dim·seq for attention (PaLM appendix B).
        N leaves out the input embedding, a lookup and no matmul (unless tied: then it is the output projection), as
        PaLM's and Megatron's MFU figures do; BENCHMARKS.md measures transformers' LlamaForCausalLM the same way."""
        input_embedding = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return 6 * (self.num_params() - input_embedding) + 12 * self.n_layers * self.dim * seq_len


def _check_supported(hf: dict, path) -> None:
    """Refuse, naming the field, any architecture or setting that this Llama does not compute."""
    if hf.get("architectures") not in (None, ["LlamaForCausalLM"]):
        raise ValueError(f"{path}: architectures={hf['architectures']!r} is not supported (expected "
                         f"['LlamaForCausalLM'])")
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type={hf['model_type']!r} is not supported (expected 'llama')")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                          ("sliding_window", None), ("partial_rotary_factor", 1.0)):
        if hf.get(key, expected) != expected:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (expected {expected!r})")


def _positive_int(hf: dict, key: str, path, default=None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise ValueError(f"{path}: missing field {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path}: field {key} is {value!r}, expected a positive integer")
    return value


ROPE_SCALING_FIELDS = {"linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_settings(hf: dict, path) -> tuple[float, dict | None]:
    """(theta, scaling) from rope_theta/rope_scaling (transformers < 5) or rope_parameters (transformers >= 5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ValueError(f"{path}: rope_parameters / rope_scaling must be JSON objects")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"{path}: rope_theta is {theta!r}, expected a positive number")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ROPE_SCALING_FIELDS:
        raise ValueError(f"{path}: rope scaling of type {rope_type!r} is not supported (supported: default, "
                         f"{', '.join(ROPE_SCALING_FIELDS)})")
    missing = [k for k in ROPE_SCALING_FIELDS[rope_type] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"{path}: rope scaling {rope_type!r} needs a number for {missing[0]}")
    return float(theta), {"rope_type": rope_type} | {k: scaling[k] for k in ROPE_SCALING_FIELDS[rope_type]}


# One spelling of precision for every script's --precision: the weights' dtype for inference; for training, the
# compute dtype (bf16: autocast or FSDP's MixedPrecisionPolicy over fp32 master weights).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device) -> str:
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


_llama2_7b = ModelConfig()
_llama2_13b = ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824)
_llama2_70b = ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672)
_llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_llama31_8b = ModelConfig(vocab_size=128256, n_kv_heads=8, ffn_dim=14336, rope_theta=500000.0, max_seq_len=131072,
                          rope_scaling=_llama3_rope, bos_token_id=128000, eos_token_id=128001)
_llama32_1b = replace(_llama31_8b, dim=2048, n_layers=16, ffn_dim=8192, tie_embeddings=True,
                      rope_scaling=_llama3_rope | {"factor": 32.0})
_llama3 = {"llama3.1-8b": _llama31_8b, "llama3.2-1b": _llama32_1b,
           "llama3.2-3b": replace(_llama32_1b, dim=3072, n_layers=28, n_heads=24)}
MODEL_PRESETS = {
    "llama2-7b": _llama2_7b, "llama2-7b-chat": _llama2_7b, "llama2-13b": _llama2_13b, "llama2-13b-chat": _llama2_13b,
    "llama2-70b": _llama2_70b, "llama2-70b-chat": _llama2_70b, **_llama3,  # instruct: eos = end of text, message, turn
    **{f"{name}-instruct": replace(cfg, eos_token_id=[128001, 128008, 128009]) for name, cfg in _llama3.items()},
    # 8.9M parameters (most of them the 32k-token embeddings), grouped-query attention: CPU tests and demos.
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=1024),
}


# ----------------------------------------------------------------------------------------------------------------------
# The attention mask: a compact description, turned into a kernel mask inside `attention` only.


@dataclass(frozen=True)
class AttentionMask:
    """Who may attend to whom: the caller's description, never modified (a forward derives a MaskLayout from it).

    Key index space, per batch row: [P prefix positions (prefix_kv) | cached tokens | this call's tokens].
    Query t's own key index is P + query_offset + t. Attention is always causal; on top of that:
      hidden_span (B, 2) long  [start, end) key indices hidden from row b (leave-one-out: demonstration i's span is
                               hidden from pair i). A query lying inside the span still sees it, so a span that is part
                               of the sequence itself (strict CT-Prompt) behaves as if it were removed for the others.
      dropped     (B, D) bool  key positions 0..D-1 dropped for row b (token dropout); a query never loses its own key.
      doc_ids     (B, L) long  document id of each of the row's own keys (cache + this call), for packed sequences:
                               no attention across documents; prefix keys are shared by every document.
      pad_left    (B,) long    left-padding tokens at the start of row b's own keys (batched generation); they are
                               invisible, and a padding query sees only itself so that no row is empty.
    """
    hidden_span: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    pad_left: torch.Tensor | None = None

    def varies_by_row(self) -> bool:
        return any(t is not None for t in (self.hidden_span, self.dropped, self.doc_ids, self.pad_left))


@dataclass
class MaskLayout:
    """What the attention kernel needs for one forward pass: the caller's mask, where the keys sit (P prefix positions,
    then query_offset cached ones), and the masks built for it (FlexAttention block masks, the shared prefix's dense
    mask; once per forward, shared by every layer). Made by Transformer.hidden_states (or a test/benchmark calling
    `attention` directly)."""
    mask: AttentionMask = field(default_factory=AttentionMask)
    prefix_len: int = 0
    query_offset: int = 0
    block_masks: dict = field(default_factory=dict, repr=False)

    def is_plain_causal(self) -> bool:
        return self.prefix_len == 0 and self.query_offset == 0 and not self.mask.varies_by_row()


def allowed(layout: MaskLayout, b, q_idx, kv_idx):
    """THE mask rule: may query q_idx of row b attend to key kv_idx? Broadcasting integer tensors in, bool out.

    The same function builds the dense mask of the exact path and is FlexAttention's mask_mod on CUDA, so the two
    paths cannot disagree about the rule.
    """
    mask, P = layout.mask, layout.prefix_len
    q_key = P + layout.query_offset + q_idx  # the query's own key index
    is_self = kv_idx == q_key
    ok = kv_idx <= q_key  # causal; prefix keys (kv_idx < P) always pass
    if mask.pad_left is not None:
        is_pad = (kv_idx >= P) & (kv_idx < P + mask.pad_left[b])
        ok = ok & (~is_pad | is_self)
    if mask.doc_ids is not None:
        last = mask.doc_ids.shape[1] - 1
        same_doc = mask.doc_ids[b, (kv_idx - P).clamp(0, last)] == mask.doc_ids[b, (q_key - P).clamp(0, last)]
        ok = ok & ((kv_idx < P) | same_doc)
    if mask.hidden_span is not None:
        lo, hi = mask.hidden_span[b, 0], mask.hidden_span[b, 1]
        ok = ok & ~((kv_idx >= lo) & (kv_idx < hi) & ~((q_key >= lo) & (q_key < hi)))
    if mask.dropped is not None:
        n = mask.dropped.shape[1]
        is_dropped = (kv_idx < n) & mask.dropped[b, kv_idx.clamp(0, n - 1)]
        ok = ok & (~is_dropped | is_self)
    return ok


def dense_mask(layout: MaskLayout, batch: int, n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """(batch, 1, n_queries, n_keys) bool, True = may attend. Exact path only (memory grows as queries x keys)."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    q = torch.arange(n_queries, device=device).view(1, 1, -1, 1)
    kv = torch.arange(n_keys, device=device).view(1, 1, 1, -1)
    return allowed(layout, b, q, kv).expand(batch, 1, n_queries, n_keys)


# ----------------------------------------------------------------------------------------------------------------------
# The one attention function: training, CT-KV, prefix tuning, evaluation and generation all call this.

def attention(q, k, v, layout: MaskLayout, prefix=None):
    """Scaled dot-product attention under a mask layout (an AttentionMask placed in key space).

    q (B, H, T, D); k, v (B, Hkv, S, D): the row's own keys (cached + this call), already rotated;
    prefix: (k, v) each (1 or B, Hkv, P, D); batch 1 is shared by every row and never copied per row.
    Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    P = 0 if prefix is None else prefix[0].shape[2]
    if P != layout.prefix_len:
        raise ValueError(f"attention: prefix has {P} positions but the layout describes {layout.prefix_len}")
    gqa = H != k.shape[1]
    if layout.is_plain_causal():  # the common training case: SDPA picks its fastest causal kernel (flash/cuDNN)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    shared_prefix = prefix is not None and prefix[0].shape[0] == 1 and B > 1
    # A batch-1 prefix expanded to the rows (scoring's per_row_prefix: the plain FlexAttention path on CUDA): where the
    # exact path would copy it per row, it is attended once (a 1,024-position 7B prefix x 2,048 rows: 32.5 GiB, H200).
    expanded_prefix = (prefix is not None and prefix[0].shape[0] == B > 1 and prefix[0].stride(0) == 0
                       and prefix[1].stride(0) == 0)
    cpu = q.device.type != "cuda"
    if (shared_prefix and (cpu or T == 1 or B * T < 128)) or (expanded_prefix and (cpu or T < 128)):
        # Exact, the prefix stored once: on CPU, for decode steps (FlexAttention's folded 128 x 128 tiles would be
        # almost all masked, and its block mask rebuilt every step) and for fewer than 128 queries.
        prefix = (prefix[0][:1], prefix[1][:1])
        return shared_prefix_attention(q, k, v, prefix, _shared_prefix_keep(layout, B, T, P + k.shape[2], q.device))
    if cpu or (T < 128 and not shared_prefix):
        # Exact path: on CPU (FlexAttention has no CPU backward), and for fewer than 128 queries (decode steps, short
        # pairs), where FlexAttention switches to a decoding kernel that fails to compile for some shapes (torch 2.11)
        # and the dense mask is small anyway (under 128 x keys per row).
        k, v = prepend_prefix(k, v, prefix)
        keep = dense_mask(layout, B, T, k.shape[2], q.device)
        # On CUDA the math backend: SDPA would pick the memory-efficient kernel, whose backward fails for some short
        # shapes ("LSE is not correctly aligned (strideH)", torch 2.11, context tuning's regression backbone).
        with sdpa_kernel(SDPBackend.MATH) if q.is_cuda else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
    return flex_attention_path(q, k, v, layout, prefix, gqa, allowed)


def _shared_prefix_keep(layout: MaskLayout, batch: int, n_queries: int, n_keys: int, device):
    """The dense mask in shared_prefix_attention's score layout (1, batch or 1, 1, n_queries, n_keys), built once per
    forward and shared by every layer (decode steps would otherwise rebuild it per layer)."""
    key = ("shared prefix dense", batch, n_queries, n_keys)
    if key not in layout.block_masks:
        at = lambda n, dim: torch.arange(n, device=device).view([-1 if d == dim else 1 for d in range(5)])
        layout.block_masks[key] = allowed(layout, at(batch, 1), at(n_queries, 3), at(n_keys, 4))
    return layout.block_masks[key]


# ----------------------------------------------------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, exactly as Hugging Face's LlamaRMSNorm.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 rotation frequencies theta^(-2i/head_dim), with Llama-3's or linear scaling applied as in
    transformers' modeling_rope_utils (_compute_llama3_parameters, _compute_linear_scaling_rope_parameters)."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: long wavelengths slowed down by `factor`, short ones kept, a smooth blend in between
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, blended, scaled)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor):
    """cos, sin of shape positions.shape + (head_dim,), in fp32: rotation angle pos * inv_freq[i]."""
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: the pair of dim i is dim i + head_dim/2
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x (B, H, T, D); cos/sin (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layout: MaskLayout, prefix=None, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:  # rotary positions (None: learned absolute positions were added to the input)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = attention(q, k, v, layout, prefix)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, layout: MaskLayout, prefix=None, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, prefix, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        # Tied models read the output projection from the embedding table (no separate parameter to keep in sync).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random init as Hugging Face's LlamaPreTrainedModel (normal(0, 0.02), norms at 1). Separate from __init__
        so that a model built on the meta device gets memory (`to_empty`) before any values are written."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif hasattr(module, "lora_a"):  # lora.LoRALinear: A random, B zero (its own init)
                module.init_weights()
        return self

    def hidden_states(self, tokens=None, *, embeds=None, positions=None, mask=None, prefix_kv=None, cache=None):
        """Final-normed hidden states (B, T, dim). See `forward` for the arguments."""
        if (tokens is None) == (embeds is None):
            raise ValueError("Transformer: pass exactly one of tokens or embeds")
        x = self.embed_tokens(tokens) if embeds is None else embeds
        B, T = x.shape[:2]
        P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
        offset = 0 if cache is None else cache.length
        layout = MaskLayout(mask or AttentionMask(), prefix_len=P, query_offset=offset)
        if positions is None:
            positions = torch.arange(P + offset, P + offset + T, device=x.device)
            if layout.mask.pad_left is not None:  # each row's first real token sits at position P
                positions = (positions[None] - layout.mask.pad_left[:, None].to(x.device)).clamp(min=0)
        if self.embed_positions is None:
            cos, sin = rotary_cos_sin(positions, rope_inv_freq(self.cfg, x.device))
        else:
            x, cos, sin = x + self.embed_positions(positions), None, None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, layout, None if prefix_kv is None else prefix_kv[i], cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def logits(self, hidden):
        """Hidden states (..., dim) -> logits (..., vocab): the output projection, which tied models read from the
        embedding table."""
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)

    def loss(self, hidden, targets, reduction: str = "sum"):
        """Next-token cross-entropy of hidden states (B, T, dim) against targets (B, T) (-100 = no loss), in fp32.
        reduction "sum" (training divides by the global token count itself) or "none" ((B, T), 0 where ignored)."""
        logits = self.logits(hidden).float()
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
        return losses if reduction == "sum" else losses.view(targets.shape)

    def forward(self, tokens=None, *, embeds=None, positions=None, mask=None, prefix_kv=None, cache=None):
        """Logits (B, T, vocab).

        tokens (B, T) long, or embeds (B, T, dim) (soft prompts, the synthetic regression model);
        positions (T,) or (B, T) positions (rotary, or learned), default P + cache length + arange(T) (minus left
        padding);
        mask: AttentionMask (None = plain causal); prefix_kv: per layer (k, v), each (1 or B, Hkv, P, head_dim) with
        keys already rotated for positions 0..P-1 (CT-KV, prefix tuning); cache: KVCache, appended in place.
        """
        return self.logits(self.hidden_states(tokens, embeds=embeds, positions=positions, mask=mask,
                                              prefix_kv=prefix_kv, cache=cache))


def create_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, seed: int | None = None) -> Transformer:
    """Meta-device build, then memory on `device`, then random init."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    return model.init_weights()


# ----------------------------------------------------------------------------------------------------------------------
# KV cache and generation


class KVCache:
    """Per-layer keys/values (B, Hkv, max_len, head_dim), filled left to right; `length` positions are valid."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k, v):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: {end} positions needed but the cache holds {self.max_len}")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def prefix(self):
        """The cached positions as a prefix_kv argument: list over layers of (k, v)."""
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in zip(self.k, self.v)]


@torch.no_grad()
def prefill(model: "Transformer", tokens=None, *, embeds=None):
    """The one prefill: every layer's (k, v) over a context of tokens (B, P) or embeddings (B, P, dim), keys rotated
    for positions 0..P-1, in the model's dtype: the `prefix_kv` after which later calls start at position P (CT-KV's
    initial cache, an evaluation group's shared few-shot prefix). None for an empty context."""
    x = model.embed_tokens(tokens) if embeds is None else embeds.to(model.embed_tokens.weight.dtype)
    if x.shape[1] == 0:
        return None
    cache = KVCache(model.cfg, x.shape[0], x.shape[1], x.device, x.dtype)
    model.hidden_states(embeds=x, cache=cache)
    return cache.prefix()


def sample_next(logits, temperature: float = 0.0, top_p: float = 1.0, generator=None):
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set with mass >= top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


_warned_past_max_seq_len = False  # generate's warning is said once per process (evaluation calls it per batch)


@torch.no_grad()
def generate(model: Transformer, prompts, max_new_tokens: int, *, temperature=0.0, top_p=1.0, eos_id=None,
             pad_id=0, prefix_kv=None, generator=None):
    """Continue a batch of token-id prompts (left-padded together). Returns the new tokens of each prompt, cut
    before the first eos_id (an id or a list of ids)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    param = next(model.parameters())
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p)
    tokens = tokens.to(param.device)
    mask = AttentionMask(pad_left=torch.tensor([L - len(p) for p in prompts], device=param.device))
    P = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    global _warned_past_max_seq_len
    if P + L + max_new_tokens > model.cfg.max_seq_len and not _warned_past_max_seq_len:
        print(f"warning: generating to {P + L + max_new_tokens} positions, past max_seq_len {model.cfg.max_seq_len} "
              "(said once)", file=sys.stderr)
        _warned_past_max_seq_len = True
    stop = set(eos_id) if isinstance(eos_id, (list, tuple, set)) else {eos_id}  # Llama-3 configs list several
    cache = KVCache(model.cfg, B, L + max_new_tokens, param.device, param.dtype)
    # Through the model's forward (cft.py's FSDP-wrapped LanguageModel generates too: its root must run).
    logits = model(tokens, mask=mask, prefix_kv=prefix_kv, cache=cache)[:, -1]
    new_tokens = [[] for _ in range(B)]
    finished = [False] * B
    for _ in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_p, generator)
        for i, tok in enumerate(next_ids.tolist()):
            if finished[i]:
                continue
            if tok in stop:
                finished[i] = True
            else:
                new_tokens[i].append(tok)
        if all(finished):
            break
        # Finished rows keep decoding (their tokens are ignored) so the batch stays rectangular.
        logits = model(next_ids[:, None], mask=mask, prefix_kv=prefix_kv, cache=cache)[:, -1]
    return new_tokens


# ----------------------------------------------------------------------------------------------------------------------
# CLI: `python model.py --model llama2-7b --prompt "..."` (real weights, resolved as every script resolves them),
# `--checkpoint DIR`, or `--random-init --model tiny` (random weights of a preset's shape, token ids only)


def cli_folder(args) -> "Path | None":
    """The CLI's Hugging Face folder (None for --random-init): a --model name resolves through hf_checkpoint's search
    (--model-dir, the Hugging Face cache, a path) and is refused with one line when absent."""
    from hf_checkpoint import resolve_model  # below model.py's classes: imported when the CLI runs
    if args.random_init:
        return None
    if args.checkpoint:
        return Path(args.checkpoint)
    folder = resolve_model(args.model, args.model_dir)
    print(f"model {args.model}: weights from {folder}")
    return folder


def cli_model(args, cfg: ModelConfig, folder, dtype, prompt_tokens: int) -> Transformer:
    """The CLI's model, after the memory check (weights + the prompt's and answer's keys/values and logits)."""
    from hf_checkpoint import check_memory, inference_bytes, load_pretrained
    if folder is None:
        print(f"{args.model or 'tiny'}: random weights (--random-init), {cfg.num_params():,} parameters")
    if args.memory_check:
        needed = inference_bytes(cfg, dtype, batch_tokens=prompt_tokens + args.max_new_tokens)
        check_memory(needed, args.device, "would fit: " + ("--precision bf16 or " if dtype == torch.float32 else "")
                     + "a device with more memory")
    model = create_model(cfg, args.device, dtype, seed=args.seed) if folder is None else \
        load_pretrained(folder, args.device, dtype)
    return model.eval()


def main(argv=None):
    from config_flags import OneLineParser  # one-line errors for bad flags, as evaluate.py and context_tuning.py
    parser = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help=f"a preset ({', '.join(MODEL_PRESETS)}), a Hugging Face repository id or a "
                        "folder: real weights, looked up in --model-dir, the Hugging Face cache, then as a path")
    parser.add_argument("--model-dir", help="a folder of model folders, searched first for --model")
    parser.add_argument("--checkpoint", help="Hugging Face Llama folder (config.json + safetensors)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights of the --model preset's shape (default tiny): no tokenizer, token ids")
    parser.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json (default: the checkpoint's own)")
    parser.add_argument("--prompt", default="The patient presented with", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=list(PRECISIONS), help="weights' dtype (default bf16 on CUDA, else fp32)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="skip the estimate of the memory needed against what the device has")
    args = parser.parse_args(argv)
    if args.checkpoint and (args.model or args.random_init):
        parser.error("--checkpoint and --model/--random-init: give one")
    if not (args.checkpoint or args.model or args.random_init):
        parser.error("give --model NAME (real weights), --checkpoint DIR, or --random-init [--model PRESET]")
    dtype = PRECISIONS[args.precision or default_precision(args.device)]
    torch.manual_seed(args.seed)
    try:
        folder = cli_folder(args)
        cfg = ModelConfig.from_name(args.model or "tiny") if folder is None else ModelConfig.from_hf(folder)
        from data import Tokenizer, folder_tokenizer_file
        tok = None  # none given and none in the folder: token ids, as with random weights
        if args.tokenizer or folder_tokenizer_file(folder):
            tok = Tokenizer.resolve(args.tokenizer, folder)
        prompt = tok.encode(args.prompt, bos=True) if tok else [cfg.bos_token_id if cfg.bos_token_id is not None else 1]
        model = cli_model(args, cfg, folder, dtype, len(prompt))
        generator = torch.Generator(args.device).manual_seed(args.seed)
        sampling = dict(temperature=args.temperature, top_p=args.top_p, generator=generator)
        if tok:
            tok.check_vocab(model.cfg.vocab_size)
            ids = generate(model, [prompt], args.max_new_tokens, eos_id=tok.eos_id, **sampling)[0]
            print(args.prompt + tok.decode(ids))
        else:  # no tokenizer: token ids continuing [BOS]
            ids = generate(model, [prompt], args.max_new_tokens, eos_id=model.cfg.eos_token_id, **sampling)[0]
            print("generated token ids:", ids)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
