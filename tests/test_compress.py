import torch
from torch.testing import assert_close

from ota_trainer.moments.compress import is_factorable, matrix_shape, rank1_factors, rank1_reconstruct


def test_row_and_column_sums_are_preserved_and_non_negative():
    v = torch.rand(7, 5) ** 3
    r, c = rank1_factors(v)
    assert_close(r, v.sum(1))
    assert_close(c, v.sum(0))
    v_hat = rank1_reconstruct(r, c, v.shape)
    assert v_hat.shape == v.shape and v_hat.dtype == torch.float32
    assert (v_hat >= 0).all()
    assert_close(v_hat.sum(1), v.sum(1))
    assert_close(v_hat.sum(0), v.sum(0))


def test_exact_on_rank_one_input():
    a, b = torch.rand(6) + 0.1, torch.rand(4) + 0.1
    v = torch.outer(a, b)
    assert_close(rank1_reconstruct(*rank1_factors(v), v.shape), v)


def test_hand_computed_example():
    v = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # r = [4, 4], c = [3, 5], total 8 -> v_hat = outer(r, c) / 8
    expected = torch.tensor([[1.5, 2.5], [1.5, 2.5]])
    assert_close(rank1_reconstruct(*rank1_factors(v), v.shape), expected)


def test_zeros_give_zeros():
    v = torch.zeros(3, 4)
    out = rank1_reconstruct(*rank1_factors(v), v.shape)
    assert torch.equal(out, torch.zeros(3, 4))
    # a zero row stays zero
    v = torch.rand(3, 4)
    v[1] = 0
    out = rank1_reconstruct(*rank1_factors(v), v.shape)
    assert torch.equal(out[1], torch.zeros(4))


def test_more_than_two_dims_flatten_to_first_dim_by_rest():
    v = torch.rand(3, 4, 5)
    assert matrix_shape(v.shape) == (3, 20)
    r, c = rank1_factors(v)
    assert r.shape == (3,) and c.shape == (20,)
    out = rank1_reconstruct(r, c, v.shape)
    assert out.shape == (3, 4, 5)
    assert_close(out.reshape(3, 20).sum(0), v.reshape(3, 20).sum(0))


def test_one_dim_tensors_are_not_factorable():
    assert not is_factorable((10,))
    assert is_factorable((2, 3))
