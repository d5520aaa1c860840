"""`lora ...`: inspect LoRA/LyCORIS files, bake them into checkpoints, merge, resize and extract LoRAs."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")
DTYPES = ("fp16", "bf16", "fp32")

BAKE_EPILOG = """Each LORA may end in :STRENGTH (default 1), e.g. style.safetensors:0.8 detail.safetensors:-0.5.
--blocks gives LoRA Block Weight values per LoRA, in the LoRAs' order ("-" for none): 17 (SD) or 12 (SDXL)
values as the LoRA Block Weight extension writes them, 26 (BASE,IN00..IN11,MID,OUT00..OUT11) for SD1/SD2,
20/21 for SDXL, or a preset name (see `merge --help`). BASE is the text encoder(s)."""

RESIZE_EPILOG = """dynamic ranks (sd-scripts' resize_lora.py rules, --rank is the maximum):
  sv_ratio X       keep singular values above S_max / X
  sv_fro X         keep the share X of the Frobenius norm
  sv_cumulative X  keep the share X of the sum of singular values"""


def register(sub: argparse._SubParsersAction) -> None:
    lora = sub.add_parser("lora", help="inspect, bake, merge, resize and extract LoRAs",
                          description="LoRA/LyCORIS file tools.")
    lsub = lora.add_subparsers(dest="lora_command", metavar="SUBCOMMAND", required=True)
    info = lsub.add_parser("info", help="algorithm, ranks, base model, module counts and trained tags of a LoRA",
                           description="Summarise a LoRA/LyCORIS .safetensors file (sd-scripts, LyCORIS, sdtune or "
                                       "other tools) from its header: algorithm, rank(s), alpha, base model version, "
                                       "text-encoder and U-Net module counts, trained tag frequencies.")
    info.add_argument("file", metavar="FILE", help="a LoRA/LyCORIS .safetensors file")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.set_defaults(func=run_info)
    _register_bake(lsub)
    _register_merge(lsub)
    _register_resize(lsub)
    _register_extract(lsub)


def _common(p: argparse.ArgumentParser, dtype_default: Optional[str] = None, dtype_help: str = "") -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default, help=dtype_help)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _register_bake(lsub: argparse._SubParsersAction) -> None:
    p = lsub.add_parser("bake", help="bake LoRA/LyCORIS files into a checkpoint",
                        description="Add LoRA/LyCORIS files (LoRA, LoCon, LoHa, LoKr, full, DoRA) into a checkpoint's "
                                    "weights, streamed tensor by tensor; other tensors are copied unchanged.",
                        epilog=BAKE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint (.safetensors, or .ckpt read as plain tensors)")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]", help="LoRA files with optional strengths")
    p.add_argument("--blocks", action="append", default=[], metavar="V1,...|PRESET|-",
                   help="block weights of the next LoRA in order (repeat per LoRA)")
    _common(p, None, "dtype of the output's float weights (default: each tensor keeps its own)")
    p.set_defaults(func=run_bake)


def _register_merge(lsub: argparse._SubParsersAction) -> None:
    p = lsub.add_parser("merge", help="merge LoRAs (exact concatenation, or SVD with --rank)",
                        description="Merge LoRA/LoCon files into one. Without --rank the files are concatenated along "
                                    "the rank (exact: the result is the sum of ratio x each LoRA); with --rank the "
                                    "sum is factored by SVD to that rank.",
                        epilog=RESIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loras", nargs="+", metavar="LORA[:RATIO]", help="LoRA files with optional ratios (default 1)")
    p.add_argument("--rank", type=int, help="SVD to this rank (default: exact concatenation)")
    _svd_options(p)
    _common(p, None, "output dtype (default: the first file's)")
    p.set_defaults(func=run_merge)


def _svd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convs (default: --rank)")
    p.add_argument("--dynamic", choices=DYNAMIC, help="choose each module's rank by this rule (see below)")
    p.add_argument("--param", type=float, help="the dynamic rule's parameter")
    p.add_argument("--clamp-quantile", type=float, help="clamp factors to this quantile (sd-scripts' svd_merge: 0.99)")


def _register_resize(lsub: argparse._SubParsersAction) -> None:
    p = lsub.add_parser("resize", help="change a LoRA's rank (fixed or dynamic), printing the energy kept",
                        description="Resize a LoRA/LoCon by SVD of each module's ΔW; alpha is set so the scale "
                                    "stays the same. Prints the share of each module's ΔW that is kept.",
                        epilog=RESIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lora", metavar="LORA", help="a LoRA/LoCon .safetensors file")
    p.add_argument("--rank", type=int, required=True, help="new rank (the maximum with --dynamic)")
    _svd_options(p)
    _common(p, None, "output dtype (default: the input's)")
    p.set_defaults(func=run_resize)


def _register_extract(lsub: argparse._SubParsersAction) -> None:
    p = lsub.add_parser("extract", help="extract a LoRA from two checkpoints",
                        description="Extract a LoRA approximating TUNED - BASE (two checkpoints of the same "
                                    "architecture) by SVD per layer, as sd-scripts' extract_lora_from_models.py.")
    p.add_argument("--base", required=True, metavar="B", help="the base checkpoint")
    p.add_argument("--tuned", required=True, metavar="T", help="the fine-tuned checkpoint")
    p.add_argument("--rank", type=int, required=True, help="rank of linear layers (and 1x1 convs)")
    p.add_argument("--conv-rank", type=int, help="rank of 3x3 convs (default: no ResNet/sampling layers)")
    p.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (1: off)")
    p.add_argument("--min-diff", type=float, default=0.01,
                   help="keep the text encoder(s) only if a weight differs by more than this (default 0.01)")
    p.add_argument("--svd", choices=("exact", "randomized"), default="exact",
                   help="exact SVD, or a randomized one (much faster, slightly less exact)")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for the SVDs (default: torch's; 1 is often faster when "
                                               "other programs keep the cores busy)")
    _common(p, "fp16", "output dtype (default fp16)")
    p.set_defaults(func=run_extract)


def _progress_bar(args: argparse.Namespace, desc: str) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """A tqdm bar on stderr when it is a terminal (and not --no-progress); returns (progress, close)."""
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=0, desc=desc, file=sys.stderr)

    def progress(done: int, total: int, info: str) -> None:
        if bar is not None:
            bar.total, bar.n = total, done
            bar.refresh()

    return progress, (bar.close if bar is not None else (lambda: None))


def _run(args: argparse.Namespace, desc: str, work: Callable) -> object:
    progress, close = _progress_bar(args, desc)
    try:
        return work(progress)
    finally:
        close()


def run_bake(args: argparse.Namespace) -> int:
    from ..errors import SdtuneError
    from ..merge.blocks import parse_blocks
    from ..merge.lora_bake import BakeConfig, LoraInput, bake_loras
    from ..merge.lora_common import parse_weighted
    from . import emit

    if len(args.blocks) > len(args.loras):
        raise SdtuneError(f"--blocks given {len(args.blocks)} times for {len(args.loras)} LoRAs; one per LoRA at most")
    blocks = [parse_blocks(b, "--blocks") for b in args.blocks] + [None] * (len(args.loras) - len(args.blocks))
    loras = tuple(LoraInput(*parse_weighted(spec), blocks=b) for spec, b in zip(args.loras, blocks))
    config = BakeConfig(args.checkpoint, loras, args.output, dtype=args.dtype, overwrite=args.overwrite)
    result = _run(args, "bake", lambda progress: bake_loras(config, progress=progress))
    lines = [f"wrote {result.output}",
             f"  {result.architecture}, {result.changed} of {result.tensors} tensors changed in {result.seconds:.1f} s"]
    for lora in loras:
        lines.append(f"  {lora.path} x{lora.strength:g}: {result.applied[lora.path]} modules baked")
        missing = result.unmatched.get(lora.path)
        if missing:
            lines.append(f"    {len(missing)} modules match no layer and were NOT baked: {', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''}")
    emit(result.to_dict(), args.json, "\n".join(lines))
    return 0


def _energy_lines(report: list) -> list[str]:
    """Per module: rank change and the share of ΔW kept (sum of singular values, Frobenius norm)."""
    lines = [f"  {'module':72} rank       sum(S) kept  fro kept  S_max/S_k"]
    for r in report:
        lines.append(f"  {r.name:72} {r.old_rank:>3} -> {r.new_rank:<3} {r.sum_retained:10.1%} {r.fro_retained:9.1%}"
                     f"  {r.max_ratio:9.1f}")
    if report:
        lines.append(f"  mean Frobenius norm kept: {sum(r.fro_retained for r in report) / len(report):.2%}")
    return lines


def run_merge(args: argparse.Namespace) -> int:
    from ..merge.lora_common import parse_weighted
    from ..merge.lora_merge import LoraMergeConfig, merge_loras
    from . import emit

    config = LoraMergeConfig(tuple(parse_weighted(s) for s in args.loras), args.output, rank=args.rank,
                             conv_rank=args.conv_rank, dynamic=args.dynamic, param=args.param,
                             clamp_quantile=args.clamp_quantile, dtype=args.dtype, overwrite=args.overwrite)
    result = _run(args, "merge", lambda progress: merge_loras(config, progress=progress))
    data = result.to_dict()
    rank = data["rank"] if isinstance(data["rank"], int) else "per module"
    lines = [f"wrote {result.output}", f"  {result.mode}: {result.modules} modules, rank {rank}, "
                                       f"{result.seconds:.1f} s"]
    emit(data, args.json, "\n".join(lines + (_energy_lines(result.report) if result.report else [])))
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from ..merge.lora_resize import ResizeConfig, resize_lora
    from . import emit

    config = ResizeConfig(args.lora, args.output, rank=args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                          param=args.param, clamp_quantile=args.clamp_quantile, dtype=args.dtype,
                          overwrite=args.overwrite)
    result = _run(args, "resize", lambda progress: resize_lora(config, progress=progress))
    lines = [f"wrote {result.output} ({len(result.modules)} modules, {result.seconds:.1f} s)"]
    emit(result.to_dict(), args.json, "\n".join(lines + _energy_lines(result.modules)))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from ..merge.lora_extract import ExtractConfig, extract_lora
    from . import emit

    config = ExtractConfig(args.base, args.tuned, args.output, rank=args.rank, conv_rank=args.conv_rank,
                           clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, svd=args.svd,
                           device=args.device, threads=args.threads, dtype=args.dtype, overwrite=args.overwrite)
    result = _run(args, "extract", lambda progress: extract_lora(config, progress=progress))
    te = (f"text encoder kept (max |diff| {result.te_max_diff:.4g})" if result.te_kept else
          f"text encoder unchanged (max |diff| {result.te_max_diff:.4g} <= {args.min_diff:g}): U-Net only")
    lines = [f"wrote {result.output}",
             f"  {result.architecture}, {result.te_modules} text-encoder and {result.unet_modules} U-Net modules, "
             f"{args.svd} SVD, {result.seconds:.1f} s",
             f"  {te}", f"  mean Frobenius norm of ΔW kept: {result.mean_fro_retained:.2%}"]
    emit(result.to_dict(), args.json, "\n".join(lines))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..networks.lora_info import format_lora_info, inspect_lora
    from . import emit

    info = inspect_lora(args.file)
    emit(info.to_dict(), args.json, format_lora_info(info))
    return 0
