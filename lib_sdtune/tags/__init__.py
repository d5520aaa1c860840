"""Dataset tag tools: caption store and batch edits (undo, backups), statistics, WD14 tagger, lint.

Entry points (plain functions over typed configs; nothing here imports onnxruntime until a tagger runs):

- `store.load_captions(root, LoadConfig)` -> `CaptionStore` (items: image, caption, tags, problems)
- `history.EditSession(store)`: `.apply(ops, where=EXPR)`, `.undo()`, `.redo()`; `edit_captions(EditConfig)`
  ops in `ops`: AddTag, RemoveTag, ReplaceTag, Dedupe, SortTags, Underscores, EscapeParens
- `expr.parse_expression(text)`: `blue hair AND NOT (hat OR "cap (headwear)")`
- `backup.list_backups / restore_backup / prune_backups` (`<dataset>/.sdtune_backups/captions-<time>/`)
- `stats.compute_stats(store)` / `tag_stats(StatsConfig)` -> `TagStats` (frequency, ss_tag_frequency, ...)
- `wd14.tag_dataset(Wd14Config, progress, cancelled)`; models: `wd14_model.find_models(model_roots(...))`,
  `open_model`, `download_model(repo_id, dest)` (only on an explicit user action)
- `lint.lint_dataset(LintConfig)` -> `LintReport`; `lint.fix_dataset(FixConfig)` -> `FixResult`
"""
