"""The learning-rate schedule of a training run, by sd-scripts' `--lr_scheduler` name.

Follows sd-scripts `library/train_util.py` `get_scheduler_fix` (research/kohya_lycoris.md 3.3): the curves are
diffusers' (`diffusers.optimization`, the same formulas as the transformers functions sd-scripts calls), warm-up is
a step count or a ratio (< 1) of the total steps, `constant` with warm-up is an error, Adafactor with
`relative_step` gets transformers' `AdafactorSchedule`, and a schedule-free optimizer gets a constant schedule
(sd-scripts uses a dummy object; a constant LambdaLR reports the same learning rates and saves with the state).

Total steps are what sd-scripts passes: `max_train_steps * num_processes` (not times gradient accumulation).
"""

from __future__ import annotations

import ast
import importlib
import logging
import math
from typing import Any, Mapping, Optional, Sequence, Union

from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from ..errors import SdtuneError

__all__ = ["build_scheduler", "warmup_steps_for", "SCHEDULERS"]

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "piecewise_constant", "adafactor")
SchedulerArgs = Union[str, Sequence[str], Mapping[str, Any], None]


def warmup_steps_for(warmup_steps: Union[int, float, str], total_steps: int) -> int:
    """Warm-up in steps from sd-scripts' lr_warmup_steps: an int, a float < 1 (ratio of total steps) or "N%"."""
    value: Union[int, float] = warmup_steps  # type: ignore[assignment]
    if isinstance(warmup_steps, str):
        text = warmup_steps.strip()
        try:
            value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            raise SdtuneError(f"lr_warmup_steps {warmup_steps!r} is not a number of steps, a ratio below 1 "
                              f"or a percentage") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise SdtuneError(f"lr_warmup_steps {warmup_steps!r} must be a number of steps (>= 0) or a ratio below 1")
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)  # sd-scripts: int(ratio * num_training_steps)
    return int(value)


def _parse_scheduler_args(scheduler_args: SchedulerArgs) -> dict[str, Any]:
    """sd-scripts' `--lr_scheduler_args`: `k=v` strings (values via ast.literal_eval) or a mapping."""
    if scheduler_args is None:
        return {}
    if isinstance(scheduler_args, Mapping):
        return dict(scheduler_args)
    items = scheduler_args.split() if isinstance(scheduler_args, str) else list(scheduler_args)
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise SdtuneError(f"lr_scheduler_args: {item!r} is not of the form key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise SdtuneError(f"lr_scheduler_args: the value of {key.strip()!r} ({text.strip()!r}) is not a Python "
                              f"literal (quote text)") from None
    return kwargs


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer wrapper (the object itself otherwise)."""
    while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _is_schedule_free(optimizer: Any) -> bool:
    """A schedule-free optimizer (package schedulefree or any class named ...ScheduleFree)."""
    cls = type(_unwrap(optimizer))
    return cls.__name__.lower().endswith("schedulefree") or cls.__module__.split(".")[0] == "schedulefree"


def _is_relative_step_adafactor(optimizer: Any) -> bool:
    """transformers' Adafactor with relative_step, which sets its own learning rate."""
    inner = _unwrap(optimizer)
    return type(inner).__name__ == "Adafactor" and bool(getattr(inner, "defaults", {}).get("relative_step"))


def _adafactor_schedule(name: str, optimizer: Any, warmup: int) -> LRScheduler:
    """transformers' AdafactorSchedule; `adafactor:<lr>` gives the learning rate reported before the first step."""
    if warmup:
        raise SdtuneError(f"lr_warmup_steps: Adafactor with relative_step sets its own learning rate and does not "
                          f"take a warm-up ({warmup} steps given): set lr_warmup_steps to 0 (optimizer_args "
                          f"warmup_init=True warms it up), or use optimizer_args relative_step=False")
    _, _, text = name.partition(":")
    try:
        initial_lr = float(text) if text else 0.0
    except ValueError:
        raise SdtuneError(f"lr_scheduler {name!r}: expected adafactor or adafactor:<initial lr>") from None
    transformers_optimization = importlib.import_module("transformers.optimization")
    if not isinstance(_unwrap(optimizer), transformers_optimization.Adafactor):
        raise SdtuneError("lr_scheduler 'adafactor' works only with optimizer_type AdaFactor; pick another scheduler")
    return transformers_optimization.AdafactorSchedule(_unwrap(optimizer), initial_lr)


