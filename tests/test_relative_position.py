"""Log-bucketed relative positions: the values the released models were trained with."""

import torch

from pretrain.model.relative_position import log_bucket_position, relative_position_index


def test_bucket_values_of_released_models():
    # position_buckets=256, max_relative_positions=512 (every released v2/v3 model)
    r = torch.tensor([0, 1, 127, 128, 129, 140, 200, 256, 300, 400, 511])
    expected = [0, 1, 127, 128, 129, 137, 169, 192, 207, 233, 255]
    assert log_bucket_position(r, 256, 512).tolist() == expected
    assert log_bucket_position(-r, 256, 512).tolist() == [-e for e in expected]  # antisymmetric


def test_index_is_exact_near_the_diagonal_and_saturates_far_away():
    index = relative_position_index(600, 600, span=256, bucket_size=256, max_position=512)
    assert index.shape == (600, 600)
    i = torch.arange(600)
    assert (index[i, i] == 256).all()  # distance 0 -> row k
    assert index[300, 200] == 256 + 100 and index[200, 300] == 256 - 100  # |r| <= mid: exact
    assert index.min() >= 0 and index.max() <= 511
    assert index[599, 0] == 511  # far right saturates at the last row


def test_unbucketed_positions_are_clipped_distances():
    index = relative_position_index(10, 10, span=4, bucket_size=-1, max_position=4)
    expected = torch.clamp(torch.arange(10)[:, None] - torch.arange(10)[None, :] + 4, 0, 7)
    assert torch.equal(index, expected)
