"""Label resizing as PyTorch's legacy nearest mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


@pytest.mark.parametrize(
    "src,dst",
    [
        ((32, 32), (8, 8)),
        ((17, 23), (5, 7)),
        ((8, 8), (8, 8)),
        ((5, 9), (10, 3)),
        ((512, 512), (128, 128)),
        ((97, 61), (13, 29)),
        ((4, 4), (8, 8)),
    ],
)
def test_resize_labels_nearest_matches_legacy_interpolate(src, dst):
    y = torch.randint(0, 300, (2, *src))
    expected = F.interpolate(y[:, None].float(), size=dst, mode="nearest")[:, 0].long()
    assert torch.equal(AF.resize_labels_nearest(y, dst), expected)


def test_resize_labels_takes_top_left_of_each_block():
    y = torch.arange(16).view(1, 4, 4)
    assert AF.resize_labels_nearest(y, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
