"""train/optimizers.py: sd-scripts' optimizer names and k=v arguments, refusals at build time, a real step each."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.train.optimizers import OptimizerSpec, build_optimizer, parse_optimizer_args


def _groups(lr_te: float | None = None) -> list[dict]:
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(4, 3))]}]
    if lr_te is not None:
        groups.append({"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr_te})
    return groups


def _step(spec: OptimizerSpec, steps: int = 1) -> None:
    """Optimizer steps on a quadratic; the parameters must move."""
    params = [p for g in spec.optimizer.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for _ in range(steps):
        spec.optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        spec.optimizer.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


def test_parse_args_like_sd_scripts_literal_eval():
    assert parse_optimizer_args(["betas=0.9,0.99", "weight_decay=0.01", "decouple=True", "d_coef=2"]) == {
        "betas": (0.9, 0.99), "weight_decay": 0.01, "decouple": True, "d_coef": 2}
    assert parse_optimizer_args("weight_decay=0.1 eps=1e-6") == {"weight_decay": 0.1, "eps": 1e-6}  # GUI string
    assert parse_optimizer_args({"weight_decay": 0.2}) == {"weight_decay": 0.2}
    assert parse_optimizer_args(None) == {}


@pytest.mark.parametrize("bad", [["weight_decay"], ["=1"], ["mode=fast"]])
def test_parse_args_errors_name_the_field(bad):
    with pytest.raises(SdtuneError, match="optimizer_args"):
        parse_optimizer_args(bad)


def test_adamw_default_case_insensitive_with_args_and_metadata_name():
    spec = build_optimizer("adamw", _groups(), 1e-3, ["betas=0.9,0.99", "weight_decay=0.01"])
    opt = spec.optimizer
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[0]["lr"] == 1e-3
    assert spec.name == "torch.optim.adamw.AdamW"
    assert spec.metadata_name == "torch.optim.adamw.AdamW(betas=(0.9, 0.99),weight_decay=0.01)"
    assert not spec.is_schedule_free and not spec.adaptive_lr and spec.forced_scheduler is None
    assert type(build_optimizer("", _groups(), 1e-3).optimizer) is torch.optim.AdamW  # default
    _step(spec)


def test_group_lrs_kept_and_callers_dicts_untouched():
    groups = _groups(lr_te=5e-5)
    spec = build_optimizer("AdamW", groups, 1e-4)
    assert [g["lr"] for g in spec.optimizer.param_groups] == [1e-4, 5e-5]
    assert "lr" not in groups[0]


def test_sgd_nesterov_gets_momentum_09():
    spec = build_optimizer("SGDNesterov", _groups(), 0.1)
    g = spec.optimizer.param_groups[0]
    assert type(spec.optimizer) is torch.optim.SGD and g["nesterov"] is True and g["momentum"] == 0.9
    assert spec.kwargs == {"momentum": 0.9}  # nesterov is not an optimizer_arg (as sd-scripts records it)
    assert build_optimizer("sgdnesterov", _groups(), 0.1, ["momentum=0.5"]).optimizer.param_groups[0]["momentum"] == 0.5
    _step(spec)


@pytest.mark.parametrize("name,instead", [("AdamW8bit", "use AdamW"), ("PagedAdamW8bit", "use AdamW"),
                                          ("SGDNesterov8bit", "use SGDNesterov"), ("Lion8bit", "use Lion"),
                                          ("PagedAdamW", "use AdamW"), ("bitsandbytes.optim.AdEMAMix8bit", "AdamW")])
def test_8bit_refused_at_build_time_without_cuda(name, instead):
    with pytest.raises(SdtuneError, match="needs CUDA and bitsandbytes") as e:
        build_optimizer(name, _groups(), 1e-4, device_type="cpu")
    assert instead in str(e.value) and name in str(e.value)


def test_8bit_refused_without_bitsandbytes_even_with_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(SdtuneError, match="bitsandbytes is not installed.*use AdamW"):
        build_optimizer("AdamW8bit", _groups(), 1e-4, device_type="cuda")


def test_8bit_maps_to_bitsandbytes_classes(monkeypatch):
    """With CUDA and bitsandbytes present the sd-scripts class is used (a stand-in module here)."""
    class SGD8bit(torch.optim.SGD):
        pass

    class AdamW8bit(torch.optim.AdamW):
        pass

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(SGD8bit=SGD8bit, AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert type(build_optimizer("adamw8bit", _groups(), 1e-4, device_type="cuda").optimizer) is AdamW8bit
    spec = build_optimizer("SGDNesterov8bit", _groups(), 1e-2, device_type="cuda")
    assert type(spec.optimizer) is SGD8bit
    assert spec.optimizer.param_groups[0]["nesterov"] and spec.optimizer.param_groups[0]["momentum"] == 0.9
    with pytest.raises(SdtuneError, match="no optim.PagedLion8bit"):
        build_optimizer("PagedLion8bit", _groups(), 1e-4, device_type="cuda")


@pytest.mark.parametrize("name,pip", [("Lion", "lion-pytorch"), ("DAdaptAdam", "dadaptation"),
                                      ("DAdaptation", "dadaptation"), ("Prodigy", "prodigyopt"),
                                      ("AdamWScheduleFree", "schedulefree")])
def test_missing_optional_package_names_pip_package(monkeypatch, name, pip):
    for module in ("lion_pytorch", "dadaptation", "dadaptation.experimental", "prodigyopt", "schedulefree"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SdtuneError, match=f"pip install {pip}"):
        build_optimizer(name, _groups(), 1.0)


def test_adafactor_relative_step_forces_scheduler_and_drops_lrs():
    pytest.importorskip("transformers")
    groups = _groups(lr_te=5e-5)
    groups[0]["lr"] = 1e-4
    spec = build_optimizer("AdaFactor", groups, 1e-4)
    assert type(spec.optimizer).__name__ == "Adafactor"
    assert spec.forced_scheduler == "adafactor:0.0001"  # sd-scripts' lr_scheduler value
    assert spec.optimizer.defaults["relative_step"] is True and spec.optimizer.defaults["lr"] is None
    assert all(g["lr"] is None for g in spec.optimizer.param_groups)
    assert any("ignored" in w for w in spec.warnings)
    assert groups[0]["lr"] == 1e-4  # the caller's groups are not changed
    _step(spec)


def test_adafactor_fixed_lr():
    pytest.importorskip("transformers")
    spec = build_optimizer("adafactor", _groups(), 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert spec.forced_scheduler is None and spec.optimizer.param_groups[0]["lr"] == 1e-3
    _step(spec)
    warm = build_optimizer("adafactor", _groups(), 1e-3, ["relative_step=False", "warmup_init=True"])
    assert warm.forced_scheduler is not None  # warmup_init needs relative_step (sd-scripts turns it on)


def test_lion_steps():
    pytest.importorskip("lion_pytorch")
    spec = build_optimizer("Lion", _groups(), 1e-4, ["betas=0.9,0.99"])
    assert type(spec.optimizer).__name__ == "Lion"
    assert spec.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    _step(spec)


@pytest.mark.parametrize("name,cls", [("DAdaptation", "DAdaptAdamPreprint"), ("DAdaptAdam", "DAdaptAdam"),
                                      ("DAdaptLion", "DAdaptLion"), ("DAdaptSGD", "DAdaptSGD"),
                                      ("DAdaptAdaGrad", "DAdaptAdaGrad"), ("DAdaptAdan", "DAdaptAdan"),
                                      ("DAdaptAdanIP", "DAdaptAdanIP")])
def test_dadaptation_family(name, cls):
    pytest.importorskip("dadaptation")
    spec = build_optimizer(name, _groups(), 1.0)
    assert type(spec.optimizer).__name__ == cls and spec.adaptive_lr and not spec.warnings
    _step(spec)


def test_prodigy_warns_on_low_lr():
    pytest.importorskip("prodigyopt")
    spec = build_optimizer("prodigy", _groups(), 0.05, ["d_coef=2", "decouple=True"])
    assert type(spec.optimizer).__name__ == "Prodigy" and spec.adaptive_lr
    assert any("around 1.0" in w for w in spec.warnings)
    _step(spec)


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam", "DAdaptation", "DAdaptLion", "DAdaptSGD"])
def test_adaptive_with_two_lrs_refused_at_build_not_at_first_step(name):
    """sd-scripts only warns; these optimizers raise RuntimeError at step 1 when group lrs differ."""
    pytest.importorskip("prodigyopt" if name == "Prodigy" else "dadaptation")
    with pytest.raises(SdtuneError, match="same value"):
        build_optimizer(name, _groups(lr_te=0.5), 1.0)
    _step(build_optimizer(name, _groups(lr_te=1.0), 1.0))  # equal lrs run


def test_dadapt_adan_with_two_lrs_warns():
    pytest.importorskip("dadaptation")
    spec = build_optimizer("DAdaptAdan", _groups(lr_te=0.5), 1.0)
    assert any("only the first" in w for w in spec.warnings)
    _step(spec)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree"])
def test_schedule_free_in_train_mode_and_toggles(name):
    pytest.importorskip("schedulefree")
    spec = build_optimizer(name, _groups(), 1e-3)
    assert spec.is_schedule_free and type(spec.optimizer).__name__ == name
    assert spec.optimizer.param_groups[0]["train_mode"] is True
    _step(spec, steps=6)  # RAdam does not move the first few steps
    spec.eval_mode()
    assert spec.optimizer.param_groups[0]["train_mode"] is False
    spec.train_mode()
    assert spec.optimizer.param_groups[0]["train_mode"] is True


def test_dotted_and_bare_class_names():
    spec = build_optimizer("torch.optim.RMSprop", _groups(), 1e-3, ["alpha=0.9"])
    assert type(spec.optimizer) is torch.optim.RMSprop and spec.name == "torch.optim.rmsprop.RMSprop"
    assert type(build_optimizer("Adagrad", _groups(), 1e-3).optimizer) is torch.optim.Adagrad  # bare -> torch.optim
    _step(spec)


@pytest.mark.parametrize("name,match", [("NoSuchOpt", "not a known optimizer"),
                                        ("no_such_pkg.Opt", "cannot be imported"),
                                        ("torch.optim.NoSuch", "not a known optimizer")])
def test_unknown_names_are_errors(name, match):
    with pytest.raises(SdtuneError, match=match):
        build_optimizer(name, _groups(), 1e-3)


def test_bad_kwargs_and_empty_groups_are_errors():
    with pytest.raises(SdtuneError, match="could not be built.*bogus"):
        build_optimizer("AdamW", _groups(), 1e-3, ["bogus=1"])
    with pytest.raises(SdtuneError, match="nothing to train"):
        build_optimizer("AdamW", [], 1e-3)
