import math

import pytest
import torch
from torch.testing import assert_close

from ota_trainer.graft import SaliencyHistogram, Threshold, graft, keep_mask, log_saliency, per_tensor_threshold


def test_log_saliency_matches_direct_formula():
    d = torch.tensor([0.5, -0.25, 0.0, 2.0])
    v = torch.tensor([4.0, 1.0, 3.0, 0.0])
    s = v * d**2  # [1, 1/16, 0, 0]
    ls = log_saliency(d, v, "fisher")
    assert ls[0] == 0.0 and ls[1] == -4.0
    assert ls[2] == -math.inf and ls[3] == -math.inf
    assert torch.equal(torch.exp2(ls), s)
    assert torch.equal(log_saliency(d, None, "magnitude"), torch.log2(d**2))


def test_log_saliency_does_not_underflow():
    d = torch.tensor([1e-30])
    v = torch.tensor([1e-30])
    assert (v * d**2).item() == 0.0  # the naive product underflows float32
    assert log_saliency(d, v).item() == pytest.approx(math.log2(1e-30) * 3, rel=1e-5)


def test_global_density_is_accurate_on_a_wide_distribution():
    g = torch.Generator().manual_seed(0)
    h = SaliencyHistogram()
    tensors = []
    for n in (3_000_000, 1_000_000, 5000, 64):  # several tensors of very different scales
        d = torch.randn(n, generator=g) * 10 ** torch.empty(1).uniform_(-6, -2, generator=g).item()
        v = torch.exp(torch.randn(n, generator=g) * 4 - 25)
        d[: n // 10] = 0  # unchanged entries have zero saliency
        ls = log_saliency(d, v)
        tensors.append(ls)
        h.add(ls)
    total = sum(t.numel() for t in tensors)
    for density in (0.01, 0.1, 0.4, 0.85):
        thr = h.threshold_for_density(density)
        kept = sum(int(keep_mask(t, thr).sum()) for t in tensors)
        assert kept == h.kept(thr)  # masks agree exactly with the histogram's count
        assert abs(kept / total - density) <= 0.001  # ±0.1% absolute


def test_density_one_and_beyond_nonzero_keeps_everything():
    h = SaliencyHistogram()
    ls = log_saliency(torch.tensor([0.0, 0.0, 1.0]), torch.ones(3))
    h.add(ls)
    assert keep_mask(ls, h.threshold_for_density(1.0)).all()
    assert keep_mask(ls, h.threshold_for_density(0.9)).all()
    with pytest.raises(ValueError):
        h.threshold_for_density(0.0)


def test_absolute_threshold_is_the_papers_rule():
    d = torch.tensor([1e-5, 2e-5, 3e-5])
    v = torch.tensor([1e-9, 1e-9, 1e-9])
    s = v * d**2
    thr = Threshold.absolute(float(s[1]))
    assert keep_mask(log_saliency(d, v), thr).tolist() == [False, True, True]
    assert keep_mask(log_saliency(d, v), Threshold.absolute(0.0)).all()


def test_per_tensor_threshold_keeps_top_fraction():
    ls = torch.arange(100, dtype=torch.float32)
    mask = keep_mask(ls, per_tensor_threshold(ls, 0.25))
    assert mask.sum() == 25 and mask[75:].all()


def test_graft_reverts_masked_entries():
    base, expert = torch.zeros(4), torch.ones(4)
    mask = torch.tensor([True, False, True, False])
    assert graft(base, expert, mask).tolist() == [1, 0, 1, 0]


@pytest.mark.slow
def test_global_density_on_a_100m_parameter_model():
    """The issue's acceptance figure: ±0.1% absolute on 100M entries, tensor by tensor."""
    g = torch.Generator().manual_seed(1)
    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 1 + [(32000, 1024)] * 1 + [(4096,)] * 8  # ~ 100.5M entries
    h = SaliencyHistogram()
    seeds = []
    for i, shape in enumerate(shapes):
        seeds.append(int(torch.randint(0, 2**31, (1,), generator=g)))
        h.add(_synthetic_log_saliency(shape, seeds[-1], i))
    assert h.total > 100_000_000
    for density in (0.05, 0.4):
        thr = h.threshold_for_density(density)
        kept = sum(int(keep_mask(_synthetic_log_saliency(s, seed, i), thr).sum()) for i, (s, seed) in enumerate(zip(shapes, seeds)))
        assert kept == h.kept(thr)
        assert abs(kept / h.total - density) <= 0.001


def _synthetic_log_saliency(shape, seed, i):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=g) * 10 ** (-5 + i % 3)  # bf16-fine-tuning-sized edits, per-tensor scale
    d[torch.rand(shape, generator=g) < 0.2] = 0  # unchanged entries
    rows = torch.exp(torch.randn(shape[0], generator=g) * 2 - 22)
    v = rows[:, None] * torch.exp(torch.randn(shape[1:] or (1,), generator=g))[None, :] if len(shape) == 2 else rows
    return log_saliency(d, v.reshape(shape))


