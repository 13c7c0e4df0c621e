"""Denoisers against independent references: Monte Carlo posterior means, separate forwards, diffusers."""
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline

from fewstep.data.mixtures import random_mixture, reference_ring
from fewstep.denoisers import MixtureDenoiser, MLPDenoiser, MLPNet, UNetDenoiser, guidance_embedding
from fewstep.errors import FewstepError
from fewstep.schedules import FlowSchedule, VPSchedule, x0_eps_from_native

from tests.helpers import tiny_cond_unet, tiny_unet2d


@pytest.mark.parametrize("schedule", [VPSchedule.from_betas(), FlowSchedule()], ids=["vp", "flow"])
def test_mixture_denoiser_equals_monte_carlo_posterior_mean(schedule):
    """E[x0 | x_t] by self-normalized importance sampling over 400k prior draws vs the closed form."""
    m = random_mixture(3, 5, seed=7, scale=1.0)
    D = MixtureDenoiser(m, schedule)
    g = torch.Generator().manual_seed(0)
    x0_prior = m.sample(400_000, g).double()
    for t in (300.0, 600.0, 900.0):
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t)))
        x_t = schedule.add_noise(m.sample(4, g), torch.randn(4, 3, generator=g), t).double()
        logw = -((x_t[:, None] - alpha * x0_prior[None]) ** 2).sum(-1) / (2 * sigma**2)
        w = torch.softmax(logw, dim=1)
        ess = 1 / (w**2).sum(1)
        assert (ess > 2000).all(), ess  # the estimate is trustworthy
        mc = w @ x0_prior
        exact = D(x_t.float(), t).double()
        err = (exact - mc).norm(dim=1)
        assert (err < 6 * x0_prior.std() / ess.sqrt()).all(), (t, err, ess)


def test_mixture_denoiser_clean_end_is_identity_and_classes_restrict():
    m = reference_ring()
    D = MixtureDenoiser(m, VPSchedule.from_betas())
    x = torch.randn(8, 2)
    torch.testing.assert_close(D(x, -1.0), x)
    # Restricted to class k (one Gaussian N(mu, s^2 I)), x0_hat at x_t = 0 is mu (1 - a^2 s^2 / (a^2 s^2 + sigma^2));
    # the null class (8) keeps all modes.
    x = torch.zeros(8, 2)
    x0_c = D(x, 999.0, {"class_labels": torch.arange(8)})
    a, sigma = D.schedule.alpha_sigma(torch.tensor(999.0))
    shrink = 1 - a**2 * 0.09 / (a**2 * 0.09 + sigma**2)
    torch.testing.assert_close(x0_c, (m.means * shrink).float(), atol=1e-6, rtol=1e-6)
    x0_null = D(x, 999.0, {"class_labels": torch.full((8,), 8)})
    torch.testing.assert_close(x0_null, D(x, 999.0), atol=1e-6, rtol=0)


def _two_forward_cfg(D, x, t, cond, null, w):
    u = D.native(x, t, {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in null.items()})
    c = D.native(x, t, cond)
    return u + w.reshape(-1, *([1] * (x.ndim - 1))) * (c - u)


def test_batched_cfg_equals_two_forwards_text_unet():
    unet = tiny_cond_unet()
    null = {"encoder_hidden_states": torch.randn(1, 5, 16)}
    D = UNetDenoiser(unet, VPSchedule.from_betas(), "epsilon", null_cond=null)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 900.0])
    cond = {"encoder_hidden_states": torch.randn(3, 5, 16)}
    w = torch.tensor([1.5, 4.0, 7.5])
    with torch.no_grad():
        torch.testing.assert_close(D.native(x, t, cond, guidance=w), _two_forward_cfg(D, x, t, cond, null, w), atol=1e-5, rtol=1e-5)
        # CFG on the native output is CFG on x0 (an affine map whose weights sum to 1)
        alpha, sigma = D.schedule.coefficients(t, x)
        x0_u = D(x, t, {"encoder_hidden_states": null["encoder_hidden_states"].expand(3, 5, 16)})
        x0_c = D(x, t, cond)
        torch.testing.assert_close(D(x, t, cond, guidance=w), x0_u + w[:, None, None, None] * (x0_c - x0_u), atol=1e-4, rtol=1e-4)


