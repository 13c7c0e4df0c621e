"""Feature statistics and distances against closed forms, scipy and brute force."""
import numpy as np
import pytest
import scipy.linalg
import torch

from fewstep.errors import FewstepError
from fewstep.eval.distances import density_coverage, frechet_distance, kid, mmd2_unbiased, precision_recall
from fewstep.eval.stats import RunningStats, load_stats, save_stats


def _random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(16), _random_cov(16, rng)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    shift = rng.standard_normal(16)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(float(shift @ shift), rel=1e-9, abs=1e-9)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("rank", [None, 5])  # full rank, and N < d (rank-deficient covariances)
def test_frechet_matches_scipy_sqrtm(rank):
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(d, rng, rank), _random_cov(d, rng, rank)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    reference = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_chunked_statistics_equal_numpy_cov():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1001, 12)) * rng.uniform(0.5, 5, 12) + 100.0  # a large offset tests stability
    stats = RunningStats(12)
    for chunk in np.array_split(x, [1, 7, 300, 301, 999]):
        stats.update(torch.from_numpy(chunk))
    assert stats.n == 1001
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_file_round_trip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = save_stats(tmp_path / "ref.npz", mu, sigma, n=np.array(10))
    m2, s2 = load_stats(path)
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(FewstepError, match="no 'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")
    with pytest.raises(FewstepError, match="does not exist"):
        load_stats(tmp_path / "none.npz")


def test_kid_equals_brute_force_unbiased_mmd():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g).double(), (torch.randn(30, 6, generator=g) + 0.3).double()
    k = lambda a, b: (float(a @ b) / 6 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
    yy = sum(k(y[i], y[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    xy = sum(k(x[i], y[j]) for i in range(40) for j in range(30)) / (40 * 30)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    y40 = torch.cat([y, y[:10] + 1.0])
    mean, std = kid(x, y40, subsets=3, subset_size=1000)  # equal sizes: each subset is the whole set, reordered
    assert mean == pytest.approx(mmd2_unbiased(x, y40), rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    a, b = torch.randn(400, 6, generator=g), torch.randn(400, 6, generator=g)  # independent draws, same law
    same, same_std = kid(a, b, subsets=20, subset_size=200)
    shifted, _ = kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 10 * abs(same)


def test_precision_recall_density_coverage_brute_force():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(60, 4, generator=g), torch.randn(50, 4, generator=g) * 1.5 + 0.5

    def radii(x, k):
        d = torch.cdist(x, x)
        return torch.tensor([sorted(row.tolist())[k] for row in d])

    r_real, r_fake = radii(real.double(), 3), radii(fake.double(), 3)
    d_fr = torch.cdist(fake.double(), real.double())
    precision = float(np.mean([(d_fr[i] <= r_real).any() for i in range(50)]))
    recall = float(np.mean([(d_fr[:, j] <= r_fake).any() for j in range(60)]))
    assert precision_recall(real, fake, k=3) == pytest.approx((precision, recall))
    r5 = radii(real.double(), 5)
    density = float(sum((d_fr[i] <= r5).sum() for i in range(50))) / (5 * 50)
    coverage = float(np.mean([d_fr[:, j].min() <= r5[j] for j in range(60)]))
    assert density_coverage(real, fake, k=5) == pytest.approx((density, coverage))
