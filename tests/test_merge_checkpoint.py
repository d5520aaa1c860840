"""Checkpoint merges end to end: recipes reproduce bit for bit, streaming equals in-memory, inputs are read
once, architectures must match, position_ids stay exact, cancelling leaves nothing, errors name the field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_sdtune.errors import SdtuneError
from lib_sdtune.io.hashes import file_sha256
from lib_sdtune.io.safetensors_io import SafetensorsFile, read_header, save_safetensors
from lib_sdtune.merge import RECIPE_KEY, MergeCancelled, MergeConfig, merge_checkpoints

ROOT = Path(__file__).resolve().parents[1]
IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small tensors on a shared 2-core box: one intra-op thread is much faster (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as sf:
        return {k: sf.get_tensor(k) for k in sf.keys()}


def variant(src: Path, dst: Path, seed: int, edit=None) -> Path:
    """A seeded variant of a checkpoint; `edit(tensors)` may add, drop or change keys."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: (t.float() + 0.05 * torch.randn(t.shape, generator=gen)).to(t.dtype)
               if t.is_floating_point() and "model" in k else t for k, t in load(src).items()}
    if edit is not None:
        edit(tensors)
    return save_safetensors(tensors, dst)


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny SD1 checkpoint (A) and seeded variants B, C in one folder of their own."""
    folder = tmp_path_factory.mktemp("merge_models")
    a = Path(shutil.copy(tiny_checkpoints["sd1"], folder / "a.safetensors"))
    return {"A": a, "B": variant(a, folder / "b.safetensors", 1), "C": variant(a, folder / "c.safetensors", 2)}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_sdtune", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_recipe_rerun_reproduces_the_file_bit_for_bit(models, tmp_path):
    a, b, c = (str(models[k]) for k in "ABC")
    first = tmp_path / "first.safetensors"
    result = merge_checkpoints(MergeConfig((a, b, c), str(first), method="dare", alpha=0.8, beta=0.3, seed=11,
                                           blocks="GRAD_V", te_alpha=0.2, dtype="bf16", prune_schedule=True))
    meta = read_header(first)[1]
    recipe = json.loads(meta[RECIPE_KEY])
    assert [i["sha256"] for i in recipe["inputs"]] == [file_sha256(p) for p in (a, b, c)]
    assert [h.sha256 for h in result.input_hashes] == [i["sha256"] for i in recipe["inputs"]]
    assert recipe["method"] == "dare" and recipe["seed"] == 11 and recipe["blocks"] == "GRAD_V"
    assert json.loads(meta["sd_merge_recipe"])["primary_model_hash"] == file_sha256(a)
    assert set(json.loads(meta["sd_merge_models"])) == {file_sha256(p) for p in (a, b, c)}

    again = tmp_path / "again.safetensors"
    out = cli("merge", "--recipe", first, "-o", again, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["output"] == str(again)
    assert again.read_bytes() == first.read_bytes()


def test_recipe_rerun_refuses_missing_or_changed_inputs(models, tmp_path):
    a = Path(shutil.copy(models["A"], tmp_path / "a.safetensors"))
    b = Path(shutil.copy(models["B"], tmp_path / "b.safetensors"))
    merged = tmp_path / "merged.safetensors"
    merge_checkpoints(MergeConfig((str(a), str(b)), str(merged)))

    data = bytearray(b.read_bytes())  # same size, same legacy-hash window: only the sha256 can tell
    data[-2] ^= 0x01
    b.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    with pytest.raises(SdtuneError, match=r"input B: .*b\.safetensors has sha256 .* but the recipe recorded"):
        from lib_sdtune.merge import config_from_recipe, load_recipe
        merge_checkpoints(config_from_recipe(load_recipe(merged), out))
    assert not out.exists()

    b.unlink()
    res = cli("merge", "--recipe", merged, "-o", out)
    assert res.returncode == 1 and "input B" in res.stderr and "is missing" in res.stderr and "sha256" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["weighted_sum", "add_difference", "slerp"])
def test_streaming_and_in_memory_write_identical_bytes(models, tmp_path, method):
    inputs = tuple(str(models[k]) for k in ("AB" if method != "add_difference" else "ABC"))
    paths = []
    for in_memory in (False, True):
        path = tmp_path / f"{in_memory}.safetensors"
        merge_checkpoints(MergeConfig(inputs, str(path), method=method, alpha=0.35, blocks="COSINE", dtype="fp16",
                                      in_memory=in_memory), threaded=not in_memory)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_inputs_are_read_once_and_hashed_on_the_way(models, tmp_path):
    def edit(t):
        del t[TOKENS]  # B lacks a key A has: its bytes sit in no request, the hash must still cover them
        t["model.extra_only_in_b.weight"] = torch.ones(3)
    b = variant(models["A"], tmp_path / "b_edit.safetensors", 3, edit)
    out = tmp_path / "out.safetensors"
    r = merge_checkpoints(MergeConfig((str(models["A"]), str(b)), str(out), alpha=0.5))
    sizes = [models["A"].stat().st_size, b.stat().st_size]
    headers = [read_header(p)[2] for p in (models["A"], b)]
    assert r.bytes_read == sum(sizes) + sum(headers)  # every byte once, the small headers twice
    assert [h.sha256 for h in r.input_hashes] == [file_sha256(models["A"]), file_sha256(b)]
    assert r.report.kept_from_a == [TOKENS] and r.report.dropped == ["model.extra_only_in_b.weight"]
    merged, a = load(out), load(models["A"])
    assert torch.equal(merged[TOKENS], a[TOKENS])
    assert "model.extra_only_in_b.weight" not in merged


def test_different_architectures_are_refused_before_any_work(models, tmp_path):
    def as_sd2(t):  # the SD1 file relabelled with SD2's text-encoder prefix: detected as sd2
        for k in [k for k in t if k.startswith("cond_stage_model.transformer.")]:
            t["cond_stage_model.model." + k[len("cond_stage_model.transformer."):]] = t.pop(k)
    other = variant(models["A"], tmp_path / "sd2like.safetensors", 4, as_sd2)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SdtuneError) as err:
        merge_checkpoints(MergeConfig((str(models["A"]), str(other)), str(out)))
    msg = str(err.value)
    assert "sd2like.safetensors" in msg and "a.safetensors" in msg and "sd2" in msg and "sd1" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [other]


def test_position_ids_are_kept_exactly_or_reset_never_merged(models, tmp_path):
    def broken(t):
        t[IDS] = torch.tensor([[0] + [5] * 76], dtype=torch.int64)
    a = variant(models["A"], tmp_path / "a_ids.safetensors", 5, broken)
    kept, reset = tmp_path / "kept.safetensors", tmp_path / "reset.safetensors"
    merge_checkpoints(MergeConfig((str(a), str(models["B"])), str(kept), alpha=0.5, dtype="fp16"))
    merge_checkpoints(MergeConfig((str(a), str(models["B"])), str(reset), alpha=0.5, position_ids="reset"))
    assert read_header(kept)[0][IDS].dtype == "I64" and read_header(reset)[0][IDS].dtype == "I64"
    assert torch.equal(load(kept)[IDS], load(a)[IDS])
    assert torch.equal(load(reset)[IDS], torch.arange(77)[None])


def test_cancel_leaves_no_output_and_no_temp_file(models, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 20

    seen = []
    with pytest.raises(MergeCancelled):
        merge_checkpoints(MergeConfig((str(models["A"]), str(models["B"])), str(out_dir / "m.safetensors")),
                          progress=lambda done, total, key: seen.append((done, total)), cancelled=cancelled)
    assert list(out_dir.iterdir()) == []
    assert seen and seen[-1][0] < seen[-1][1]


@pytest.mark.parametrize("changes, field", [
    ({"alpha": 5.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"te_alpha": -3.0}, "te_alpha"),
    ({"beta": 0.5}, "beta"), ({"dtype": "fp8"}, "dtype"), ({"method": "nope"}, "method"),
    ({"method": "add_difference"}, "inputs"), ({"blocks": (0.5,) * 25}, "blocks"),
    ({"blocks": "NOT_A_PRESET"}, "blocks"), ({"position_ids": "merge"}, "position_ids"),
    ({"output": "x.ckpt"}, "output"), ({"seed": -1}, "seed"),
])
def test_bad_settings_are_refused_with_the_field_named(models, tmp_path, changes, field):
    base = dict(inputs=(str(models["A"]), str(models["B"])), output=str(tmp_path / "o.safetensors"))
    base.update(changes)
    with pytest.raises(SdtuneError, match=rf"^{field}: "):
        merge_checkpoints(MergeConfig(**base))
    assert list(tmp_path.iterdir()) == []


def test_output_may_not_overwrite_an_input(models):
    with pytest.raises(SdtuneError, match=r"^output: .* is input A"):
        merge_checkpoints(MergeConfig((str(models["A"]), str(models["B"])), str(models["A"])))


def test_vae_bake_ema_and_schedule_pruning(models, tmp_path):
    donor = load(models["C"])
    vae_file = save_safetensors({k[len("first_stage_model."):]: v for k, v in donor.items()
                                 if k.startswith("first_stage_model.")}, tmp_path / "vae.safetensors")
    a = variant(models["A"], tmp_path / "a_ema.safetensors", 6,
                lambda t: t.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates":
                                    torch.tensor(10, dtype=torch.int32)}))
    out = tmp_path / "out.safetensors"
    r = merge_checkpoints(MergeConfig((str(a), str(models["B"])), str(out), vae=str(vae_file), prune_ema=True,
                                      prune_schedule=True, dtype="fp32"))
    merged = load(out)
    vae_keys = [k for k in merged if k.startswith("first_stage_model.")]
    assert r.report.vae_baked == len(vae_keys) > 0
    assert all(torch.equal(merged[k], donor[k].float()) for k in vae_keys)
    assert not any(k.startswith("model_ema.") or k in ("betas", "alphas_cumprod") for k in merged)
    recipe = json.loads(read_header(out)[1][RECIPE_KEY])
    assert recipe["vae"]["sha256"] == file_sha256(vae_file) and recipe["prune_ema"] is True


def test_cli_merge_json_and_error_paragraphs(models, tmp_path):
    out = tmp_path / "cli.safetensors"
    res = cli("merge", models["A"], models["B"], "--method", "weighted_sum", "--alpha", "0.25", "--blocks",
              ",".join(["0.5"] * 26), "--dtype", "fp16", "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["output"] == str(out) and data["architecture"] == "sd1" and data["merged"] > 1000
    assert out.exists()
    bad = cli("merge", models["A"], models["B"], "--blocks", "1,2", "-o", tmp_path / "bad.safetensors")
    assert bad.returncode == 1 and "blocks: 2 values given" in bad.stderr and bad.stdout == ""
    assert not (tmp_path / "bad.safetensors").exists()


def test_inputs_in_another_tensor_order_are_hashed_by_a_second_pass(models, tmp_path):
    def mixed(t):  # B's U-Net in fp32 and the rest fp16: its file order is no longer A's
        for k in [k for k in t if k.startswith("model.diffusion_model.")]:
            t[k] = t[k].float()
    b = variant(models["A"], tmp_path / "b_mixed.safetensors", 8, mixed)
    r = merge_checkpoints(MergeConfig((str(models["A"]), str(b)), str(tmp_path / "o.safetensors"), dtype="fp32"))
    assert [h.sha256 for h in r.input_hashes] == [file_sha256(models["A"]), file_sha256(b)]
    merged, a, bt = load(tmp_path / "o.safetensors"), load(models["A"]), load(b)
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    assert torch.equal(merged[key], 0.5 * a[key].float() + 0.5 * bt[key])


def test_ckpt_inputs_are_read_as_plain_tensors(models, tmp_path):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load(models["B"])}, ckpt)
    from_ckpt, from_st = tmp_path / "ckpt.safetensors", tmp_path / "st.safetensors"
    merge_checkpoints(MergeConfig((str(models["A"]), str(ckpt)), str(from_ckpt), alpha=0.4))
    merge_checkpoints(MergeConfig((str(models["A"]), str(models["B"])), str(from_st), alpha=0.4))
    x, y = load(from_ckpt), load(from_st)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_inpainting_a_merges_the_shared_channels_and_keeps_its_own(models, tmp_path):
    conv = "model.diffusion_model.input_blocks.0.0.weight"

    def inpaint(t):
        t[conv] = torch.cat([t[conv], torch.full((t[conv].shape[0], 5, *t[conv].shape[2:]), 0.5, dtype=t[conv].dtype)],
                            dim=1)
    a9 = variant(models["A"], tmp_path / "a_inpaint.safetensors", 9, inpaint)
    out = tmp_path / "o.safetensors"
    r = merge_checkpoints(MergeConfig((str(a9), str(models["B"])), str(out), alpha=0.5, dtype="fp32"))
    assert r.report.partial_channels == [conv]
    m, a, b = load(out)[conv], load(a9)[conv], load(models["B"])[conv]
    assert m.shape[1] == 9 and torch.equal(m[:, 4:], a[:, 4:].float())
    assert torch.equal(m[:, :4], 0.5 * a[:, :4].float() + 0.5 * b.float())
    with pytest.raises(SdtuneError, match="must be A"):
        merge_checkpoints(MergeConfig((str(models["B"]), str(a9)), str(tmp_path / "x.safetensors")))
