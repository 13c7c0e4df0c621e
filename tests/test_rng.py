"""Per-sample randomness (fewstep.rng): every sample's draws are those of its own torch.Generator, whatever batch it is in."""
import torch

from fewstep.rng import SampleRNG, sample_seed


def test_each_sample_draws_from_its_own_generator_in_order():
    seeds = [sample_seed(0, i) for i in range(5)]
    rng = SampleRNG(seeds)
    n, u, k = rng.randn(2, 3), rng.rand(), rng.randint(0, 50)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(n[i], torch.randn(2, 3, generator=g))
        assert torch.equal(u[i], torch.rand((), generator=g))
        assert torch.equal(k[i], torch.randint(0, 50, (), generator=g))


def test_draws_do_not_depend_on_the_batch_a_sample_is_in():
    seeds = [sample_seed(3, i) for i in range(8)]
    whole = SampleRNG(seeds).randn(4)
    halves = torch.cat([SampleRNG(seeds[:3]).randn(4), SampleRNG(seeds[3:]).randn(4)])
    assert torch.equal(whole, halves)
    low, high = 0.25, 0.75
    v = SampleRNG(seeds).uniform(low, high)
    assert bool(((v >= low) & (v < high)).all())


def test_sample_seeds_differ_across_positions_and_run_seeds():
    got = {sample_seed(s, i) for s in range(4) for i in range(1000)}
    assert len(got) == 4000 and all(0 <= x < 2**63 for x in got)
