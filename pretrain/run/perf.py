"""Model FLOPs per training token and device peaks, for the MFU metric.

Counting is analytic (matmuls only, multiply-add = 2 FLOPs, backward = 2x forward), the usual convention for
"model FLOPs utilisation": what the model needs, not what an implementation happens to execute. The test checks it
against ``torch.utils.flop_counter`` on the reference implementation.
"""

from __future__ import annotations

from pretrain.model import DebertaConfig

# Dense bf16 peak FLOP/s by device-name fragment (no sparsity).
DEVICE_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def encoder_forward_flops_per_token(config: DebertaConfig, seq_len: int, layers: int | None = None) -> float:
    """Forward matmul FLOPs per token of the encoder (embedding projection, layers, disentangled attention)."""
    h, inner, f = config.hidden_size, config.all_head_size, config.intermediate_size
    k2 = 2 * config.relative_span
    layers = config.num_hidden_layers if layers is None else layers
    per_layer = 2 * h * inner * 3 + 2 * inner * h + 2 * 2 * h * f  # q, k, v, output, FFN
    per_layer += 2 * seq_len * inner * 2  # QK^T and probs @ V
    terms = len(config.pos_att_type)
    per_layer += 2 * k2 * inner * terms  # q @ pos_key^T (c2p), pos_query @ k^T (p2c): against all 2k rows
    per_layer += 2 * k2 * h * inner * terms / seq_len  # projecting the relative table, once per sequence
    flops = layers * per_layer
    if config.embedding_width != h:
        flops += 2 * config.embedding_width * h
    return float(flops)


def mlm_head_flops(config: DebertaConfig) -> float:
    """Forward FLOPs of the MLM head for one predicted position (transform + vocabulary projection)."""
    e = config.embedding_width
    return float(2 * config.hidden_size * e + 2 * e * config.vocab_size)


def training_flops_per_token(config: DebertaConfig, seq_len: int, objective: str, mask_prob: float = 0.15,
                             generator_layers: int | None = None, use_emd: bool = True) -> float:
    """Forward + backward FLOPs per input token of one training step of ``objective`` ("mlm" or "rtd")."""
    if objective == "mlm":
        forward = encoder_forward_flops_per_token(config, seq_len)
        if use_emd:  # the last layer runs twice more
            forward += 2 * encoder_forward_flops_per_token(config, seq_len, layers=1)
        forward += mask_prob * mlm_head_flops(config)
    else:
        layers = generator_layers or max(1, config.num_hidden_layers // 2)
        forward = encoder_forward_flops_per_token(config, seq_len, layers=layers)
        if use_emd:
            forward += 2 * encoder_forward_flops_per_token(config, seq_len, layers=1)
        forward += mask_prob * mlm_head_flops(config)
        forward += encoder_forward_flops_per_token(config, seq_len)  # discriminator
        forward += 2 * config.hidden_size * config.hidden_size + 2 * config.hidden_size  # RTD head
    return 3.0 * forward


def device_peak_flops(device_name: str) -> float | None:
    for fragment, peak in DEVICE_PEAK_BF16.items():
        if fragment in device_name:
            return peak
    return None
