"""The loop's pieces that are not a loss: trained networks found by path and wrapped in place (fewstep.networks),
and the logging window (fewstep.logwindow)."""
import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.logwindow import LogWindow
from fewstep.networks import TrainedNetworks, freeze_teacher
from tests.losses.test_fdivergence import _setup


class Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **k):
        return self.inner(*a, **k)


def test_wrappers_go_where_the_loss_declares_its_networks_and_come_back_out():
    _, student, loss = _setup(fake_updates=2)
    bare_fake, bare_disc, bare_student = loss.fake_score.net, loss.discriminator, student.net
    nets = TrainedNetworks(student, loss)
    assert nets.bare == {"student": bare_student, "fake_score": bare_fake, "discriminator": bare_disc}
    nets.prepare(Wrapper)
    assert isinstance(student.net, Wrapper) and student.net.inner is bare_student
    assert isinstance(loss.fake_score.net, Wrapper) and loss.fake_score.net.inner is bare_fake
    assert isinstance(loss.discriminator, Wrapper)
    with nets.unwrapped():
        assert student.net is bare_student and loss.fake_score.net is bare_fake and loss.discriminator is bare_disc
    assert isinstance(loss.discriminator, Wrapper)


def test_a_loss_may_not_claim_the_students_name():
    _, student, loss = _setup(fake_updates=2)
    loss.trains = lambda: {"student": "fake_score.net"}
    with pytest.raises(FewstepError, match="that name is the student's"):
        TrainedNetworks(student, loss)


def test_the_teacher_freezes_but_for_what_a_trained_network_keeps_on_it():
    teacher = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    adapter = teacher[1]  # stands for LoRA adapters a fake score adds to the teacher's network
    freeze_teacher(teacher, [adapter])
    assert not any(p.requires_grad for p in teacher[0].parameters()) and all(p.requires_grad for p in adapter.parameters())


def test_log_window_averages_each_key_over_the_steps_that_logged_it():
    w = LogWindow(multi_phase=True)
    w.add({"phase": "fake_score", "loss": 1.0, "fake_score_loss": 4.0, "lr": 0.1})
    w.add({"phase": "fake_score", "loss": 3.0, "fake_score_loss": 2.0, "lr": 0.1})
    w.add({"phase": "generator", "loss": 8.0, "dm_loss": 5.0, "lr": 0.2})
    means, it_s = w.close()
    assert means == pytest.approx({"loss": 4.0, "fake_score/loss": 2.0, "generator/loss": 8.0, "fake_score_loss": 3.0,
                                   "dm_loss": 5.0, "lr": 0.4 / 3, "fake_score/lr": 0.1, "generator/lr": 0.2})
    assert it_s > 0 and w.close()[0] == {}
    single = LogWindow(multi_phase=False)
    single.add({"phase": "student", "loss": 2.0})
    assert single.close()[0] == {"loss": 2.0}
