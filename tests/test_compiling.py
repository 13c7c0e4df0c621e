"""train.compile: regional torch.compile (fewstep/compiling.py). Opt-in (`pytest -m slow`): a first CPU compile of
the tiny UNet's blocks takes tens of seconds."""
import pytest
import torch

from fewstep.cli import main
from fewstep.compiling import compile_regions
from tests.helpers import tiny_cond_unet
from tests.test_multiprocess import QUIET, max_diff


@pytest.mark.slow
def test_the_compiled_unet_answers_what_the_eager_one_does():
    """diffusers' _repeated_blocks of UNet2DConditionModel (its BasicTransformerBlocks) compiled in place: the
    forward equals the eager copy's to 1e-5, and its gradients too."""
    import copy

    eager = tiny_cond_unet(seed=0)
    compiled = copy.deepcopy(eager)
    assert compile_regions(compiled) == sum(type(m).__name__ == "BasicTransformerBlock" for m in compiled.modules()) > 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, eager.config.in_channels, eager.config.sample_size, eager.config.sample_size, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 4, eager.config.cross_attention_dim, generator=g)
    outs = []
    for net in (eager, compiled):
        out = net(x, t, encoder_hidden_states=ctx).sample
        out.square().mean().backward()
        outs.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert max_diff(outs[0][1], outs[1][1]) < 1e-5


@pytest.mark.slow
def test_a_compiled_run_trains_what_an_eager_one_does_without_recompiling(tmp_path, capsys):
    """gmm_teacher with train.compile=true: the same EMA export as eager after 6 steps (1e-5), the regions logged,
    and steps 3-6 (after a warm-up in which each phase compiled) run with dynamo set to fail on a recompile."""
    import torch._dynamo

    common = ["gmm_teacher", "train.batch_size=16", *QUIET]
    assert main(["distill", *common, "train.max_steps=2", "train.compile=true", f"train.output_dir={tmp_path / 'c'}"]) == 0
    assert "regions of 1 networks compiled" in capsys.readouterr().out
    torch._dynamo.config.error_on_recompile = True
    try:
        assert main(["distill", *common, "train.max_steps=6", "train.compile=true", f"train.output_dir={tmp_path / 'c'}"]) == 0
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert main(["distill", *common, "train.max_steps=6", f"train.output_dir={tmp_path / 'e'}"]) == 0
    from tests.test_sharding import exported

    assert max_diff(exported(tmp_path / "c"), exported(tmp_path / "e")) < 1e-5