def test_saliency_share_keeps_the_top_mass():
    # saliencies 2**k for k = 0..19: the top entry holds ~half of the total
    ls = torch.arange(20, dtype=torch.float32)
    h = SaliencyHistogram()
    h.add(ls)
    assert keep_mask(ls, h.threshold_for_share(0.5)).sum() == 1
    assert keep_mask(ls, h.threshold_for_share(0.74)).sum() == 2  # 2**19 + 2**18 = 75% of the total
    assert keep_mask(ls, h.threshold_for_share(1.0)).all()
    total = (2.0 ** ls.double()).sum()
    for share in (0.3, 0.9, 0.99):
        kept = keep_mask(ls, h.threshold_for_share(share))
        assert (2.0 ** ls.double())[kept].sum() >= share * total  # enough mass kept
        assert (2.0 ** ls.double())[kept].sum() - 2.0 ** ls[kept].min().double() < share * total  # and no more entries than needed


def test_log_saliency_from_rank_one_factors_equals_the_full_moment():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(7, 2, 5, generator=g)
    d[0, 0, 0] = 0.0
    a, b = torch.rand(7, generator=g), torch.rand(10, generator=g)
    a[3] = 0.0  # a zero row: -inf saliency there
    v = torch.outer(a, b).reshape(7, 2, 5)
    got = log_saliency(d, None, log2_factors=(torch.log2(a), torch.log2(b)))
    want = log_saliency(d, v)
    assert got.shape == d.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert_close(got[fin], want[fin])


def test_histogram_consuming_its_input_counts_the_same():
    g = torch.Generator().manual_seed(2)
    ls = log_saliency(torch.randn(1000, generator=g), torch.rand(1000, generator=g))
    h1, h2 = SaliencyHistogram(), SaliencyHistogram()
    h1.add(ls)
    h2.add(ls.clone(), consume=True)
    assert torch.equal(h1.counts, h2.counts)
    thr = h1.threshold_for_density(0.3)
    assert int(keep_mask(ls, thr).sum()) == h1.kept(thr)


def test_one_comparison_mask_agrees_with_the_histogram_bins_at_their_edges():
    from ota_trainer.graft import BINS_PER_OCTAVE, LOG2_LO, _bin_index, bin_cut

    g = torch.Generator().manual_seed(4)
    bins = torch.randint(1, 2**21, (300,), generator=g).tolist() + [2**20, 2**20 + 1, 1024 * 1024 + 524 * 1024]
    for b in bins:
        edge = torch.tensor(b / BINS_PER_OCTAVE + LOG2_LO, dtype=torch.float32)
        xs = [edge]
        for _ in range(4):  # a few float32 steps either side of the edge
            xs = [torch.nextafter(xs[0], torch.tensor(-math.inf))] + xs + [torch.nextafter(xs[-1], torch.tensor(math.inf))]
        x = torch.stack(xs)
        want = _bin_index(x.clone()) >= b
        assert torch.equal(x >= bin_cut(b), want), b
        assert torch.equal(keep_mask(x, Threshold(float(edge), bin=b)), want), b
