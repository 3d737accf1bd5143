"""Model FLOPs per trained token, for MFU, counting both layer types and the LM head.

Training FLOPs = 3 x forward FLOPs (backward = 2 x forward); a multiply-add counts 2. Per token,
with hidden H, FFN width I, vocabulary V, sequence length s:

* SwiGLU MLP (every layer):        2 * 3 * H * I
* gated full attention layer:      projections 2 * H * (2*nh*hd [q + gate] + 2*ng*hd [k, v] + nh*hd [o])
                                   + scores and values 2 * 2 * nh * hd * s / 2   (causal: half the keys)
* Gated DeltaNet layer:            projections 2 * H * (2*Kd + 2*Vd + 2*Hv) [q,k | v,z | b,a] + 2 * Vd * H [out]
                                   + causal conv 2 * (2*Kd + Vd) * W
                                   + chunked delta rule per value head: 2 * C * (dk + dv) [intra-chunk
                                     q.k and attn.v over a chunk of C=64, causal half of 2*C] + 6 * dk * dv
                                     [state read, state update, output read]
* LM head:                         2 * H * V
(Kd = key heads * dk, Vd = value heads * dv, Hv = value heads, W = conv width.) Norms, activations,
gates and the embedding lookup are not counted, as usual for MFU. With packed documents the attention
term overestimates slightly (documents are shorter than ``s``).
"""

from __future__ import annotations

from megatron_ext.config import LINEAR, Qwen35Config

GDN_CHUNK = 64


def forward_flops_per_token(c: Qwen35Config, seq_length: int) -> dict[str, float]:
    """Forward FLOPs per token by part (matmul parameters, attention scores, GDN core, LM head)."""
    h = c.hidden_size
    kd, vd = c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim
    nh, ng, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    n_linear = sum(t == LINEAR for t in c.layer_types)
    n_full = c.num_hidden_layers - n_linear
    mlp = 2 * 3 * h * c.intermediate_size * c.num_hidden_layers
    attn_proj = 2 * h * (2 * nh * hd + 2 * ng * hd + nh * hd) * n_full
    attn_scores = 2 * 2 * nh * hd * seq_length / 2 * n_full
    gdn_proj = (2 * h * (2 * kd + 2 * vd + 2 * c.linear_num_value_heads) + 2 * vd * h) * n_linear
    gdn_core = (2 * (2 * kd + vd) * c.linear_conv_kernel_dim
                + c.linear_num_value_heads * (2 * GDN_CHUNK * (c.linear_key_head_dim + c.linear_value_head_dim)
                                              + 6 * c.linear_key_head_dim * c.linear_value_head_dim)) * n_linear
    head = 2 * h * c.vocab_size
    return {"matmul_params": mlp + attn_proj + gdn_proj + head, "attention_scores": attn_scores,
            "gdn_core": gdn_core, "lm_head": head}


def train_flops_per_token(c: Qwen35Config, seq_length: int) -> float:
    parts = forward_flops_per_token(c, seq_length)
    return 3 * (parts["matmul_params"] + parts["attention_scores"] + parts["gdn_core"])


# dense, per GPU; the first name found in the device's name wins, so variants come before their family (an H100
# PCIe is 756, an H100 or H200 NVL 835, the SXM parts, "NVIDIA H100 80GB HBM3" and "NVIDIA H200", 989)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0}


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Peak dense BF16 TFLOP/s of a GPU by name (None on CPU or an unknown device); MFU of FP8 runs is taken
    against it too (the FP8 peak is twice that)."""
    if override:
        return override
    if not device_name:
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
