"""The analytic FLOP count behind the MFU metric agrees with torch's FLOP counter on the reference model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model import DebertaConfig, DebertaModel
from pretrain.run.perf import device_peak_flops, encoder_forward_flops_per_token


@pytest.mark.parametrize("overrides", [{}, {"share_att_key": False, "pos_att_type": "c2p", "embedding_size": 48}])
def test_encoder_flops_match_the_flop_counter(overrides):
    config = DebertaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128, position_buckets=16, **overrides)
    model = DebertaModel(config).eval()
    seq_len = 96
    ids = torch.randint(5, 500, (1, seq_len))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    assert counter.get_total_flops() == pytest.approx(seq_len * encoder_forward_flops_per_token(config, seq_len),
                                                      rel=1e-9)


def test_device_peaks():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("Some CPU") is None
