"""Generated demo assets: a tiny procedural dataset so `sdtune demo` and tests need no downloads."""
