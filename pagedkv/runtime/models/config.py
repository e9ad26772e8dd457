"""Model configuration: the few numbers a decoder of the Llama family and its relatives
(Mistral, Qwen2/3, Qwen3-MoE, Gemma 3, Phi-3, SmolLM3) is built from.

One decoder layer is always: input norm, q/k/v projections (optional biases, optional per-head
RMS norms of q and k), rotary embedding (all, part or none of each head; per-layer base),
attention over the paged cache (full or a sliding window, per layer), o projection (optional
bias), then the MLP (gated SiLU or GELU, or a mixture of experts) between norms. The fields
below say which of these a model has; runtime.models.loader reads them from config.json or
GGUF metadata, runtime.models.llama runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


QUANTIZATION = ("auto", "none")  # auto: keep a GGUF file's quantized matrices; none: dequantize
ACTIVATIONS = ("silu", "gelu_tanh")  # the MLP's gate activation
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None for plain RoPE, else {"rope_type": "linear", "factor"}, Llama 3's {"rope_type":
    # "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    # or Phi-3's {"rope_type": "longrope", "short_factor", "long_factor",
    # "original_max_position_embeddings", "attention_factor"}.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "llama"  # the family (runtime.models.loader.FAMILIES), for messages and GGUF names
    # Sliding-window attention: layers whose type is SLIDING see the last `sliding_window`
    # positions up to their own (transformers' mask: key j is visible from query i when
    # i - j < sliding_window). An empty tuple: every layer FULL.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    # Rotary embedding per layer: an empty tuple rotates every layer; else 1 rotates, 0 does not
    # (SmolLM3's NoPE layers, transformers' `no_rope_layers`).
    no_rope_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' own base (their RoPE unscaled)
    partial_rotary_factor: float = 1.0     # Phi-3/4: the first part of each head is rotated
    qk_norm: bool = False                  # Qwen3, Gemma 3: RMS norm of each q and k head before rotary
    norm_unit_offset: bool = False         # Gemma: norms scale by (1 + weight), in float32
    sandwich_norms: bool = False           # Gemma 3: norms after attention and after the MLP too
    hidden_act: str = "silu"               # one of ACTIVATIONS
    embedding_multiplier: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar ** -0.5
    # Mixture of experts (Qwen3-MoE): layers with experts route each token to its top
    # `num_experts_per_tok` of `num_experts` MLPs of width moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer` in positions; 0 for full attention."""
        if self.layer_types and self.layer_types[layer] == SLIDING and self.sliding_window:
            return int(self.sliding_window)
        return 0

    @property
    def layer_windows(self) -> list[int]:
        return [self.layer_window(i) for i in range(self.num_layers)]

    def layer_rope(self, layer: int) -> int:
        """Which rotary embedding `layer` takes: 0 the model's, 1 the local one (Gemma 3's
        sliding layers), -1 none."""
        if self.no_rope_layers and not self.no_rope_layers[layer]:
            return -1
        if self.rope_local_theta is not None and self.layer_window(layer):
            return 1
        return 0

    @property
    def rotary_dim(self) -> int:
        """The dimensions of each head that are rotated (the first ones)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts (transformers' Qwen3-MoE rule)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % max(self.decoder_sparse_step, 1) == 0)

    @property
    def all_layers_windowed(self) -> bool:
        """Every layer sees a sliding window (so KV blocks that fell out of it can be freed)."""
        return self.num_layers > 0 and all(self.layer_windows)

    @property
    def kv_window(self) -> int | None:
        """The positions before a query that some layer still reads (the largest window) when
        every layer is windowed, so that the block manager frees the blocks before them; None
        when a layer attends to everything (Gemma 3's global layers): then every block is
        read to the end, and a block's memory is the same for all layers of a position."""
        return max(self.layer_windows) if self.all_layers_windowed else None