def build_scheduler(name: str, optimizer: Any, total_steps: int, warmup_steps: Union[int, float, str] = 0,
                    num_cycles: int = 1, power: float = 1.0, min_lr_ratio: Optional[float] = None,
                    scheduler_args: SchedulerArgs = None) -> LRScheduler:
    """The LR scheduler named as sd-scripts' --lr_scheduler, over total_steps optimizer steps."""
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    key = (name or "constant").strip().lower()
    kwargs = _parse_scheduler_args(scheduler_args)
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise SdtuneError(f"max_train_steps: the scheduler needs a positive number of steps, got {total_steps!r}")
    warmup = warmup_steps_for(warmup_steps, total_steps)

    if _is_schedule_free(optimizer):
        if key != "constant" or warmup:
            log.info("schedule-free optimizer: lr_scheduler %r and warm-up are ignored (use the optimizer's own "
                     "warmup_steps argument)", name)
        return LambdaLR(optimizer, lambda _: 1.0)
    if key.startswith("adafactor") or _is_relative_step_adafactor(optimizer):
        if not key.startswith("adafactor"):
            log.info("Adafactor with relative_step sets its own learning rate: lr_scheduler %r replaced by adafactor",
                     name)
            key, warmup = "adafactor", 0
        return _adafactor_schedule(key, optimizer, warmup)

    def make(kind: str, **args: Any) -> LRScheduler:
        try:
            return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(kind)](optimizer, **args, **kwargs)
        except (TypeError, ValueError) as e:
            raise SdtuneError(f"lr_scheduler {name!r} with lr_scheduler_args {kwargs} could not be built: "
                              f"{e}") from None

    if key == "constant":
        if warmup:
            raise SdtuneError(f"lr_scheduler 'constant' does not warm up, but lr_warmup_steps gives {warmup} steps: "
                              f"use lr_scheduler constant_with_warmup, or set lr_warmup_steps to 0")
        return make("constant")
    if key == "constant_with_warmup":
        return make(key, num_warmup_steps=warmup)
    if key in ("linear", "cosine"):
        return make(key, num_warmup_steps=warmup, num_training_steps=total_steps)
    if key == "cosine_with_restarts":
        return make(key, num_warmup_steps=warmup, num_training_steps=total_steps, num_cycles=num_cycles)
    if key == "polynomial":
        return make(key, num_warmup_steps=warmup, num_training_steps=total_steps, power=power)
    if key == "piecewise_constant":
        return make(key)  # step_rules come in lr_scheduler_args, as in sd-scripts
    if key == "cosine_with_min_lr":
        fn = getattr(importlib.import_module("transformers.optimization"),
                     "get_cosine_with_min_lr_schedule_with_warmup", None)
        if fn is None:
            raise SdtuneError("lr_scheduler 'cosine_with_min_lr' needs a newer transformers (pip install -U "
                              "transformers); or use cosine")
        if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise SdtuneError("lr_scheduler 'cosine_with_min_lr' needs lr_scheduler_min_lr_ratio (e.g. 0.1)")
        args: dict[str, Any] = {"num_warmup_steps": warmup, "num_training_steps": total_steps,
                                "num_cycles": num_cycles / 2}  # sd-scripts passes half the cycles
        if min_lr_ratio is not None:
            args["min_lr_rate"] = min_lr_ratio
        try:
            return fn(optimizer, **args, **kwargs)
        except (TypeError, ValueError) as e:
            raise SdtuneError(f"lr_scheduler {name!r} could not be built: {e}") from None
    raise SdtuneError(f"lr_scheduler {name!r} is not known; use one of {', '.join(SCHEDULERS[:-1])}")

