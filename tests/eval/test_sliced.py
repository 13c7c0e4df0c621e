"""SW2 against a brute-force loop and a closed form."""
import numpy as np
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.eval import sliced_wasserstein2
from fewstep.eval.sliced import directions


def test_sw2_equals_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g) * 1.5
    x, y, th = a.double().numpy(), b.double().numpy(), directions(3).numpy()
    ref = np.sqrt(np.mean([np.mean((np.sort(x @ d) - np.sort(y @ d)) ** 2) for d in th]))
    assert sliced_wasserstein2(a, b) == pytest.approx(ref, rel=1e-12)


def test_sw2_of_a_shift_is_the_projected_shift():
    """Translating a set by c moves every sorted projection by theta.c: SW2^2 = mean_theta (theta.c)^2."""
    a = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1)).double()
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    expected = ((directions(2) @ c) ** 2).mean().sqrt().item()
    assert sliced_wasserstein2(a, a + c) == pytest.approx(expected, rel=1e-9)
    assert sliced_wasserstein2(a, a) == 0.0


def test_sw2_shape_error():
    with pytest.raises(FewstepError, match="equal shape"):
        sliced_wasserstein2(torch.zeros(3, 2), torch.zeros(4, 2))
