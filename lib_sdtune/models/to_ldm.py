"""diffusers/transformers state dicts -> the original single-file (ldm/sgm) key layout.

The inverse of diffusers' `single_file_utils` converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`):
a round trip gives back the same tensors. Only renaming, `torch.cat`, `.T` and `reshape`-like
views are used, so every function also works on meta tensors (the loader maps a module's
keys back to find the checkpoint keys nobody consumed). An unknown key raises `SdtuneError`
rather than being dropped, because a silently missing tensor is a corrupt checkpoint.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..errors import SdtuneError

__all__ = ["unet_to_ldm", "vae_to_ldm", "clip_to_ldm", "open_clip_to_ldm"]

StateDict = Mapping[str, torch.Tensor]

# diffusers ResnetBlock2D submodule -> ldm ResBlock submodule
_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
             "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK_RX = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_DOWNSAMPLE_RX = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)$")
_UPSAMPLE_RX = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)$")
_MID_RX = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _unet_resnet(rest: str, key: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _UNET_RES:
        raise SdtuneError(f"UNet key {key!r}: unknown resnet part {head!r}")
    return f"{_UNET_RES[head]}.{tail}"


def unet_to_ldm(sd: StateDict, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Rename a diffusers `UNet2DConditionModel` state dict to the ldm/sgm `UNetModel` layout.

    Handles SD1/SD2/SDXL/SDXL-refiner UNets (any number of levels; `layers_per_block` is read
    from the down blocks' resnets). SDXL's `add_embedding` becomes `label_emb.0.0/0.2`. An up
    block's upsampler is `output_blocks.N.2.conv` when that block has attentions, else `.1.conv`.
    """
    down_res = [int(m.group(4)) for k in sd for m in [_BLOCK_RX.match(k)] if m and m.group(1) == "down"
                and m.group(3) == "resnets"]
    if not down_res:
        raise SdtuneError("not a diffusers UNet state dict: no down_blocks.*.resnets keys")
    layers = max(down_res) + 1
    per_level = layers + 1
    up_has_attn = {int(m.group(2)) for k in sd for m in [_BLOCK_RX.match(k)] if m and m.group(1) == "up"
                   and m.group(3) == "attentions"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = None
        head, _, tail = key.rpartition(".")
        if head in _UNET_TOP:
            new = f"{_UNET_TOP[head]}.{tail}"
        elif m := _BLOCK_RX.match(key):
            side, level, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if side == "down":
                block = f"input_blocks.{1 + level * per_level + j}"
            else:
                block = f"output_blocks.{level * per_level + j}"
            new = f"{block}.0.{_unet_resnet(rest, key)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif m := _DOWNSAMPLE_RX.match(key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * per_level}.0.op.{m.group(2)}"
        elif m := _UPSAMPLE_RX.match(key):
            level = int(m.group(1))
            slot = 2 if level in up_has_attn else 1
            new = f"output_blocks.{level * per_level + layers}.{slot}.conv.{m.group(2)}"
        elif m := _MID_RX.match(key):
            if m.group(1) == "resnets":
                new = f"middle_block.{2 * int(m.group(2))}.{_unet_resnet(m.group(3), key)}"
            elif m.group(2) == "0":
                new = f"middle_block.1.{m.group(3)}"
        if new is None:
            raise SdtuneError(f"UNet key {key!r} has no place in the original layout")
        out[prefix + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_PLAIN = ("conv_in.", "conv_out.", "quant_conv.", "post_quant_conv.")


def vae_to_ldm(sd: StateDict, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to the ldm `AutoencoderKL` layout.

    Decoder up blocks are numbered in reverse (diffusers' first up block is ldm's last), and the
    mid-block attention projections become 1x1 convs `[C, C, 1, 1]` as in the original files.
    """
    ups = {int(m.group(1)) for k in sd for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m}
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        side, _, rest = key.partition(".")
        new = None
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key
        elif side in ("encoder", "decoder"):
            if rest.startswith(_VAE_PLAIN):
                new = key
            elif rest.startswith("conv_norm_out."):
                new = f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
            elif m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)$",
                               rest):
                level = int(m.group(2)) if m.group(1) == "down" else n_up - 1 - int(m.group(2))
                if m.group(4) is not None:
                    part = f"block.{m.group(4)}"
                else:
                    part = "downsample" if m.group(1) == "down" else "upsample"
                tail = m.group(5).replace("conv_shortcut.", "nin_shortcut.")
                new = f"{side}.{m.group(1)}.{level}.{part}.{tail}"
            elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)$", rest):
                tail = m.group(2).replace("conv_shortcut.", "nin_shortcut.")
                new = f"{side}.mid.block_{int(m.group(1)) + 1}.{tail}"
            elif m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
                               rest):
                new = f"{side}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}"
                if m.group(1) != "group_norm" and value.dim() == 2:
                    value = value[:, :, None, None]  # ldm stores these projections as 1x1 convs
        if new is None:
            raise SdtuneError(f"VAE key {key!r} has no place in the original layout")
        out[prefix + new] = value
    return out


_CLIP_TOWER = ("embeddings.", "encoder.", "final_layer_norm.")


def clip_to_ldm(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Prefix an HF `CLIPTextModel` state dict the ldm way (`<prefix>text_model.…`).

    Accepts both transformers layouts: `text_model.`-prefixed (4.x) and flattened (5.6+).
    `position_ids` is emitted only when the input has it; other keys (a `text_projection.weight`)
    keep their name under `prefix`, so diffusers' `convert_ldm_clip_checkpoint` inverts this.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_CLIP_TOWER):
            key = "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_TOP = {"embeddings.position_embedding.weight": "positional_embedding",
                  "embeddings.token_embedding.weight": "token_embedding.weight",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_LAYER_RX = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_to_ldm(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    """Convert an HF `CLIPTextModel`/`CLIPTextModelWithProjection` to the OpenCLIP text layout.

    q/k/v projections are fused into `attn.in_proj_weight/bias` (in q, k, v order),
    `text_projection` is the transpose of HF's `text_projection.weight` (OpenCLIP multiplies
    `x @ text_projection`), and `position_ids` (not an OpenCLIP tensor) is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        if bare in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[bare]] = value
        elif bare == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif bare.endswith("position_ids"):
            continue
        elif m := _LAYER_RX.match(bare):
            layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[module[10]] = value
            elif module in _OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = value
            else:
                raise SdtuneError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
        else:
            raise SdtuneError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise SdtuneError(f"text encoder layer {layer}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + k: v for k, v in out.items()}
