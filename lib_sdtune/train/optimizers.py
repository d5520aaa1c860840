"""The optimizer for a training run, chosen by name as sd-scripts' `--optimizer_type` / `--optimizer_args`.

Names and behaviour follow sd-scripts `library/train_util.py` `get_optimizer` (research/kohya_lycoris.md 3.2):
case-insensitive names, `k=v` arguments read with `ast.literal_eval`, SGD with Nesterov momentum 0.9 when no
momentum is given, Adafactor's `relative_step=True` default (the learning rate is ignored and the "adafactor"
scheduler is forced), schedule-free optimizers put in train mode, and any `module.Class` imported by name.

Unlike sd-scripts, an optimizer that cannot run here is refused when it is built, with what to pick instead:
8-bit and paged optimizers without CUDA or without bitsandbytes, optional packages that are not installed.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..errors import SdtuneError

__all__ = ["OptimizerSpec", "build_optimizer", "parse_optimizer_args", "KNOWN_OPTIMIZERS"]

OptimizerArgs = Union[str, Sequence[str], Mapping[str, Any], None]

# bitsandbytes optimizers by sd-scripts name (lower case) -> (class in bitsandbytes.optim, what to use without it)
_BNB = {
    "adamw8bit": ("AdamW8bit", "AdamW"),
    "pagedadamw8bit": ("PagedAdamW8bit", "AdamW"),
    "pagedadamw": ("PagedAdamW", "AdamW"),
    "pagedadamw32bit": ("PagedAdamW32bit", "AdamW"),
    "lion8bit": ("Lion8bit", "Lion (pip install lion-pytorch) or AdamW"),
    "pagedlion8bit": ("PagedLion8bit", "Lion (pip install lion-pytorch) or AdamW"),
    "sgdnesterov8bit": ("SGD8bit", "SGDNesterov"),
    "ademamix8bit": ("AdEMAMix8bit", "AdamW"),
    "pagedademamix8bit": ("PagedAdEMAMix8bit", "AdamW"),
}
# D-Adaptation family by sd-scripts name -> (module, class)
_DADAPT = {
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
}
# these raise at their first step when param groups have different non-zero learning rates
_ONE_LR = {"dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion", "dadaptsgd", "prodigy"}
_SCHEDULE_FREE = {"adamwschedulefree": "AdamWScheduleFree", "radamschedulefree": "RAdamScheduleFree",
                  "sgdschedulefree": "SGDScheduleFree"}
KNOWN_OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
                    "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdamPreprint",
                    "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy",
                    "AdaFactor", "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")


@dataclass
class OptimizerSpec:
    """A built optimizer and what the training loop must know about it."""

    optimizer: torch.optim.Optimizer
    name: str  # "module.Class" of the optimizer, as sd-scripts records it in ss_optimizer
    is_schedule_free: bool = False  # call train_mode()/eval_mode() around sampling and saving; no LR scheduler
    adaptive_lr: bool = False  # DAdaptation/Prodigy: the learning rate is a multiplier, ~1.0
    forced_scheduler: Optional[str] = None  # "adafactor:<lr>" for Adafactor with relative_step (sd-scripts' value)
    warnings: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the optimizer_args as given to the class

    @property
    def metadata_name(self) -> str:
        """ss_optimizer as sd-scripts writes it: `module.Class(k=v,...)`."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def train_mode(self) -> None:
        """Put a schedule-free optimizer in train mode (before training steps); no-op for the others."""
        if self.is_schedule_free:
            self.optimizer.train()  # type: ignore[attr-defined]

    def eval_mode(self) -> None:
        """Put a schedule-free optimizer in eval mode (before sampling, validation, saving); no-op otherwise."""
        if self.is_schedule_free:
            self.optimizer.eval()  # type: ignore[attr-defined]


def parse_optimizer_args(optimizer_args: OptimizerArgs) -> dict[str, Any]:
    """sd-scripts' `--optimizer_args`: `k=v` strings (values via ast.literal_eval) or a mapping, as a dict."""
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, Mapping):
        return dict(optimizer_args)
    items = optimizer_args.split() if isinstance(optimizer_args, str) else list(optimizer_args)
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise SdtuneError(f"optimizer_args: {item!r} is not of the form key=value (e.g. weight_decay=0.01)")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SdtuneError(f"optimizer_args: the value of {key!r} ({text!r}) is not a Python literal; write numbers "
                              f"as 0.01, tuples as 0.9,0.99, booleans as True/False and text in quotes") from None
    return kwargs


