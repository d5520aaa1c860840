"""train/schedulers.py: sd-scripts' LR curves against their closed forms, warm-up ratio, and the errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.train.optimizers import build_optimizer
from lib_sdtune.train.schedulers import build_scheduler, warmup_steps_for

LR, T = 1e-3, 20


def _opt(lr: float = LR) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _curve(sched, steps: int = T) -> list[float]:
    """The learning rate used at optimizer steps 0..steps (as the loop sees it before each step)."""
    out = []
    for _ in range(steps + 1):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def _check(sched, factor) -> None:
    got = _curve(sched)
    want = [LR * factor(s) for s in range(T + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def _warm(s: int, w: int) -> float:
    return s / max(1, w)


def test_constant():
    _check(build_scheduler("constant", _opt(), T), lambda s: 1.0)


def test_constant_with_warmup():
    _check(build_scheduler("constant_with_warmup", _opt(), T, 5), lambda s: _warm(s, 5) if s < 5 else 1.0)


def test_linear():
    w = 4
    _check(build_scheduler("linear", _opt(), T, w),
           lambda s: _warm(s, w) if s < w else max(0.0, (T - s) / max(1, T - w)))


def test_cosine_half_wave():
    w = 3
    _check(build_scheduler("cosine", _opt(), T, w, num_cycles=7),  # num_cycles is ignored for cosine (sd-scripts)
           lambda s: _warm(s, w) if s < w else max(0.0, 0.5 * (1 + math.cos(math.pi * (s - w) / (T - w)))))


def test_cosine_with_restarts():
    w, n = 2, 3

    def f(s: int) -> float:
        if s < w:
            return _warm(s, w)
        p = (s - w) / (T - w)
        return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((n * p) % 1.0))))

    _check(build_scheduler("cosine_with_restarts", _opt(), T, w, num_cycles=n), f)


@pytest.mark.parametrize("power,lr_end", [(1.0, 1e-7), (2.0, 1e-7), (0.5, 1e-5)])
def test_polynomial(power, lr_end):
    w = 5
    args = None if lr_end == 1e-7 else [f"lr_end={lr_end}"]

    def f(s: int) -> float:
        if s < w:
            return _warm(s, w)
        return ((LR - lr_end) * (1 - (s - w) / (T - w)) ** power + lr_end) / LR

    _check(build_scheduler("polynomial", _opt(), T, w, power=power, scheduler_args=args), f)


def test_cosine_with_min_lr():
    pytest.importorskip("transformers.optimization")
    w, ratio = 2, 0.1

    def f(s: int) -> float:
        if s < w:
            return _warm(s, w)
        p = (s - w) / (T - w)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * 0.5 * p)) * (1 - ratio) + ratio)

    _check(build_scheduler("cosine_with_min_lr", _opt(), T, w, min_lr_ratio=ratio), f)
    with pytest.raises(SdtuneError, match="lr_scheduler_min_lr_ratio"):
        build_scheduler("cosine_with_min_lr", _opt(), T)


def test_piecewise_constant_rules_from_scheduler_args():
    _check(build_scheduler("piecewise_constant", _opt(), T, scheduler_args=["step_rules='1:5,0.1:12,0.01'"]),
           lambda s: 1.0 if s < 5 else 0.1 if s < 12 else 0.01)


@pytest.mark.parametrize("warmup,steps", [(0.1, 10), (0.25, 25), (0.999, 99), ("10%", 10), (10, 10), (10.0, 10),
                                          (0, 0), ("7", 7)])
def test_warmup_as_steps_or_ratio(warmup, steps):
    assert warmup_steps_for(warmup, 100) == steps


def test_warmup_ratio_in_the_curve():
    sched = build_scheduler("linear", _opt(), T, 0.25)  # 5 steps
    got = _curve(sched)
    assert got[:6] == pytest.approx([0, LR / 5, 2 * LR / 5, 3 * LR / 5, 4 * LR / 5, LR])


@pytest.mark.parametrize("bad", [-1, "x", float("nan")])
def test_bad_warmup(bad):
    with pytest.raises(SdtuneError, match="lr_warmup_steps"):
        warmup_steps_for(bad, 100)


@pytest.mark.parametrize("warmup", [5, 0.1])
def test_constant_with_warmup_is_an_error_as_in_sd_scripts(warmup):
    with pytest.raises(SdtuneError, match="constant_with_warmup"):
        build_scheduler("constant", _opt(), 100, warmup)


def test_unknown_name_and_bad_steps():
    with pytest.raises(SdtuneError, match="lr_scheduler 'cosine_annealing' is not known"):
        build_scheduler("cosine_annealing", _opt(), T)
    with pytest.raises(SdtuneError, match="max_train_steps"):
        build_scheduler("linear", _opt(), 0)


def test_names_case_insensitive_and_group_lrs_scale_together():
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": LR / 2}], lr=LR)
    sched = build_scheduler("Linear", opt, 10, 0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR / 2, LR / 4])


def test_state_dict_resumes_and_loads_with_weights_only():
    sched = build_scheduler("cosine", _opt(), T, 2)
    _curve(sched, 7)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = build_scheduler("cosine", _opt(), T, 2)
    again.optimizer.load_state_dict(sched.optimizer.state_dict())  # a resume restores both
    again.load_state_dict(state)
    assert again.get_last_lr() == sched.get_last_lr()
    assert _curve(again, 5) == _curve(sched, 5)


def test_adafactor_relative_step_gets_adafactor_schedule():
    pytest.importorskip("transformers.optimization")
    from transformers.optimization import AdafactorSchedule

    params = [torch.nn.Parameter(torch.ones(3, 2))]
    spec = build_optimizer("AdaFactor", [{"params": params}], 1e-4)
    sched = build_scheduler(spec.forced_scheduler or "cosine", spec.optimizer, T)
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == [1e-4]  # the initial lr reported before the first step
    (params[0] ** 2).sum().backward()
    spec.optimizer.step()
    sched.step()
    assert sched.get_last_lr()[0] > 0  # Adafactor's own relative step
    # a relative-step Adafactor gets it whatever the schedule asked for, as in sd-scripts
    fresh = [torch.nn.Parameter(torch.ones(3, 2))]
    assert isinstance(build_scheduler("cosine", build_optimizer("adafactor", [{"params": fresh}], 1e-4).optimizer,
                                      T, 0), AdafactorSchedule)


def test_adafactor_schedule_needs_adafactor():
    with pytest.raises(SdtuneError, match="only with optimizer_type AdaFactor"):
        build_scheduler("adafactor:1e-4", _opt(), T)


def test_schedule_free_gets_a_constant_schedule():
    pytest.importorskip("schedulefree")
    spec = build_optimizer("AdamWScheduleFree", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], LR)
    sched = build_scheduler("cosine", spec.optimizer, T, 5)
    assert _curve(sched) == [LR] * (T + 1)


def test_adafactor_schedule_refuses_warmup_like_sd_scripts():
    pytest.importorskip("transformers.optimization")
    spec = build_optimizer("AdaFactor", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-4)
    with pytest.raises(SdtuneError, match="lr_warmup_steps.*relative_step=False"):
        build_scheduler(spec.forced_scheduler, spec.optimizer, T, 5)


def test_schedule_free_seen_through_an_accelerate_wrapper():
    pytest.importorskip("schedulefree")

    class AcceleratedOptimizer(torch.optim.Optimizer):  # stands for accelerate's wrapper (same class name)
        def __init__(self, optimizer):
            self.optimizer = optimizer

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        def step(self, closure=None):
            return self.optimizer.step(closure)

    spec = build_optimizer("SGDScheduleFree", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], LR)
    sched = build_scheduler("linear", AcceleratedOptimizer(spec.optimizer), T, 0)
    assert _curve(sched, 5) == [LR] * 6
