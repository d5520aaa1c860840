"""`repair ...`: text-encoder override/blend for checkpoints, LoRA TE surgery, over-fit diagnosis, epoch picker."""

from __future__ import annotations

import argparse

from .lora_cmd import _run

TE_CHOICES = ("1", "2", "both")
TE_HELP = "SDXL: which text encoder(s), 1 (CLIP-L), 2 (OpenCLIP bigG) or both (default)"
EPILOG = """An over-fitted model (tags stop working, odd details, thick lines) is usually repaired in one of these ways:
  te-override   its text encoder(s) replaced by a normal model's (the TE over-fits first)
  te-blend      its text encoder(s) mixed back toward a normal model's, at --alpha (per layer with --layers)
  lora-te       a LoRA's text-encoder part removed (--strip) or weakened (--scale), U-Net blocks scaled (LBW)
  merge back    the whole model toward its base (or another model): that is `merge` with weighted_sum, e.g.
                python -m lib_sdtune merge TUNED.safetensors BASE.safetensors --alpha 0.3 -o OUT.safetensors
                (--te-alpha / --unet-alpha / --blocks give per-part ratios; see `merge --help`)
  an earlier epoch: use the run's earlier file; `repair pick-epoch RUN_DIR --base B` ranks them
To find out which applies, `repair diagnose` compares the model (or LoRA) with its base, without generating images.

Every tool writes a new file (atomically) and never touches its inputs."""

DIAGNOSE_EPILOG = """What it measures (no image generation; a CPU is enough):
  text encoder  the dataset's tags (--dataset, else the file's ss_tag_frequency) and 12 neutral control prompts
                through the base and the tuned encoder(s) (SDXL: both): cosine per prompt (1 = unchanged),
                how much more alike different tags became (collapse), the most drifted tags
  U-Net         relative weight change |dW|/|W| per block (merge/LBW block names); for a LoRA also per module,
                its effective rank and the text-encoder share of the update
Each verdict prints its number, the threshold and the repair command. Thresholds and why they are what they
are: lib_sdtune/repair/diagnose_thresholds.py. With -o, REPORT_DIR gets report.json, report.txt, report.png."""

PICK_EPOCH_EPILOG = """How the epoch to keep is chosen:
  validation loss + --base  lowest validation loss among epochs whose diagnosis passes (ties within 1%: earliest)
  validation loss only      lowest validation loss (ties: earliest); drift is not measured
  --base only               the last epoch whose diagnosis still passes
  neither                   no pick: the training loss falls whether a run learns or over-fits
Validation loss comes from the trainer's <name>-log.json (train with validation_split > 0)."""

LBW_HELP = ("U-Net block weights of the LoRA: 17 (SD) or 12 (SDXL) values as the LoRA Block Weight extension "
            "writes them, 26 (BASE,IN00..IN11,MID,OUT00..OUT11) / 20 (SDXL), or a preset name; BASE multiplies the "
            "text-encoder part too")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="over-fit repair: TE override/blend, LoRA TE surgery, diagnosis, epoch picker",
                       description="Repair over-fitted checkpoints and LoRAs.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    rsub = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    _register_te(rsub, "te-override", "a checkpoint with another model's text encoder(s)",
                 "Write MODEL with the text encoder(s) of DONOR, copied bit for bit; every other tensor of MODEL is "
                 "copied bit for bit. Both must be the same architecture (SD1.x, SD2.x or SDXL).")
    _register_te(rsub, "te-blend", "a checkpoint whose text encoder(s) are mixed with another model's",
                 "Write MODEL with TE = (1-alpha)*MODEL.TE + alpha*DONOR.TE (position_ids never mixed); every "
                 "other tensor of MODEL is copied bit for bit.")
    _register_lora(rsub)
    _register_diagnose(rsub)
    _register_pick_epoch(rsub)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _register_te(rsub: argparse._SubParsersAction, name: str, help_text: str, description: str) -> None:
    p = rsub.add_parser(name, help=help_text, description=description)
    p.add_argument("--model", required=True, metavar="M", help="the checkpoint to repair")
    p.add_argument("--donor", required=True, metavar="D", help="the checkpoint whose text encoder(s) to use")
    if name == "te-blend":
        p.add_argument("--alpha", type=float, required=True, help="donor share: 0 keeps M's TE, 1 takes D's")
        p.add_argument("--layers", action="append", default=[], metavar="V1,...",
                       help="per-layer alphas of one encoder (12 CLIP-L, 23/24 SD2, 32 SDXL TE2); repeat per "
                            "encoder; keys outside the layers use --alpha")
    p.add_argument("--te", choices=TE_CHOICES, default="both", help=TE_HELP)
    p.add_argument("--position-ids", choices=("reset", "keep"), default="reset" if name == "te-override" else "keep",
                   help="CLIP position_ids: reset to 0..76 (int64) or keep M's exactly (default: "
                        f"{'reset' if name == 'te-override' else 'keep'})")
    _common(p)
    p.set_defaults(func=run_te)


