"""Small shared layers."""

from adaptive_heads._layers import prototype_mlp


def test_prototype_mlp_structure():
    mlp = prototype_mlp(8)
    assert mlp[0].weight.shape == (4, 16) and mlp[0].bias is None
    assert mlp[2].weight.shape == (8, 4) and mlp[2].bias.shape == (8,)
    assert prototype_mlp(1)[0].weight.shape == (1, 2)