def _import_optional(module: str, pip_name: str, optimizer_type: str) -> Any:
    """Import an optional optimizer package or say which pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SdtuneError(f"optimizer_type {optimizer_type!r} needs the package {pip_name!r}, which is not installed: "
                          f"pip install {pip_name} into this Python environment, or use AdamW") from None


def _bitsandbytes_class(optimizer_type: str, class_name: str, instead: str, device_type: str) -> Any:
    """A bitsandbytes optimizer class, or an error now if it cannot run on this machine."""
    if device_type != "cuda":
        raise SdtuneError(f"optimizer_type {optimizer_type!r} needs CUDA and bitsandbytes; on this machine "
                          f"({device_type}) use {instead}")
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise SdtuneError(f"optimizer_type {optimizer_type!r} needs CUDA and bitsandbytes, and bitsandbytes is not "
                          f"installed: pip install bitsandbytes, or use {instead}") from None
    cls = getattr(bnb.optim, class_name, None)
    if cls is None:
        raise SdtuneError(f"optimizer_type {optimizer_type!r}: the installed bitsandbytes has no optim.{class_name}; "
                          f"upgrade it (pip install -U bitsandbytes) or use {instead}")
    return cls


def _dotted_class(optimizer_type: str, device_type: str) -> Any:
    """`module.Class` imported by name; a bare name is looked up in torch.optim (as sd-scripts)."""
    module_name, _, class_name = optimizer_type.rpartition(".")
    if module_name.split(".")[0] == "bitsandbytes" and device_type != "cuda":
        raise SdtuneError(f"optimizer_type {optimizer_type!r} needs CUDA and bitsandbytes; on this machine "
                          f"({device_type}) use AdamW")
    if not module_name:
        module = torch.optim
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise SdtuneError(f"optimizer_type {optimizer_type!r}: module {module_name!r} cannot be imported ({e}); "
                              f"install the package that provides it, or use AdamW") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        where = module_name or "torch.optim"
        raise SdtuneError(f"optimizer_type {optimizer_type!r} is not a known optimizer nor a class in {where}; use one "
                          f"of {', '.join(KNOWN_OPTIMIZERS)}, or a class as module.Class")
    return cls


def _group_lrs(param_groups: list[dict], learning_rate: float) -> list[float]:
    """The learning rate of each param group (the group's own "lr", else the run's)."""
    return [g.get("lr", learning_rate) if isinstance(g, dict) else learning_rate for g in param_groups]


def build_optimizer(optimizer_type: str, param_groups: list[dict], learning_rate: float,
                    optimizer_args: OptimizerArgs = None, device_type: str = "cpu") -> OptimizerSpec:
    """Build the optimizer named as sd-scripts' --optimizer_type, refusing now one that cannot run here."""
    original = (optimizer_type or "AdamW").strip()
    kind = original.lower()
    kwargs = parse_optimizer_args(optimizer_args)
    groups = [dict(g) if isinstance(g, dict) else g for g in param_groups]  # never change the caller's dicts
    if not groups:
        raise SdtuneError("nothing to train: the optimizer got no parameters (is every learning rate 0?)")
    lr: Optional[float] = learning_rate
    warnings: list[str] = []
    forced: Optional[str] = None
    extra: dict[str, Any] = {}  # passed to the class but not recorded as optimizer_args (as sd-scripts)

    if kind == "adamw":
        cls = torch.optim.AdamW
    elif kind in _BNB:
        class_name, instead = _BNB[kind]
        cls = _bitsandbytes_class(original, class_name, instead, device_type)
        if kind == "sgdnesterov8bit":
            kwargs.setdefault("momentum", 0.9)
            extra["nesterov"] = True
    elif kind == "lion":
        cls = _import_optional("lion_pytorch", "lion-pytorch", original).Lion
    elif kind == "sgdnesterov":
        cls = torch.optim.SGD
        kwargs.setdefault("momentum", 0.9)  # Nesterov needs momentum
        extra["nesterov"] = True
    elif kind in _DADAPT or kind == "prodigy":
        if kind == "prodigy":
            cls = _import_optional("prodigyopt", "prodigyopt", original).Prodigy
        else:
            module, class_name = _DADAPT[kind]
            cls = getattr(_import_optional(module, "dadaptation", original), class_name)
        lrs = _group_lrs(groups, learning_rate)
        if lrs[0] <= 0.1:
            warnings.append(f"learning rate {lrs[0]} is low for {original}, which adapts it: set it around 1.0")
        distinct = sorted({lr for lr in lrs if lr != 0.0})
        if len(distinct) > 1 and kind in _ONE_LR:
            # sd-scripts only warns; these optimizers then raise at their first step
            raise SdtuneError(f"optimizer_type {original!r} adapts one learning rate for all parameters and stops at "
                              f"the first step when the groups differ (got {', '.join(map(str, distinct))}): give "
                              f"unet_lr and text_encoder_lr the same value (about 1.0), or pick AdamW")
        if len(distinct) > 1:
            warnings.append(f"{original} with several learning rates (e.g. U-Net and text encoder): only the first "
                            f"({lrs[0]}) takes effect")
    elif kind == "adafactor":
        cls = importlib.import_module("transformers.optimization").Adafactor
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            warnings.append("Adafactor: warmup_init=True needs relative_step, so relative_step was set to True")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if learning_rate != 0.0:
                warnings.append(f"Adafactor with relative_step: the learning rate ({learning_rate}) is used only as "
                                f"the initial value the scheduler reports; Adafactor sets its own")
            popped = [g.pop("lr", None) for g in groups if isinstance(g, dict)]
            if any(p is not None for p in popped):
                warnings.append("Adafactor with relative_step: unet_lr and text_encoder_lr are ignored")
            forced = f"adafactor:{learning_rate}"
            lr = None
        elif kwargs.get("clip_threshold", 1.0) != 1.0:
            warnings.append("Adafactor: clip_threshold=1.0 usually works best")
    elif kind in _SCHEDULE_FREE:
        cls = getattr(_import_optional("schedulefree", "schedulefree", original), _SCHEDULE_FREE[kind])
    else:
        cls = _dotted_class(original, device_type)

    try:
        optimizer = cls(groups, lr=lr, **extra, **kwargs)
    except (TypeError, ValueError) as e:
        raise SdtuneError(f"optimizer_type {original!r} with optimizer_args {kwargs} could not be built: {e}") from None

    is_schedule_free = kind.endswith("schedulefree")
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()  # schedule-free optimizers start in train mode (sd-scripts does the same)
    class_name = cls.__name__.lower()
    adaptive = kind.startswith("dadapt") or kind == "prodigy" or class_name.startswith(("dadapt", "prodigy"))
    return OptimizerSpec(optimizer=optimizer, name=f"{cls.__module__}.{cls.__name__}",
                         is_schedule_free=is_schedule_free, adaptive_lr=adaptive, forced_scheduler=forced,
                         warnings=warnings, kwargs=kwargs)