def _register_lora(rsub: argparse._SubParsersAction) -> None:
    p = rsub.add_parser("lora-te", help="strip or scale a LoRA's text-encoder part, scale U-Net blocks",
                        description="Write a new LoRA/LyCORIS file with the text-encoder modules removed (--strip) "
                                    "or their update multiplied by X (--scale; alpha is kept), and optionally each "
                                    "U-Net block's update multiplied by its LBW value. sshs_* hashes are "
                                    "recomputed; the input file is never changed.")
    p.add_argument("--lora", required=True, metavar="L", help="the LoRA/LyCORIS .safetensors file")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--strip", action="store_true", help="remove the text-encoder modules")
    how.add_argument("--scale", type=float, metavar="X", help="multiply the text-encoder update by X")
    p.add_argument("--unet-blocks", metavar="LBW", help=LBW_HELP)
    p.add_argument("--te", choices=TE_CHOICES, default="both", help=TE_HELP)
    _common(p)
    p.set_defaults(func=run_lora_te)


def _register_diagnose(rsub: argparse._SubParsersAction) -> None:
    p = rsub.add_parser("diagnose", help="over-fit report of a checkpoint or LoRA against its base (JSON, text, PNG)",
                        description="Compare a tuned checkpoint (--model) or a LoRA/LyCORIS file (--lora) with its "
                                    "base model and say which over-fit symptoms show, by how much, and what repairs "
                                    "them.",
                        epilog=DIAGNOSE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", metavar="M", help="the tuned checkpoint")
    what.add_argument("--lora", metavar="L", help="a LoRA/LyCORIS .safetensors file")
    p.add_argument("--base", required=True, metavar="B", help="the checkpoint it was trained from")
    p.add_argument("--dataset", metavar="DIR", help="the dataset folder whose caption tags to test (default: the "
                                                    "file's ss_tag_frequency)")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength to judge it at (default 1)")
    p.add_argument("--max-tags", type=int, default=64, help="test at most this many most frequent tags (default 64)")
    p.add_argument("--device", help="where the text encoders run (default cpu)")
    p.add_argument("-o", "--output", metavar="REPORT_DIR", help="write report.json, report.txt, report.png here")
    p.add_argument("--overwrite", action="store_true", help="replace reports already in REPORT_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_diagnose)


def _register_pick_epoch(rsub: argparse._SubParsersAction) -> None:
    p = rsub.add_parser("pick-epoch", help="rank a run's epoch files and say which to keep",
                        description="Rank the epoch files of a training output folder (<name>-000001.safetensors "
                                    "..., <name>.safetensors, <name>-log.json) by validation loss and, with --base, "
                                    "by the over-fit diagnosis of each epoch; say which to keep and why.",
                        epilog=PICK_EPOCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the training output folder")
    p.add_argument("--base", metavar="B", help="the checkpoint the run trained on (measures each epoch's drift)")
    p.add_argument("--name", help="the run's output name, when the folder holds several runs")
    p.add_argument("--device", help="where the text encoders run (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_pick_epoch)


def _layers(texts: list[str]) -> tuple[tuple[float, ...], ...]:
    from ..errors import SdtuneError

    try:
        return tuple(tuple(float(v) for v in t.split(",") if v.strip()) for t in texts)
    except ValueError:
        raise SdtuneError(f"--layers: expected comma-separated numbers, got {texts!r}") from None


def run_te(args: argparse.Namespace) -> int:
    from ..repair import TeBlendConfig, TeOverrideConfig, blend_te, override_te
    from . import emit

    if args.subcommand == "te-override":
        config = TeOverrideConfig(args.model, args.donor, args.output, te=args.te, position_ids=args.position_ids,
                                  overwrite=args.overwrite)
        result = _run(args, "te-override", lambda progress: override_te(config, progress=progress))
    else:
        config = TeBlendConfig(args.model, args.donor, args.output, alpha=args.alpha, layers=_layers(args.layers),
                               te=args.te, position_ids=args.position_ids, overwrite=args.overwrite)
        result = _run(args, "te-blend", lambda progress: blend_te(config, progress=progress))
    how = "from the donor" if args.subcommand == "te-override" else f"blended at alpha {args.alpha:g}"
    lines = [f"wrote {result.output}",
             f"  {result.architecture}: text encoder {'+'.join(result.encoders)} {how} ({result.te_tensors} tensors), "
             f"{result.tensors - result.te_tensors} other tensors copied bit for bit, {result.seconds:.1f} s"]
    emit(result.to_dict(), args.json, "\n".join(lines))
    return 0


def run_lora_te(args: argparse.Namespace) -> int:
    from ..merge.blocks import parse_blocks
    from ..repair import LoraTeConfig, repair_lora_te
    from . import emit

    blocks = parse_blocks(args.unet_blocks, "--unet-blocks")
    config = LoraTeConfig(args.lora, args.output, strip=args.strip, scale=args.scale, unet_blocks=blocks, te=args.te,
                          overwrite=args.overwrite)
    result = _run(args, "lora-te", lambda progress: repair_lora_te(config, progress=progress))
    lines = [f"wrote {result.output}",
             f"  {result.te_modules} text-encoder modules: {result.stripped} stripped; {len(result.scaled)} modules "
             f"scaled, {result.seconds:.1f} s"]
    if result.unplaced:
        lines.append(f"  {len(result.unplaced)} U-Net modules are in no LBW block and were left as they were, e.g. "
                     f"{result.unplaced[0]}")
    emit(result.to_dict(), args.json, "\n".join(lines))
    return 0


def _report_dir(output: str, overwrite: bool):
    """The report folder, refused when it is a file or already holds a report (without --overwrite)."""
    from pathlib import Path

    from ..errors import SdtuneError
    from ..repair.diagnose_report import REPORT_FILES

    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise SdtuneError(f"output: {folder} is a file; -o names the folder the reports go into")
    present = [n for n in REPORT_FILES if (folder / n).exists()]
    if present and not overwrite:
        raise SdtuneError(f"output: {folder} already holds {present[0]}; choose another folder or pass --overwrite "
                          f"to replace the reports")
    return folder


def run_diagnose(args: argparse.Namespace) -> int:
    from ..repair.diagnose import DiagnoseConfig, diagnose
    from . import emit

    folder = _report_dir(args.output, args.overwrite) if args.output else None
    config = DiagnoseConfig(args.base, model=args.model, lora=args.lora, dataset=args.dataset,
                            lora_strength=args.strength, max_tags=args.max_tags, device=args.device)
    report = _run(args, "diagnose", lambda progress: diagnose(config, progress=progress))
    result = report.to_dict()
    text = report.format_text()
    if folder is not None:
        paths = report.write(folder)
        result = {"output": str(folder), "files": [str(p) for p in paths], **result}
        text += f"wrote {', '.join(str(p) for p in paths)}\n"
    emit(result, args.json, text)
    return 0


def run_pick_epoch(args: argparse.Namespace) -> int:
    from ..repair.epochs import pick_epoch
    from . import emit

    ranking = _run(args, "pick-epoch", lambda progress: pick_epoch(args.run_dir, args.base, progress=progress,
                                                                    name=args.name, device=args.device))
    emit(ranking.to_dict(), args.json, ranking.format_text())
    return 0
