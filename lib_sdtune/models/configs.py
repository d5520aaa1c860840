"""diffusers/transformers configs inferred from an original checkpoint's shapes.

Every width, depth and block count is read from the weights, so the same code builds real-size
and tiny models; only head counts and the like come from `ModelHints`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from ..errors import SdtuneError
from ..io.detect import ArchInfo
from .hints import ModelHints

Shapes = Mapping[str, Sequence[int]]


def _sub(shapes: Shapes, prefix: str) -> dict[str, Sequence[int]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _count(keys, pattern: str) -> int:
    """How many distinct values the first group of `pattern` takes over `keys`."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def unet_config(shapes: Shapes, info: ArchInfo, hints: ModelHints, prefix: str) -> dict[str, Any]:
    """UNet2DConditionModel kwargs for the ldm/sgm UNet under `prefix`."""
    s = _sub(shapes, prefix)
    keys = list(s)
    in_ch = int(s["input_blocks.0.0.weight"][1])
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    downs = sorted(int(m.group(1)) for k in keys for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)] if m)
    n_levels = len(downs) + 1
    n_res = (downs[0] - 1) if downs else (n_input - 1)
    if n_input != 1 + n_levels * n_res + len(downs):
        raise SdtuneError(f"UNet layout not understood: {n_input} input blocks for {n_levels} levels")

    channels, depths = [], []
    for level in range(n_levels):
        first = 1 + level * (n_res + 1)
        channels.append(int(s[f"input_blocks.{first}.0.out_layers.3.weight"][0]))
        depths.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
    mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    layers = [d if d else 1 for d in depths]
    if not depths[-1]:
        layers[-1] = mid_depth or 1
    elif mid_depth != depths[-1]:
        raise SdtuneError(f"UNet layout not understood: middle block depth {mid_depth} != last level {depths[-1]}")

    if hints.num_head_channels:
        heads: Any = [max(1, c // hints.num_head_channels) for c in channels]
    else:
        heads = hints.num_heads or 8
    ctx_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.endswith(".1.proj_in.weight"))
    cfg: dict[str, Any] = dict(
        sample_size=128 if info.family.startswith("sdxl") else 64,
        in_channels=in_ch,
        out_channels=int(s["out.2.weight"][0]),
        layers_per_block=n_res,
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)),
        cross_attention_dim=int(s[ctx_key][1]),
        attention_head_dim=heads,
        use_linear_projection=len(s[proj_in]) == 2,
        transformer_layers_per_block=layers[0] if len(set(layers)) == 1 else tuple(layers),
    )
    if "label_emb.0.0.weight" in s:
        adm_in = int(s["label_emb.0.0.weight"][1])
        pooled = _pooled_dim(shapes, info)
        n_ids = 5 if info.family == "sdxl-refiner" else 6
        if pooled is None or (adm_in - pooled) % n_ids:
            raise SdtuneError(f"cannot infer SDXL size-conditioning width from label_emb input {adm_in}")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // n_ids,
                   projection_class_embeddings_input_dim=adm_in)
    if info.family == "sd2" and hints.prediction_type == "v_prediction":
        cfg["sample_size"] = 96
    return cfg


def _pooled_dim(shapes: Shapes, info: ArchInfo) -> int | None:
    """Width of the pooled TE2 embedding SDXL feeds into label_emb (its text_projection output)."""
    prefix = info.components.get("text_encoder_2")
    if prefix and prefix + "text_projection" in shapes:
        return int(shapes[prefix + "text_projection"][1])
    return {"sdxl": 1280, "sdxl-refiner": 1280}.get(info.family)


def vae_config(shapes: Shapes, hints: ModelHints, prefix: str) -> dict[str, Any]:
    """AutoencoderKL kwargs for the KL-f8 VAE under `prefix`."""
    s = _sub(shapes, prefix)
    keys = list(s)
    n_levels = _count(keys, r"encoder\.down\.(\d+)\.")
    channels = tuple(int(s[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(n_levels))
    return dict(
        in_channels=int(s["encoder.conv_in.weight"][1]),
        out_channels=int(s["decoder.conv_out.weight"][0]),
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=channels,
        latent_channels=int(s["decoder.conv_in.weight"][1]),
        layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=float(hints.vae_scaling_factor),
    )


def clip_config(shapes: Shapes, prefix: str) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an OpenAI CLIP-L text model in HF layout (SD1 TE, SDXL TE1)."""
    s = {k.replace("text_model.", "", 1): v for k, v in _sub(shapes, prefix).items()}
    vocab, hidden = (int(x) for x in s["embeddings.token_embedding.weight"])
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(s["encoder.layers.0.mlp.fc1.weight"][0]),
        num_hidden_layers=_count(s, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=_heads(hidden),
        max_position_embeddings=int(s["embeddings.position_embedding.weight"][0]),
        hidden_act="quick_gelu", projection_dim=768 if hidden == 768 else hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def open_clip_config(shapes: Shapes, prefix: str, drop_last_layer: bool) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an OpenCLIP text tower (SD2 TE, SDXL TE2).

    SD2 uses the penultimate layer, so diffusers' SD2 text encoder has one layer fewer.
    """
    s = _sub(shapes, prefix)
    vocab, hidden = (int(x) for x in s["token_embedding.weight"])
    layers = _count(s, r"transformer\.resblocks\.(\d+)\.")
    proj = s.get("text_projection")
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(s["transformer.resblocks.0.mlp.c_fc.weight"][0]),
        num_hidden_layers=layers - 1 if drop_last_layer else layers,
        num_attention_heads=_heads(hidden),
        max_position_embeddings=int(s["positional_embedding"][0]),
        hidden_act="gelu", projection_dim=int(proj[1]) if proj is not None else hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )


def _heads(hidden: int) -> int:
    """CLIP text towers use 64-wide heads (CLIP-L 12, OpenCLIP-H 16, bigG 20)."""
    if hidden % 64:
        raise SdtuneError(f"text encoder width {hidden} is not a multiple of the 64-wide CLIP heads")
    return hidden // 64
