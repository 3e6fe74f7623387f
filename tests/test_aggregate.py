import torch
from torch.testing import assert_close

from ota_trainer.backends.torch.ops import topk_mask
from ota_trainer.merger.methods.dare import dare_merge
from ota_trainer.merger.methods.fisher import fisher_merge
from ota_trainer.merger.methods.linear import linear_merge
from ota_trainer.merger.methods.ota import ota_merge
from ota_trainer.merger.methods.task_arithmetic import task_arithmetic_merge
from ota_trainer.merger.methods.ties import ties_merge


def test_ota_with_equal_curvature_is_the_plain_average_of_task_vectors():
    w0 = torch.tensor([1.0, 2.0, 3.0])
    d = [torch.tensor([1.0, 0.0, -2.0]), torch.tensor([3.0, 2.0, 0.0])]
    v = [torch.full((3,), 4.0), torch.full((3,), 4.0)]
    assert_close(ota_merge(w0, d, v, [None, None], [1.0, 1.0], epsilon=0.0), w0 + (d[0] + d[1]) / 2)


def test_ota_hand_computed():
    w0 = torch.zeros(2)
    d = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, -2.0])]
    v = [torch.tensor([9.0, 1.0]), torch.tensor([1.0, 1.0])]  # sqrt: [3, 1] and [1, 1]
    m = [torch.tensor([True, True]), torch.tensor([True, False])]
    # entry 0: (3*1 + 1*4) / 4 = 1.75; entry 1: only expert 0 kept -> 1
    assert_close(ota_merge(w0, d, v, m, [1.0, 1.0], power=0.5, epsilon=0.0), torch.tensor([1.75, 1.0]))


def test_ota_falls_back_to_base_where_every_edit_is_reverted():
    w0 = torch.tensor([5.0, 6.0])
    d = [torch.tensor([1.0, 1.0])]
    out = ota_merge(w0, d, [torch.ones(2)], [torch.tensor([False, True])], [1.0])
    assert_close(out, torch.tensor([5.0, 7.0]))


def test_ota_mean_normalisation_and_weights():
    w0 = torch.zeros(2)
    d = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])]
    v = [torch.tensor([1.0, 3.0]), torch.tensor([100.0, 100.0])]
    # normalise=mean, p=1: P0 = [0.5, 1.5], P1 = [1, 1]; weight c1 = 3
    out = ota_merge(w0, d, v, [None, None], [1.0, 3.0], power=1.0, epsilon=0.0, normalise="mean")
    expected = torch.tensor([(0.5 * 1 + 3 * 3) / 3.5, (1.5 * 1 + 3 * 3) / 4.5])
    assert_close(out, expected)


def test_fisher_is_curvature_weighted_average_of_weights():
    w = [torch.tensor([0.0, 10.0]), torch.tensor([4.0, 0.0])]
    f = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, 0.0])]
    assert_close(fisher_merge(w, f, [1.0, 1.0], 0.0), torch.tensor([3.0, 10.0]))


def test_linear_and_task_arithmetic():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    assert_close(linear_merge([a, b], [1.0, 1.0]), torch.tensor([2.0, 4.0]))
    assert_close(linear_merge([a, b], [3.0, 1.0]), torch.tensor([1.5, 3.5]))
    assert_close(task_arithmetic_merge(torch.ones(2), [a, b], [1.0, 1.0], 0.5), torch.tensor([3.0, 5.0]))


def test_ties_hand_computed():
    w0 = torch.zeros(4)
    d = [torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([-3.0, -1.0, 0.2, 1.0])]
    # density 0.75 keeps the 3 largest |d| of each: d0 -> [1, -2, 0, 3], d1 -> [-3, -1, 0.2, 1]... d1 drops -> 0.2? no:
    # |d1| = [3, 1, 0.2, 1]: top 3 are 3, 1, 1 -> [-3, -1, 0, 1]
    # signs of sums: [-2 -> -, -3 -> -, 0 -> 0, 4 -> +]
    # entry 0: only d1 agrees -> -3; entry 1: mean(-2, -1) = -1.5; entry 2: 0; entry 3: mean(3, 1) = 2
    out = ties_merge(w0, d, [1.0, 1.0], [0.75, 0.75], 1.0)
    assert_close(out, torch.tensor([-3.0, -1.5, 0.0, 2.0]))


def test_topk_mask():
    assert topk_mask(torch.tensor([1.0, -5.0, 3.0, 0.5]), 0.5).tolist() == [False, True, True, False]


def test_dare_is_unbiased_and_deterministic():
    w0 = torch.zeros(200_000)
    d = [torch.ones(200_000)]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = dare_merge(w0, d, [1.0], [0.75], 1.0, [g1])
    b = dare_merge(w0, d, [1.0], [0.75], 1.0, [g2])
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 4.0}
    assert abs(a.mean().item() - 1.0) < 0.02


def test_ota_weights_from_rank_one_factors_equal_those_of_the_full_moment():
    from ota_trainer.merger.methods.ota import ota_weights, ota_weights_rank1

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, generator=g), torch.rand(6, generator=g)
    v = torch.outer(a, b).reshape(5, 2, 3)
    for power in (0.5, 1.0, 0.25):
        for normalise in ("none", "mean"):
            assert_close(
                ota_weights_rank1(a, b, v.shape, power, 1e-8, normalise), ota_weights(v, power, 1e-8, normalise)
            )


def test_ota_accumulator_with_factors_matches_the_full_moment():
    from ota_trainer.backends.torch.ops import Curvature, OTAAccumulator

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 3, generator=g)
    full, fact = OTAAccumulator(w0), OTAAccumulator(w0)
    for _ in range(2):
        d, a, b = torch.randn(4, 3, generator=g), torch.rand(4, generator=g), torch.rand(3, generator=g)
        mask = torch.rand(4, 3, generator=g) > 0.5
        full.add(d, Curvature.full(torch.outer(a, b), 0.5, "none").weights(slice(None), 1e-26), mask, 2.0)
        fact.add(d, Curvature.rank1(a, b, 0.5, "none").weights(slice(None), 1e-26), mask, 2.0)
    assert_close(fact.result(), full.result())


def test_curvature_normalises_by_the_whole_tensors_mean_in_every_row_block():
    from ota_trainer.backends.torch.ops import Curvature

    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(10, generator=g), torch.rand(7, generator=g)
    v = torch.outer(a, b)
    v[:5] *= 100  # the first rows' mean is far from the whole tensor's
    for power in (0.5, 1.0, 0.25):
        want = v**power / (v**power).mean()
        for curv in (
            Curvature.full(v, power, "mean"),
            Curvature.rank1(a * torch.tensor([100.0] * 5 + [1.0] * 5), b, power, "mean"),
        ):
            blocks = torch.cat([curv.weights(slice(r, r + 3), 0.0) for r in range(0, 10, 3)])
            assert_close(blocks, want, rtol=1e-5, atol=0)


def test_kth_largest_abs_equals_kthvalue_with_ties_zeros_and_extremes():
    from ota_trainer.backends.torch.ops import kth_largest_abs

    g = torch.Generator().manual_seed(5)
    x = torch.randn(10_000, generator=g) * torch.exp(torch.randn(10_000, generator=g) * 20)
    x[:500] = 0.0
    x[500:1500] = 0.25  # many ties
    x[1500:1510] = -0.25
    x[1510] = float("inf")
    x[1511] = 1e-45  # subnormal
    x[1512] = -3e38
    for k in (1, 2, 3, 10, 999, 1000, 1010, 5000, 9499, 9500, 9501, 10_000):
        want = torch.kthvalue(x.abs(), x.numel() - k + 1).values.item()
        assert kth_largest_abs(x, k) == want, k
