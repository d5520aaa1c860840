"""Every merge method equals its formula computed directly with torch on the same tiny real-layout tensors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lib_sdtune.io.safetensors_io import SafetensorsFile, save_safetensors
from lib_sdtune.merge import METHODS, MergeConfig, merge_checkpoints
from lib_sdtune.merge.methods import CHUNK, dare_mask, keep_top_fraction

ALPHA, BETA = 0.3, 0.4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core box: one intra-op thread is much faster (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_variant(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """A copy of a tiny checkpoint with every float weight moved by seeded noise (fp16-exact values)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with SafetensorsFile(src) as sf:
        for name in sf.keys():
            t = sf.get_tensor(name)
            if t.is_floating_point() and "model" in name:
                t = (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype)
            out[name] = t
    return save_safetensors(out, dst)


@pytest.fixture(scope="module")
def trio(tiny_checkpoints, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A (the tiny SD1 checkpoint), B and C (seeded variants of it), all fp16."""
    folder = tmp_path_factory.mktemp("merge_trio")
    a = tiny_checkpoints["sd1"]
    return a, make_variant(a, folder / "b.safetensors", 1), make_variant(a, folder / "c.safetensors", 2)


def load(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}


def ties_formula(a, b, c, alpha, density):
    """TIES written out step by step: trim, elect sign, disjoint mean."""
    def trim(d):
        k = max(1, math.ceil(density * d.numel()))
        if k >= d.numel():
            return d
        thr = d.abs().flatten().sort().values[d.numel() - k]
        return torch.where(d.abs() >= thr, d, torch.zeros_like(d))

    da, db = trim(a - c), trim(b - c)
    sign = torch.sign(da + db)
    ma = (torch.sign(da) == sign) & (da != 0)
    mb = (torch.sign(db) == sign) & (db != 0)
    total = torch.where(ma, da, 0.0) + torch.where(mb, db, 0.0)
    count = ma.float() + mb.float()
    return c + alpha * (total / count.clamp(min=1))


def slerp_formula(a, b, t):
    """Slerp in float64 (acos of a dot product near 1 needs it), returned as float32."""
    return _slerp64(a.double(), b.double(), t).float()


def _slerp64(a, b, t):
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1, 1))
    if na == 0 or nb == 0 or torch.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (ua * torch.sin((1 - t) * omega) + ub * torch.sin(t * omega)) / torch.sin(omega) * ((1 - t) * na + t * nb)


def formula(method: str, a, b, c, key: str, seed: int):
    """The documented formula of each method, on float32 tensors."""
    if method == "weighted_sum":
        return (1 - ALPHA) * a + ALPHA * b
    if method == "add_difference":
        return a + ALPHA * (b - c)
    if method == "triple_sum":
        return (1 - ALPHA - BETA) * a + ALPHA * b + BETA * c
    if method == "sum_twice":
        return (1 - BETA) * ((1 - ALPHA) * a + ALPHA * b) + BETA * c
    if method == "train_difference":  # supermerger's traindiff, verbatim
        diff = b - c
        d0, d1 = torch.abs(b - c), torch.abs(b - a)
        total = d0 + d1
        scale = torch.where(total != 0, d1 / total, torch.tensor(0.0))
        scale = torch.sign(b - c) * torch.abs(scale)
        return a + (scale * torch.abs(diff)) * (ALPHA * 1.8)
    if method == "ties":
        return ties_formula(a, b, c, ALPHA, BETA)
    if method == "dare":
        mask = dare_mask(a.numel(), BETA, seed, key).view(a.shape)
        return a + ALPHA * ((b - c) * mask / (1 - BETA))
    if method == "slerp":
        return slerp_formula(a, b, ALPHA)
    raise AssertionError(method)


# elementwise methods must match to the bit; the reductions (norms, sums, k-th values) to float32 rounding
EXACT = {"weighted_sum", "add_difference", "triple_sum", "sum_twice", "train_difference", "dare"}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_matches_its_formula_on_every_weight(method, trio, tmp_path):
    a_path, b_path, c_path = trio
    inputs = (a_path, b_path) if METHODS[method].models == 2 else (a_path, b_path, c_path)
    beta = BETA if METHODS[method].beta is not None else None
    out = tmp_path / f"{method}.safetensors"
    result = merge_checkpoints(MergeConfig(tuple(map(str, inputs)), str(out), method=method, alpha=ALPHA, beta=beta,
                                           seed=7, dtype="fp32"))
    merged, a, b, c = load(out), load(a_path), load(b_path), load(c_path)
    assert result.merged == sum(1 for k, t in a.items() if t.is_floating_point() and "model" in k
                                and not k.endswith("position_ids"))
    checked = 0
    for key, t in merged.items():
        if not (a[key].is_floating_point() and "model" in key):
            continue
        expected = formula(method, a[key].float(), b[key].float(), c[key].float(), key, 7)
        if method in EXACT:
            assert torch.equal(t, expected), key
        else:
            torch.testing.assert_close(t, expected, rtol=2e-5, atol=2e-6, msg=key)
        checked += 1
    assert checked == result.merged > 1000


def test_fp16_output_is_the_formula_rounded_once(trio, tmp_path):
    a_path, b_path, _ = trio
    out = tmp_path / "ws16.safetensors"
    merge_checkpoints(MergeConfig((str(a_path), str(b_path)), str(out), alpha=ALPHA, dtype="fp16"))
    merged, a, b = load(out), load(a_path), load(b_path)
    for key in ("model.diffusion_model.input_blocks.1.1.proj_in.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert merged[key].dtype == torch.float16
        assert torch.equal(merged[key], ((1 - ALPHA) * a[key].float() + ALPHA * b[key].float()).half())


def test_dare_is_reproducible_by_seed_and_drops_the_asked_fraction(trio, tmp_path):
    a, b, c = map(str, trio)
    paths = [tmp_path / f"dare{i}.safetensors" for i in range(3)]
    for path, seed in zip(paths, (1, 1, 2)):
        merge_checkpoints(MergeConfig((a, b, c), str(path), method="dare", alpha=1.0, beta=0.5, seed=seed,
                                      dtype="fp32"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    m1, m2 = load(paths[0])[key], load(paths[2])[key]
    assert not torch.equal(m1, m2)
    mask = dare_mask(m1.numel(), 0.5, 1, key).view(m1.shape)
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    assert torch.equal(m1[~mask], load(Path(a))[key].float()[~mask])  # dropped entries keep A


def test_keep_top_fraction_keeps_the_largest_magnitudes():
    d = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, -1.0, 0.05, 3.0])
    kept = keep_top_fraction(d, 0.3)
    assert torch.equal(kept, torch.tensor([0, -5.0, 0, 0, 0, 0, 4.0, 0, 0, 3.0]))
    assert torch.equal(keep_top_fraction(d, 1.0), d)


def test_methods_never_change_their_inputs():
    a, b, c = (torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    copies = [t.clone() for t in (a, b, c)]
    for m in METHODS.values():
        m.apply([a, b, c][:m.models], 0.4, 0.3 if m.beta else None, 0, "k")
        assert all(torch.equal(x, y) for x, y in zip((a, b, c), copies)), m.name


def test_dare_mask_is_the_same_however_the_tensor_is_split():
    whole = dare_mask(3 * CHUNK + 123, 0.3, 5, "k")
    parts = torch.cat([dare_mask(1000, 0.3, 5, "k"), dare_mask(CHUNK * 2, 0.3, 5, "k", offset=1000),
                       dare_mask(CHUNK + 123 - 1000, 0.3, 5, "k", offset=1000 + 2 * CHUNK)])
    assert torch.equal(whole, parts) and not torch.equal(whole, dare_mask(3 * CHUNK + 123, 0.3, 6, "k"))


def test_slerp_and_ties_statistics_are_whole_tensor_even_when_applied_in_chunks():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(5 * CHUNK + 7, generator=gen) for _ in range(3))
    for name, tensors in (("slerp", [a, b]), ("ties", [a, b, c])):
        m = METHODS[name]
        beta = 0.3 if m.beta else None
        whole = m.apply(tensors, 0.4, beta, 0, "k")
        stats = m.prepare(tensors, 0.4, beta)
        pieces = torch.cat([m.apply([t[i:i + CHUNK] for t in tensors], 0.4, beta, 0, "k", stats, offset=i)
                            for i in range(0, a.numel(), CHUNK)])
        assert torch.equal(whole, pieces), name
    torch.testing.assert_close(METHODS["slerp"].apply([a, b], 0.4, None, 0, "k"), slerp_formula(a, b, 0.4),
                               rtol=1e-5, atol=1e-6)
