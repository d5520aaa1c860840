"""Checkpoint merging, streamed: one tensor at a time from every input, combined, written atomically.

`merge_checkpoints(config, progress, cancelled)` is the core entry point the CLI and the faces call.
Everything that can be checked from the headers (architectures, shapes, ratios, block counts, the
VAE) is checked before the output is opened; a failure or a cancel leaves no output file.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..errors import SdtuneError
from ..io.detect import VAE_PREFIX, ArchInfo, detect_architecture
from ..io.safetensors_io import SafetensorsWriter, build_header, st_dtype_name
from .blocks import resolve_blocks
from .buffers import BufferPool
from .config import OUTPUT_DTYPES, MergeConfig, validate_config
from .methods import CHUNK, MergeMethod, get_method
from .pipeline import run_pipeline
from .plan import InputLayout, KeyPlan, PlanReport, Ratios, build_plan
from .recipe import ROLES, build_recipe, check_expected, placeholder_hashes, recipe_metadata, verify_hashes
from .sources import InputHashes, MergeInput, open_input, strip_vae_prefix

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class MergeResult:
    """What a merge wrote and how: the CLI prints it, faces show it."""

    output: Path
    architecture: str
    method: str
    tensors: int
    merged: int
    report: PlanReport
    input_hashes: list[InputHashes]
    bytes_read: int
    seconds: float
    recipe: dict = field(repr=False)

    def details(self) -> list[str]:
        """The merge for people, a line each: what was merged, then keys kept/dropped, VAE baked, pruning."""
        r = self.report
        lines = [f"{self.architecture}, {self.method}, {self.tensors} tensors ({self.merged} merged) in "
                 f"{self.seconds:.1f} s"]
        if r.kept_from_a:
            lines.append(f"{len(r.kept_from_a)} keys kept from A (missing in another input), e.g. {r.kept_from_a[0]}")
        if r.dropped:
            lines.append(f"{len(r.dropped)} keys dropped (only in B or C), e.g. {r.dropped[0]}")
        if r.vae_baked:
            lines.append(f"VAE baked in: {r.vae_baked} tensors")
        if r.pruned:
            lines.append(f"pruned: {len(r.pruned)} tensors")
        return lines

    def to_dict(self) -> dict:
        """JSON-ready summary (`output` first, as the CLI contract asks)."""
        r = self.report
        return {
            "output": str(self.output), "architecture": self.architecture, "method": self.method,
            "tensors": self.tensors, "merged": self.merged, "kept_from_a": r.kept_from_a, "dropped": r.dropped,
            "pruned": len(r.pruned), "position_ids": r.position_ids, "partial_channels": r.partial_channels,
            "vae_baked": r.vae_baked,
            "inputs": [dict(role=role, **asdict(h)) for role, h in zip(ROLES, self.input_hashes)],
            "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3),
        }


class _RecipeWriter(SafetensorsWriter):
    """SafetensorsWriter whose metadata is rewritten at the end, once the inputs' hashes are known.

    The header is first written with placeholder hashes of the final length; the final header
    takes exactly the same bytes (padded with spaces, which the safetensors format allows).
    """

    def rewrite_metadata(self, metadata: dict[str, str]) -> None:
        header, ranges, _ = build_header(self.specs, metadata)
        if ranges != self.ranges or len(header) > len(self.header):
            raise SdtuneError(f"{self.path}: internal error, the final header does not fit the reserved space")
        pad = len(self.header) - len(header)
        header = len(self.header[8:]).to_bytes(8, "little") + header[8:] + b" " * pad
        self._fh.seek(0)
        self._fh.write(header)
        self.header = header


def _check_architectures(infos: Sequence[ArchInfo], paths: Sequence[str]) -> str:
    """Refuse inputs of different families, naming both files; returns the family."""
    first = infos[0]
    for role, info, path in zip(ROLES[1:], infos[1:], paths[1:]):
        if info.family != first.family:
            raise SdtuneError(f"input {role} ({path}) is {info.architecture} but input A ({paths[0]}) is "
                              f"{first.architecture}; only checkpoints of the same architecture can be merged")
    return first.family


Computed = tuple[torch.Tensor, Optional[bytearray]]  # a result and the pooled buffer behind it, if any


def _compute(plan: KeyPlan, tensors: list[torch.Tensor], method: MergeMethod, seed: int,
             pool: Optional[BufferPool] = None) -> Computed:
    """The output tensor of one key from its input tensors (A first)."""
    if plan.action == "reset_ids":
        return torch.arange(plan.shape[-1], dtype=torch.int64).expand(plan.shape).contiguous(), None
    a = tensors[0]
    if plan.action in ("copy", "vae"):
        if plan.out_dtype is None or a.dtype == plan.out_dtype:
            return a, None
        out, buf = (pool or BufferPool(keep_bytes=0)).empty(plan.shape, plan.out_dtype)
        return out.copy_(a), buf
    if plan.channels is None:
        return _compute_chunked(plan, tensors, method, seed, pool or BufferPool(keep_bytes=0))
    floats = [t.float() for t in tensors]  # inpainting A (a small conv): the first channels are merged
    out = floats[0].clone()
    head = [floats[0][:, :plan.channels].contiguous(), *floats[1:]]
    out[:, :plan.channels] = method.apply(head, plan.alpha, plan.beta, seed, plan.name)
    return out.to(plan.out_dtype), None


def _compute_chunked(plan: KeyPlan, tensors: list[torch.Tensor], method: MergeMethod, seed: int,
                     pool: BufferPool) -> Computed:
    """A method over CHUNK entries at a time (after its whole-tensor stats): the float32 temporaries stay
    small and in cache, and the result is the same bits as the whole-tensor computation."""
    stats = method.prepare(tensors, plan.alpha, plan.beta)
    out, buf = pool.empty(plan.shape, plan.out_dtype)  # type: ignore[arg-type]
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in tensors]
    for i in range(0, flat_out.numel(), CHUNK):
        part = [f[i:i + CHUNK].float() for f in flats]
        flat_out[i:i + CHUNK].copy_(method.apply(part, plan.alpha, plan.beta, seed, plan.name, stats, offset=i))
    return out, buf


def _sources_of(plan: KeyPlan, n_inputs: int) -> list[int]:
    """Which inputs a key reads (-1: the VAE file)."""
    if plan.action == "reset_ids":
        return []
    if plan.action == "vae":
        return [-1]
    if plan.action == "copy":
        return [0]
    return list(range(n_inputs))


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Compute with one torch thread for the merge, then restore the caller's setting.

    A merge waits on the disk, not the CPU; one thread leaves a core to the reader and writer (on
    2 cores, OpenMP workers spinning beside them made merges 3x slower), and makes reductions
    (SLERP's norms) independent of the machine's core count, so recipes reproduce bit for bit.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_checkpoints(config: MergeConfig, progress: Optional[Progress] = None,
                      cancelled: Optional[Callable[[], bool]] = None, *, threaded: bool = True) -> MergeResult:
    """Merge the checkpoints of `config` into `config.output`; see MergeConfig for the settings."""
    validate_config(config)
    with _one_intra_op_thread():
        return _merge(config, progress, cancelled, threaded)


def _merge(config: MergeConfig, progress: Optional[Progress], cancelled: Optional[Callable[[], bool]],
           threaded: bool) -> MergeResult:
    """Check everything from the headers, then stream every key through the pipeline into the writer."""
    started = time.perf_counter()
    method = get_method(config.method)
    out_dtype = OUTPUT_DTYPES[config.dtype]
    inputs: list[MergeInput] = []
    vae: Optional[MergeInput] = None
    try:
        for i, (role, path) in enumerate(zip(ROLES, config.inputs)):
            if config.expected_inputs is not None:
                check_expected(f"input {role}", Path(path).resolve(), config.expected_inputs[i])
            inputs.append(open_input(path, f"input {role}", config.in_memory))
        layouts = [InputLayout(f"{role} ({inp.path})", inp.tensors) for role, inp in zip(ROLES, inputs)]
        infos = [detect_architecture({k: s for k, (_, s) in lay.tensors.items()}, what=f"input {role} ({inp.path})")
                 for role, lay, inp in zip(ROLES, layouts, inputs)]
        family = _check_architectures(infos, config.inputs)
        vae_map: Optional[dict[str, str]] = None
        if config.vae is not None:
            if config.expected_vae is not None:
                check_expected("vae", Path(config.vae).resolve(), config.expected_vae)
            vae = open_input(config.vae, "vae", config.in_memory)
            vae_map = strip_vae_prefix(vae.tensors, layouts[0].tensors, VAE_PREFIX)
            if not vae_map:
                raise SdtuneError(f"vae: {config.vae} has none of the VAE keys of input A (encoder.*, decoder.*, ... "
                                  f"in the original layout); is it a diffusers-format VAE or not a VAE at all?")
        alpha = Ratios(config.alpha, config.unet_alpha, config.te_alpha, config.vae_alpha,
                       resolve_blocks(config.blocks, family, "blocks"))
        beta = None
        if method.beta is not None:
            beta = Ratios(config.effective_beta, blocks=resolve_blocks(config.blocks_beta, family, "blocks_beta"))
        vae_keys = None if vae_map is None else {k: vae.tensors[v] for k, v in vae_map.items()}  # type: ignore[union-attr]
        plans, report = build_plan(layouts, family, alpha, beta, out_dtype, prune_ema=config.prune_ema,
                                   prune_schedule=config.prune_schedule, position_ids=config.position_ids,
                                   vae_keys=vae_keys, vae_label=f"vae ({config.vae})")
        for i, inp in enumerate(inputs):
            inp.check_order([p.name for p in plans if i in _sources_of(p, len(inputs))])
        if vae is not None and vae_map is not None:
            vae.check_order([vae_map[p.name] for p in plans if p.action == "vae"])
        a_dtypes = layouts[0].tensors
        specs = {p.name: (st_dtype_name(p.out_dtype or a_dtypes[p.name][0]), p.shape) for p in plans}
        variant = infos[0].variant
        sizes = [inp.size for inp in inputs]
        placeholders = placeholder_hashes(len(inputs), sizes)
        vae_placeholder = placeholder_hashes(1, [vae.size])[0] if vae is not None else None
        metas = [inp.metadata for inp in inputs]
        reserved = recipe_metadata(build_recipe(config, infos[0].architecture, placeholders, vae_placeholder),
                                   metas, variant)
        total = len(plans)

        pool = BufferPool()

        def fetch(plan: KeyPlan) -> list[tuple[torch.Tensor, Optional[bytearray]]]:
            return [vae.get(vae_map[plan.name], pool) if i == -1  # type: ignore[union-attr,index]
                    else inputs[i].get(plan.name, pool) for i in _sources_of(plan, len(inputs))]

        def compute(plan: KeyPlan, fetched: list[tuple[torch.Tensor, Optional[bytearray]]]) -> Computed:
            return _compute(plan, [t for t, _ in fetched], method, config.seed, pool)

        def recycle(plan: KeyPlan, fetched: list, computed: Computed) -> None:
            pool.release([b for _, b in fetched] + [computed[1]])

        def on_done(n: int, plan: KeyPlan) -> None:
            if progress is not None:
                progress(n, total, plan.name)

        with _RecipeWriter(config.output, specs, reserved) as writer:
            run_pipeline(plans, fetch, compute, lambda p, c: writer.write(p.name, c[0]), cancelled=cancelled,
                         on_done=on_done, after_write=recycle, threaded=threaded)
            hashes = [inp.finish() for inp in inputs]
            for i, (role, inp, h) in enumerate(zip(ROLES, inputs, hashes)):
                expected = config.expected_inputs[i] if config.expected_inputs is not None else None
                verify_hashes(f"input {role}", inp.path, expected, h)
            vae_hash = vae.finish() if vae is not None else None
            if vae is not None and vae_hash is not None:
                verify_hashes("vae", vae.path, config.expected_vae, vae_hash)
            recipe = build_recipe(config, infos[0].architecture, hashes, vae_hash)
            writer.rewrite_metadata(recipe_metadata(recipe, metas, variant))
        bytes_read = sum(inp.bytes_read for inp in inputs) + (vae.bytes_read if vae is not None else 0)
        merged = sum(1 for p in plans if p.action == "merge")
        for what, keys in (("kept from A (missing in another input)", report.kept_from_a),
                           ("dropped (only in B or C)", report.dropped)):
            if keys:
                log.warning("%d keys %s, e.g. %s", len(keys), what, keys[0])
        return MergeResult(Path(config.output), infos[0].architecture, config.method, total, merged, report,
                           hashes, bytes_read, time.perf_counter() - started, recipe)
    finally:
        for inp in inputs:
            inp.close()
        if vae is not None:
            vae.close()
