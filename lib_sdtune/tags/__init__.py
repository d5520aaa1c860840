"""Dataset tag tools: caption store and batch edits (undo, backups), statistics, WD14 tagger, lint.

Entry points are plain functions over typed configs; see `store`, `ops`, `history`, `stats`,
`wd14` and `lint`. Nothing here imports onnxruntime until a tagger is used.
"""
