"""The shipped digits feature network and its reference statistics."""
import torch
from safetensors.torch import load_file

from fewstep.cli import main
from fewstep.data.digits import load_digits_tensors
from fewstep.eval.digits_assets import reference_stats
from fewstep.eval.digits_net import NET_DIR, digits_fd, digits_reference_stats, load_digits_net


def test_digits_fd_orders_sample_sets_sensibly():
    x, y = load_digits_tensors()
    net, ref = load_digits_net(), digits_reference_stats()
    assert abs(digits_fd(x, net, ref)) < 1e-6  # the reference set itself
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half = digits_fd(x[perm[:900]], net, ref)
    subset = digits_fd(x[y < 5], net, ref)
    blurred = digits_fd(torch.nn.functional.avg_pool2d(x, 3, 1, 1), net, ref)
    noise = digits_fd(torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, net, ref)
    assert half < 0.05 * subset and subset < blurred < noise, (half, subset, blurred, noise)


def test_shipped_statistics_are_those_of_the_shipped_network():
    mu, sigma, n = reference_stats(load_digits_net())
    mu_ref, sigma_ref = digits_reference_stats()
    assert n == 1797
    torch.testing.assert_close(torch.from_numpy(mu), torch.from_numpy(mu_ref), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.from_numpy(sigma), torch.from_numpy(sigma_ref), rtol=1e-9, atol=1e-9)


def test_the_recipe_reproduces_the_shipped_network(tmp_path):
    """recipes/digits_features.yaml, trained by fewstep's loop (about 45 s), gives the shipped weights."""
    out = tmp_path / "df"
    assert main(["distill", "digits_features", f"train.output_dir={out}", "train.progress=false"]) == 0
    trained = load_file(str(out / "final/classifier/diffusion_pytorch_model.safetensors"))
    shipped = load_file(str(NET_DIR / "diffusion_pytorch_model.safetensors"))
    assert trained.keys() == shipped.keys()
    assert max((trained[k] - shipped[k]).abs().max().item() for k in trained) <= 1e-4
