"""`merge`: checkpoint merging (weighted sum, add difference, block weights, ...), or re-running a recipe."""

from __future__ import annotations

import argparse
import sys

EPILOG = """methods:
  weighted_sum      (1-alpha)*A + alpha*B  (A1111's "Weighted sum")
  add_difference    A + alpha*(B-C)  (A1111's "Add difference")
  triple_sum        (1-alpha-beta)*A + alpha*B + beta*C
  sum_twice         (1-beta)*((1-alpha)*A + alpha*B) + beta*C
  train_difference  supermerger's trainDifference: A + 1.8*alpha*(B-C), scaled per weight by |B-A|/(|B-C|+|B-A|)
  ties              C + alpha*TIES(A-C, B-C); beta = density kept per delta (default 0.2)
  dare              A + alpha*DARE(B-C); beta = drop rate (default 0.9), --seed makes it reproducible
  slerp             spherical interpolation from A (alpha 0) to B (alpha 1), per tensor

block weights (--blocks): 26 comma-separated values BASE,IN00..IN11,MID,OUT00..OUT11 for SD1/SD2; for SDXL
20 (BASE,IN00..IN08,MID,OUT00..OUT08), 21 (plus VAE) or 26 (converted); or a preset name: GRAD_V, GRAD_A,
FLAT_25, FLAT_75, WRAP08, WRAP12, WRAP14, WRAP16, MID12_50, OUT07, OUT12, OUT12_5, RING08_SOFT, RING08_5,
RING10_5, RING10_3, SMOOTHSTEP, REVERSE_SMOOTHSTEP, COSINE, REVERSE_COSINE, ALL_A, ALL_B.
BASE is the weight of the text encoder(s) and the VAE; --te-alpha / --vae-alpha override it.

The output records its recipe (inputs with sha256, method, ratios, seed, dtype) in its metadata;
`merge --recipe MERGED.safetensors -o OUT.safetensors` makes the same file again, bit for bit.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge checkpoints (weighted sum, add difference, TIES, DARE, SLERP, block weights, ...)",
        description="Merge two or three checkpoints of the same architecture (SD1.x, SD2.x, SDXL), streamed "
                    "tensor by tensor, into a .safetensors file; or re-run the recipe stored in a merged file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="A B [C] (.safetensors, or .ckpt read as plain tensors)")
    p.add_argument("--recipe", metavar="FILE", help="re-run the recipe of a merged .safetensors (or a .json recipe)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the merged .safetensors to write")
    p.add_argument("--method", default="weighted_sum", help="merge method (see below; default weighted_sum)")
    p.add_argument("--alpha", type=float, default=0.5, help="ratio: 0 keeps A, 1 takes B (default 0.5)")
    p.add_argument("--beta", type=float, default=None, help="second ratio of triple_sum, sum_twice, ties, dare")
    p.add_argument("--unet-alpha", type=float, default=None, help="alpha for the U-Net only")
    p.add_argument("--te-alpha", type=float, default=None, help="alpha for the text encoder(s) only")
    p.add_argument("--vae-alpha", type=float, default=None, help="alpha for the VAE only")
    p.add_argument("--blocks", metavar="V1,...,V26|PRESET", help="U-Net block weights for alpha (see below)")
    p.add_argument("--blocks-beta", metavar="V1,...,V26|PRESET", help="block weights for beta")
    p.add_argument("--seed", type=int, default=0, help="seed of random methods (dare); default 0")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="output dtype (default fp16)")
    p.add_argument("--vae", metavar="FILE", help="bake this VAE into the output")
    p.add_argument("--prune", action="store_true", help="drop EMA weights and schedule buffers")
    p.add_argument("--prune-ema", action="store_true", help="drop EMA weights (model_ema.*)")
    p.add_argument("--prune-schedule", action="store_true", help="drop the diffusion schedule buffers")
    p.add_argument("--position-ids", choices=("keep", "reset"), default="keep",
                   help="CLIP position_ids: keep A's exactly (default) or reset to 0..76 (never merged)")
    p.add_argument("--in-memory", action="store_true", help="load inputs whole instead of streaming (same bytes)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_merge)


def _config(args: argparse.Namespace):
    from ..errors import SdtuneError
    from ..merge import MergeConfig, config_from_recipe, load_recipe
    from ..merge.blocks import parse_blocks

    if args.recipe:
        if args.models:
            raise SdtuneError("give either MODEL files or --recipe, not both")
        return config_from_recipe(load_recipe(args.recipe), args.output, in_memory=args.in_memory)
    if len(args.models) not in (2, 3):
        raise SdtuneError(f"merge needs 2 or 3 models (A B [C]) or --recipe FILE; {len(args.models)} given")
    return MergeConfig(
        inputs=tuple(args.models), output=args.output, method=args.method, alpha=args.alpha, beta=args.beta,
        unet_alpha=args.unet_alpha, te_alpha=args.te_alpha, vae_alpha=args.vae_alpha,
        blocks=parse_blocks(args.blocks, "--blocks"), blocks_beta=parse_blocks(args.blocks_beta, "--blocks-beta"),
        seed=args.seed, dtype=args.dtype,
        vae=args.vae, prune_ema=args.prune or args.prune_ema, prune_schedule=args.prune or args.prune_schedule,
        position_ids=args.position_ids, in_memory=args.in_memory)


def run_merge(args: argparse.Namespace) -> int:
    from ..merge import merge_checkpoints
    from . import emit

    config = _config(args)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, unit="tensor", desc="merge", file=sys.stderr)

    def progress(done: int, total: int, info: str) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        result = merge_checkpoints(config, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    data = result.to_dict()
    lines = [f"wrote {result.output}", *(f"  {line}" for line in result.details())]
    emit(data, args.json, "\n".join(lines))
    return 0
