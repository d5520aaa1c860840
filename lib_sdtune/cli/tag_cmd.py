"""`tag stats | edit | restore | wd14 | lint`: caption statistics, batch edits, WD14 tagging, dataset lint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _OpAction(argparse.Action):
    """Collect edit operations in command-line order (`--remove a --add b` runs remove first)."""

    def __call__(self, parser, namespace, values, option_string=None):
        ops = list(getattr(namespace, "ops", None) or [])
        ops.append((self.dest, values))
        namespace.ops = ops


def _dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", type=Path, help="dataset folder (searched recursively)")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension (default .txt)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def register(sub: argparse._SubParsersAction) -> None:
    tag = sub.add_parser("tag", help="caption statistics, batch edits, WD14 tagging, dataset lint",
                         description="Dataset tag tools: statistics, batch caption edits (atomic, backed up, "
                                     "restorable), WD14 ONNX tagging and dataset lint.")
    tsub = tag.add_subparsers(dest="tag_command", metavar="SUBCOMMAND", required=True)

    st = tsub.add_parser("stats", help="tag frequency and caption statistics",
                         description="Tag frequency (images per tag), sd-scripts' ss_tag_frequency, tags per image, "
                                     "images without captions, empty or unreadable captions, and tags on every "
                                     "captioned image (trigger-word candidates).")
    _dataset(st)
    st.add_argument("--top", type=int, default=30, help="tags listed in the text output (default 30)")
    st.set_defaults(func=run_stats)

    ed = tsub.add_parser(
        "edit", help="batch edit captions (atomic, backed up)",
        description="Batch edit the captions of the images matching --where (all by default). Operations run in "
                    "the order given. The captions changed are first saved to DATASET/.sdtune_backups/"
                    "captions-<time>/ (hard links, no copying); `tag restore` puts them back. Expressions: "
                    "blue hair AND NOT (hat OR \"cap (headwear)\"), with OR, NOT, parentheses, quotes and * "
                    "wildcards.")
    _dataset(ed)
    ops = [("--add", "add", "T", "add tag T at the front (a trigger word; moved there if present)"),
           ("--append", "append", "T", "add tag T at the end (unless present)"),
           ("--remove", "remove", "T", "remove tag T"),
           ("--remove-regex", "remove_regex", "RX", "remove tags that the regular expression fully matches"),
           ("--replace", "replace", "OLD=NEW", "replace tag OLD by NEW (NEW may hold several tags, or be empty)"),
           ("--replace-regex", "replace_regex", "RX=NEW", "re.sub on every tag (\\1 for groups)"),
           ("--sort", "sort", "alpha|frequency", "sort tags (after --keep-first fixed ones)"),
           ("--underscores", "underscores", "spaces|underscores", "long_hair -> long hair (kaomojis kept), or back")]
    for flag, dest, metavar, help_text in ops:
        ed.add_argument(flag, dest=dest, metavar=metavar, action=_OpAction, help=help_text)
    for flag, dest, help_text in (("--dedupe", "dedupe", "drop repeated tags"),
                                  ("--escape-parens", "escape", "( ) -> \\( \\) for A1111 prompts"),
                                  ("--unescape-parens", "unescape", "\\( \\) -> ( )")):
        ed.add_argument(flag, dest=dest, nargs=0, action=_OpAction, help=help_text)
    ed.add_argument("--keep-first", type=int, default=0, metavar="N", help="--sort leaves the first N tags in place")
    ed.add_argument("--where", metavar="EXPR", help="only images whose tags match this expression")
    ed.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    ed.add_argument("--no-backup", action="store_true", help="do not save the changed captions first")
    ed.set_defaults(func=run_edit, ops=None)

    rs = tsub.add_parser("restore", help="put back captions from a backup",
                         description="Restore the captions saved in DATASET/.sdtune_backups (the newest backup unless "
                                     "--backup names one). The captions it replaces are backed up first.")
    _dataset(rs)
    rs.add_argument("--backup", type=Path, help="backup folder to restore (default: the newest)")
    rs.set_defaults(caption_ext=None)
    rs.add_argument("--list", action="store_true", help="list the backups instead")
    rs.add_argument("--prune", type=int, metavar="KEEP", help="delete all but the newest KEEP backups instead")
    rs.set_defaults(func=run_restore)

    wd = tsub.add_parser(
        "wd14", help="tag images with a WD14 ONNX tagger",
        description="Tag every image with a WD14 tagger folder (model.onnx + selected_tags.csv, SmilingWolf "
                    "v1.4/v2/v3) using the reference preprocessing. New tags are appended to existing captions by "
                    "default; changed captions are backed up first. Nothing is downloaded unless --download "
                    "names a repo.")
    _dataset(wd)
    wd.add_argument("--model-dir", type=Path, metavar="DIR",
                    help="tagger folder, or a folder holding tagger folders (the only one found is used)")
    wd.add_argument("--download", metavar="REPO_ID",
                    help="first download this Hugging Face repo (e.g. SmilingWolf/wd-swinv2-tagger-v3) into "
                         "--model-dir; needs HF_HUB_OFFLINE=0")
    wd.add_argument("--threshold", type=float, default=0.35, help="general tag threshold (default 0.35)")
    wd.add_argument("--character-threshold", type=float, default=0.85, help="character tag threshold (default 0.85)")
    wd.add_argument("--mcut", action="store_true", help="MCut threshold for general tags instead of --threshold")
    wd.add_argument("--character-mcut", action="store_true", help="MCut for character tags (floored at 0.15)")
    wd.add_argument("--exclude", default="", metavar="T1,T2", help="comma-separated tags never to write")
    wd.add_argument("--mode", choices=("append", "prepend", "overwrite", "skip"), default="append",
                    help="what to do with existing captions (skip: leave captioned images alone)")
    wd.add_argument("--keep-underscores", action="store_true", help="write long_hair, not long hair")
    wd.add_argument("--escape-parens", action="store_true", help="write \\( \\) (for captions used as A1111 prompts)")
    wd.add_argument("--rating", action="store_true", help="put the most likely rating tag first")
    wd.add_argument("--max-tags", type=int, default=0, help="keep at most N general tags (0: no limit)")
    wd.add_argument("--batch-size", type=int, default=8)
    wd.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    wd.add_argument("--dry-run", action="store_true", help="print the tags, write nothing")
    wd.set_defaults(func=run_wd14)

    li = tsub.add_parser(
        "lint", help="dataset problems and fixes",
        description="Find unreadable, transparent, tiny, extreme-aspect and near-duplicate images, missing, empty, "
                    "non-UTF-8, BOM and multi-line captions. --fix -o OUT writes a fixed copy (transparent images "
                    "flattened on white, unreadable images and near-duplicates left out, captions cleaned); "
                    "--fix --in-place fixes the dataset after moving each original to DATASET/.sdtune_backups/.")
    _dataset(li)
    li.add_argument("--resolution", type=int, default=512, help="training resolution (default 512; SDXL 1024)")
    li.add_argument("--max-aspect", type=float, default=3.0, help="aspect ratio flagged beyond this (default 3)")
    li.add_argument("--duplicate-distance", type=int, default=4, help="dHash bits that may differ (default 4)")
    li.add_argument("--fix", action="store_true", help="apply fixes (with -o OUT or --in-place)")
    li.add_argument("-o", "--output", type=Path, help="folder for the fixed copy (new or empty)")
    li.add_argument("--in-place", action="store_true", help="fix the dataset itself, originals moved to a backup")
    li.add_argument("--keep-duplicates", action="store_true", help="do not drop near-duplicates when fixing")
    li.add_argument("--drop-tiny", action="store_true", help="also drop tiny images when fixing")
    li.add_argument("--drop-aspect", action="store_true", help="also drop extreme aspect ratios when fixing")
    li.set_defaults(func=run_lint)


def run_stats(args: argparse.Namespace) -> int:
    from ..tags.stats import StatsConfig, tag_stats
    from . import emit

    stats = tag_stats(StatsConfig(args.dataset, args.caption_ext))
    lines = [f"{stats.root}: {stats.images} images, {stats.captioned} captioned, {len(stats.frequency)} unique tags "
             f"(loaded in {stats.load_seconds:.2f} s)",
             "tags per image: " + ", ".join(f"{k} {v}" for k, v in stats.tags_per_image.items()),
             "on every captioned image (trigger-word candidates): " + (", ".join(stats.on_every_image) or "none")]
    for what, paths in (("without caption", stats.without_caption), ("empty caption", stats.empty_captions),
                        ("caption without image", stats.orphan_captions)):
        if paths:
            lines.append(f"{what}: {len(paths)} (first: {paths[0]})")
    for path, error in stats.unreadable_captions:
        lines.append(f"unreadable caption: {path}: {error}")
    lines.append(f"top {min(args.top, len(stats.frequency))} tags (images):")
    lines += [f"  {n:6d}  {t}" for t, n in stats.frequency[:args.top]]
    emit(stats.to_dict(), args.json, "\n".join(lines))
    return 0


def _ops_from_args(args: argparse.Namespace) -> tuple:
    from ..errors import SdtuneError
    from ..tags import ops as o

    def pair(value: str, flag: str) -> tuple[str, str]:
        if "=" not in value:
            raise SdtuneError(f"{flag} {value!r}: write it as OLD=NEW (NEW may be empty to remove OLD)")
        old, new = value.split("=", 1)
        return old.strip() if flag == "--replace" else old, new.strip() if flag == "--replace" else new

    built = []
    for dest, value in args.ops or ():
        if dest == "add":
            built.append(o.AddTag(value.strip(), "front"))
        elif dest == "append":
            built.append(o.AddTag(value.strip(), "end"))
        elif dest == "remove":
            built.append(o.RemoveTag(value.strip()))
        elif dest == "remove_regex":
            built.append(o.RemoveTag(value, regex=True))
        elif dest == "replace":
            built.append(o.ReplaceTag(*pair(value, "--replace")))
        elif dest == "replace_regex":
            built.append(o.ReplaceTag(*pair(value, "--replace-regex"), regex=True))
        elif dest == "sort":
            built.append(o.SortTags(value, args.keep_first))
        elif dest == "underscores":
            built.append(o.Underscores(value))
        elif dest == "dedupe":
            built.append(o.Dedupe())
        elif dest in ("escape", "unescape"):
            built.append(o.EscapeParens(unescape=dest == "unescape"))
    if not built:
        raise SdtuneError("tag edit: give at least one operation (--add, --append, --remove, --replace, "
                          "--remove-regex, --replace-regex, --dedupe, --sort, --underscores, --escape-parens)")
    return tuple(built)


def run_edit(args: argparse.Namespace) -> int:
    from ..tags.history import EditConfig, edit_captions
    from . import emit

    preview: dict = {} if args.dry_run else None
    result = edit_captions(EditConfig(args.dataset, _ops_from_args(args), args.where, args.caption_ext,
                                      backup=not args.no_backup, dry_run=args.dry_run), preview)
    verb = "would change" if result.dry_run else "changed"
    human = [f"{result.selected} images selected, {verb} {len(result.changed)} captions in {result.seconds:.2f} s"]
    for path, (old, new) in list((preview or {}).items())[:10]:
        human += [f"{path}:", f"  - {', '.join(old)}", f"  + {', '.join(new)}"]
    if preview and len(preview) > 10:
        human.append(f"... and {len(preview) - 10} more")
    if result.backup:
        human.append(f"originals saved to {result.backup} (undo with: tag restore {args.dataset})")
    if result.skipped_unreadable:
        human.append(f"skipped {len(result.skipped_unreadable)} unreadable caption(s), first: "
                     f"{result.skipped_unreadable[0]}")
    emit(result.to_dict(), args.json, "\n".join(human))
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from ..tags.backup import list_backups, prune_backups, restore_backup
    from ..tags.store import LoadConfig
    from . import emit

    if args.prune is not None:
        gone = prune_backups(args.dataset, args.prune)
        emit({"deleted": [str(p) for p in gone]}, args.json, f"deleted {len(gone)} backup(s)")
        return 0
    if args.list:
        found = list_backups(args.dataset)
        emit({"backups": [str(p) for p in found]}, args.json, "\n".join(map(str, found)) or "no backups")
        return 0
    r = restore_backup(args.dataset, args.backup, LoadConfig(args.caption_ext) if args.caption_ext else None)
    emit({"restored": [str(p) for p in r.restored], "deleted": [str(p) for p in r.deleted],
          "output": str(r.backup) if r.backup else None}, args.json,
         f"restored {len(r.restored)} caption(s), deleted {len(r.deleted)}; the replaced ones are in {r.backup}")
    return 0


def _model_dir(args: argparse.Namespace) -> Path:
    from ..errors import SdtuneError
    from ..tags.wd14_model import download_model, find_models, is_model_dir, model_roots

    if args.download:
        if args.model_dir is None:
            raise SdtuneError("--download needs --model-dir: the folder to download the tagger into")
        sys.stderr.write(f"downloading the WD14 tagger {args.download} from huggingface.co into {args.model_dir}\n")
        return download_model(args.download, args.model_dir)
    if args.model_dir is not None and is_model_dir(args.model_dir):
        return args.model_dir
    roots = model_roots([args.model_dir] if args.model_dir is not None else [])
    found = find_models(roots)
    if len(found) == 1:
        return found[0]
    where = ", ".join(str(r) for r in roots) or "(no folder given)"
    if not found:
        raise SdtuneError(f"no WD14 tagger (model.onnx + selected_tags.csv) in {where}. Give --model-dir DIR, set "
                          f"SDTUNE_TAGGER_DIR, or download one: --download SmilingWolf/wd-swinv2-tagger-v3 "
                          f"--model-dir DIR (with HF_HUB_OFFLINE=0)")
    raise SdtuneError(f"several taggers in {where}: " + ", ".join(map(str, found)) + ". Pick one with --model-dir")


def run_wd14(args: argparse.Namespace) -> int:
    from ..tags.wd14 import Wd14Config, tag_dataset
    from . import emit

    cfg = Wd14Config(args.dataset, _model_dir(args), args.threshold, args.character_threshold, args.mcut,
                     args.character_mcut, tuple(t.strip() for t in args.exclude.split(",") if t.strip()),
                     not args.keep_underscores, args.escape_parens, args.mode, args.rating, args.max_tags,
                     args.batch_size, device=args.device, caption_extension=args.caption_ext, dry_run=args.dry_run)
    r = tag_dataset(cfg, progress=None if args.json else progress_printer("wd14"))
    lines = [f"{len(r.images)} images tagged in {r.seconds:.1f} s, {len(r.written)} captions written"]
    if args.dry_run:
        lines += [f"{it.image}: {', '.join(it.tags)}" for it in r.images if not it.error]
    if r.backup:
        lines.append(f"originals saved to {r.backup} (undo with: tag restore {args.dataset})")
    lines += [f"skipped {p}: {e}" for p, e in r.errors]
    emit(r.to_dict(), args.json, "\n".join(lines))
    return 0


def run_lint(args: argparse.Namespace) -> int:
    from ..errors import SdtuneError
    from ..tags.lint import FixConfig, LintConfig, fix_dataset, lint_dataset
    from . import emit

    lc = LintConfig(args.dataset, args.caption_ext, args.resolution, args.max_aspect, args.duplicate_distance)
    if not args.fix:
        if args.output or args.in_place:
            raise SdtuneError("-o/--in-place only apply with --fix")
        report = lint_dataset(lc)
        lines = [f"{report.images} images checked in {report.seconds:.1f} s",
                 *report.summary_lines(20, more=" (--json lists all)")]
        emit(report.to_dict(), args.json, "\n".join(lines))
        return 0
    r = fix_dataset(FixConfig(lc, args.output, args.in_place, drop_duplicates=not args.keep_duplicates,
                              drop_tiny=args.drop_tiny, drop_extreme_aspect=args.drop_aspect))
    lines = [f"{r.copied} images kept in {r.output}; {len(r.flattened)} flattened, {len(r.dropped)} dropped, "
             f"{len(r.captions_fixed)} captions cleaned"]
    lines += [f"  dropped {p}: {why}" for p, why in r.dropped]
    if r.backup:
        lines.append(f"originals of everything changed or dropped: {r.backup}")
    emit(r.to_dict(), args.json, "\n".join(lines))
    return 0


def progress_printer(label: str):
    """A progress(done, total, info) callback drawing a tqdm bar on stderr (plain lines without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    state: dict = {}

    def progress(done: int, total: int, info: str = "") -> None:
        if tqdm is None:
            sys.stderr.write(f"{label}: {done}/{total} {info}\n")
            return
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=label, file=sys.stderr, unit="img")
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress
