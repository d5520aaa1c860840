"""The network's settings, named and defaulted as sd-scripts' `networks.lora` / LyCORIS's `lycoris.kohya`.

`LoraConfig` holds `network_dim`/`network_alpha` (as rank/alpha) and every `--network_args` key sdtune
supports; `from_network_args` reads sd-scripts' `k=v` strings into it (unknown keys are an error naming
the key) and `network_args()` writes back the ones that differ from the defaults, for `ss_network_args`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import SdtuneError

__all__ = ["ALGORITHMS", "LoraConfig", "from_network_args"]

ALGORITHMS = ("lora", "loha", "lokr", "full")  # + "dora" (= lora with weight_decompose), "locon" (= lora)
_ALIASES = {"locon": "lora", "lycoris": "lora"}

Floats = Union[str, Sequence[float], None]


@dataclass
class LoraConfig:
    """sd-scripts' `network_dim`/`network_alpha`, `conv_dim`/`conv_alpha` (conv_alpha defaults to 1), LyCORIS's algo.

    `algorithm`: "lora" (LoRA/LoCon) | "loha" | "lokr" | "full" | "dora" (= "lora" with `weight_decompose`,
    LyCORIS's `dora_wd`); `factor` is LoKr's (-1 = balanced); `use_tucker` decomposes 3x3 convs (LyCORIS).
    Dropouts (`dropout` is sd-scripts' `--network_dropout`), per-block ranks (`block_dims` ... 25 values for
    SD1.x/SD2.x, 23 for SDXL, comma-separated or lists), per-block LR weights (`down/mid/up_lr_weight`, lists
    or `cosine|sine|linear|reverse_linear|zeros[+base]`) and LoRA+ ratios follow sd-scripts exactly.
    """

    rank: int = 4
    alpha: float = 1.0
    conv_rank: Optional[int] = None
    conv_alpha: Optional[float] = None
    train_unet: bool = True
    train_text_encoder: bool = True
    multiplier: float = 1.0
    algorithm: str = "lora"
    factor: int = -1
    weight_decompose: bool = False
    use_tucker: bool = False
    dropout: Optional[float] = None
    rank_dropout: Optional[float] = None
    module_dropout: Optional[float] = None
    block_dims: Floats = None
    block_alphas: Floats = None
    conv_block_dims: Floats = None
    conv_block_alphas: Floats = None
    down_lr_weight: Floats = None
    mid_lr_weight: Floats = None
    up_lr_weight: Floats = None
    block_lr_zero_threshold: float = 0.0
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        self.algorithm = _ALIASES.get(self.algorithm, self.algorithm)
        if self.algorithm == "dora":
            self.algorithm, self.weight_decompose = "lora", True
        if self.algorithm not in ALGORITHMS:
            raise SdtuneError(f"unknown network algorithm {self.algorithm!r} (lora, locon, loha, lokr, dora or full)")
        if self.rank < 1 and self.algorithm != "full":
            raise SdtuneError(f"network_dim (rank) must be at least 1, got {self.rank}")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if p is not None and not 0 <= p < 1:
                raise SdtuneError(f"{name} must be in [0, 1), got {p}")
        if self.algorithm == "full" and self.weight_decompose:
            raise SdtuneError("dora_wd does not apply to algo=full (a full diff has no low-rank factors)")

    @property
    def is_lycoris(self) -> bool:
        """True when the modules are LyCORIS's (anything but plain LoRA/LoCon), saved as `lycoris.kohya`."""
        return self.algorithm != "lora" or self.weight_decompose or self.use_tucker

    @property
    def effective_conv_alpha(self) -> float:
        """sd-scripts: conv_alpha is 1 when conv_dim is given without it."""
        return 1.0 if self.conv_alpha is None else float(self.conv_alpha)

    @property
    def network_module(self) -> str:
        """`ss_network_module`: `networks.lora` for LoRA/LoCon, `lycoris.kohya` for LyCORIS algorithms."""
        return "lycoris.kohya" if self.is_lycoris else "networks.lora"

    def network_args(self) -> dict[str, str]:
        """The `--network_args` that reproduce this config (for `ss_network_args`), as strings.

        `dropout` is left out: sd-scripts takes it as `--network_dropout` and records `ss_network_dropout`.
        """
        args: dict[str, str] = {}
        if self.is_lycoris:
            args["algo"] = self.algorithm
        for key, attr in _ARG_FIELDS.items():
            value = getattr(self, attr)
            if value == _DEFAULTS[attr] or (attr == "factor" and self.algorithm != "lokr") or attr == "dropout":
                continue
            if key == "conv_dim" and value:
                args["conv_alpha"] = _fmt(self.effective_conv_alpha)
            args[key] = _fmt(value)
        return args


# network_args key -> LoraConfig field (sd-scripts' and LyCORIS's spellings)
_ARG_FIELDS = {
    "conv_dim": "conv_rank", "conv_alpha": "conv_alpha", "factor": "factor", "dora_wd": "weight_decompose",
    "use_tucker": "use_tucker", "dropout": "dropout", "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout", "block_dims": "block_dims", "block_alphas": "block_alphas",
    "conv_block_dims": "conv_block_dims", "conv_block_alphas": "conv_block_alphas",
    "down_lr_weight": "down_lr_weight", "mid_lr_weight": "mid_lr_weight", "up_lr_weight": "up_lr_weight",
    "block_lr_zero_threshold": "block_lr_zero_threshold", "loraplus_lr_ratio": "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio": "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio": "loraplus_text_encoder_lr_ratio",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING}
_INT_FIELDS = {"conv_rank", "factor"}
_FLOAT_FIELDS = {"conv_alpha", "dropout", "rank_dropout", "module_dropout", "block_lr_zero_threshold",
                 "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}
_BOOL_FIELDS = {"weight_decompose", "use_tucker"}
# LyCORIS switches sdtune only runs one way: key -> (the value that matches sdtune, why the other is refused)
_FIXED = {"wd_on_output": (True, "DoRA's magnitude is kept per output row, LyCORIS's default"),
          "rs_lora": (False, "use network_alpha instead: rs_lora only rescales alpha"),
          "train_norm": (False, "norm layers are not trained"),
          "bypass_mode": (False, "not needed for unquantised models"),
          "use_scalar": (False, "not supported")}


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _parse_bool(key: str, value: str) -> bool:
    low = str(value).strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise SdtuneError(f"network_args {key}={value!r}: expected True or False")


def _split_args(args: Union[Iterable[str], Mapping[str, Any], None]) -> dict[str, str]:
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return {str(k): str(v) for k, v in args.items()}
    out: dict[str, str] = {}
    for item in args:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise SdtuneError(f"network_args entry {item!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def from_network_args(rank: Optional[int] = None, alpha: Optional[float] = None,
                      args: Union[Iterable[str], Mapping[str, Any], None] = None,
                      dropout: Optional[float] = None, **overrides: Any) -> LoraConfig:
    """A LoraConfig from sd-scripts' `network_dim`, `network_alpha`, `network_args` and `network_dropout`.

    `network_dim` None means 4 and `network_alpha` None means 1, as sd-scripts; `algo=` selects a LyCORIS
    algorithm (`lora`/`locon`, `loha`, `lokr`, `full`, and `dora_wd=True` for DoRA).
    """
    values: dict[str, Any] = {"rank": 4 if rank is None else int(rank), "alpha": 1.0 if alpha is None else float(alpha),
                              "dropout": dropout}
    for key, raw in _split_args(args).items():
        if key == "algo":
            values["algorithm"] = raw
        elif key in _ARG_FIELDS:
            attr = _ARG_FIELDS[key]
            try:
                if attr in _INT_FIELDS:
                    values[attr] = int(float(raw))
                elif attr in _FLOAT_FIELDS:
                    values[attr] = None if raw in ("", "None") else float(raw)
                elif attr in _BOOL_FIELDS:
                    values[attr] = _parse_bool(key, raw)
                else:
                    values[attr] = raw
            except ValueError:
                raise SdtuneError(f"network_args {key}={raw!r} is not a number") from None
        elif key in _FIXED:
            accepted, why = _FIXED[key]
            if _parse_bool(key, raw) != accepted:
                raise SdtuneError(f"network_args {key}={raw}: not supported by sdtune ({why})")
        elif key == "preset":
            raise SdtuneError("network_args preset: not supported; sdtune trains sd-scripts' module set "
                              "(attention and MLP layers, plus ResNet convs with conv_dim)")
        else:
            known = ", ".join(sorted({"algo", *_ARG_FIELDS, *_FIXED}))
            raise SdtuneError(f"network_args: unknown key {key!r} (known: {known})")
    values.update(overrides)
    return LoraConfig(**values)