def test_batched_cfg_equals_two_forwards_class_unet_and_mlp():
    unet = tiny_unet2d(num_class_embeds=11)
    D = UNetDenoiser(unet, VPSchedule.from_betas(), "v_prediction", null_cond={"class_labels": torch.tensor([10])})
    x, t, cond, w = torch.randn(4, 1, 8, 8), torch.full((4,), 400.0), {"class_labels": torch.tensor([0, 3, 5, 9])}, torch.full((4,), 2.0)
    with torch.no_grad():
        torch.testing.assert_close(D.native(x, t, cond, guidance=w), _two_forward_cfg(D, x, t, cond, D.null_cond, w), atol=1e-5, rtol=1e-5)
    M = MLPDenoiser(MLPNet(dim=2, hidden=32, depth=2, num_classes=8), FlowSchedule(), "flow")
    x, cond = torch.randn(4, 2), {"class_labels": torch.tensor([0, 3, 5, 7])}
    with torch.no_grad():
        torch.testing.assert_close(M.native(x, t, cond, guidance=w), _two_forward_cfg(M, x, t, cond, M.null_cond, w), atol=1e-5, rtol=1e-5)


def test_guidance_embedding_matches_diffusers_and_reaches_the_unet():
    w = torch.tensor([0.0, 2.5, 7.5])
    for dim in (32, 33):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_embedding(w, dim), ref.float(), atol=1e-6, rtol=1e-6)
    unet = tiny_cond_unet(time_cond_proj_dim=32)
    D = UNetDenoiser(unet, VPSchedule.from_betas(), "epsilon")
    assert D.guidance_embedding_dim == 32
    x, cond = torch.randn(3, 4, 8, 8), {"encoder_hidden_states": torch.randn(3, 5, 16)}
    with torch.no_grad():
        direct = unet(x, torch.full((3,), 700.0), encoder_hidden_states=cond["encoder_hidden_states"],
                      timestep_cond=guidance_embedding(w, 32)).sample
        torch.testing.assert_close(D.native(x, 700.0, cond, guidance=w + 1), direct, atol=1e-5, rtol=1e-5)


def test_unet2d_adapter_and_x0_from_native():
    unet = tiny_unet2d()
    D = UNetDenoiser(unet, VPSchedule.from_betas(), "epsilon")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 800.0])
    with torch.no_grad():
        eps = unet(x, t).sample
        alpha, sigma = D.schedule.coefficients(t, x)
        torch.testing.assert_close(D(x, t), (x - sigma * eps) / alpha)
        x0, eps_hat = D.predict(x, t)
        torch.testing.assert_close(eps_hat, eps)


def test_low_precision_network_gives_float32():
    unet = tiny_unet2d().to(torch.bfloat16)
    D = UNetDenoiser(unet, VPSchedule.from_betas(), "epsilon")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = D(x, 500.0)
        ref = D.predict(x, 500.0)[0]
    assert out.dtype == torch.float32 and ref.dtype == torch.float32
    native = D.native(x, 500.0)
    alpha, sigma = D.schedule.coefficients(500.0, x)
    torch.testing.assert_close(out, x0_eps_from_native(native, x, alpha, sigma, "epsilon")[0])


def test_mlp_edm_preconditioning_boundary_and_round_trip(tmp_path):
    net = MLPNet(dim=2, hidden=32, depth=2)
    D = MLPDenoiser(net, VPSchedule.from_betas(), precondition="edm")
    assert D.prediction_type == "sample"
    x = torch.randn(5, 2)
    torch.testing.assert_close(D(x, -1.0), x)  # c_skip = 1, c_out = 0 at the clean end
    net.save_pretrained(tmp_path / "mlp")
    loaded = MLPNet.from_pretrained(tmp_path / "mlp")
    D2 = MLPDenoiser(loaded, VPSchedule.from_betas(), precondition="edm")
    with torch.no_grad():
        assert torch.equal(D(x, 300.0), D2(x, 300.0))


def test_condition_errors():
    D = UNetDenoiser(tiny_unet2d(), VPSchedule.from_betas(), "epsilon")
    with pytest.raises(FewstepError, match="valid: class_labels"):
        D(torch.randn(1, 1, 8, 8), 10.0, {"prompt_embeds": torch.zeros(1)})
    with pytest.raises(FewstepError, match="needs a condition"):
        D(torch.randn(1, 1, 8, 8), 10.0, guidance=3.0)
    D2 = UNetDenoiser(tiny_unet2d(num_class_embeds=3), VPSchedule.from_betas(), "epsilon")
    with pytest.raises(FewstepError, match="no null condition"):
        D2(torch.randn(1, 1, 8, 8), 10.0, {"class_labels": torch.tensor([0])}, guidance=3.0)
    with pytest.raises(FewstepError, match="valid: epsilon, v_prediction, sample, flow"):
        UNetDenoiser(tiny_unet2d(), VPSchedule.from_betas(), "x0")
