"""The WD14 tagger pipeline on a tiny ONNX model with the real signature ([N,H,W,3] BGR 0..255 -> [N,n] scores).

The model scores tags from the mean colour, so a red image must get the red tags and a blue one the blue tags.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from lib_sdtune.errors import SdtuneError  # noqa: E402
from lib_sdtune.tags.backup import list_backups, read_backup  # noqa: E402
from lib_sdtune.tags.wd14 import (  # noqa: E402
    Wd14Config,
    mcut_threshold,
    prepare_image,
    select_tags,
    tag_dataset,
)
from lib_sdtune.tags.wd14_model import find_models, load_labels, model_roots, open_model  # noqa: E402

# name, category, weights on the (B, G, R) channel means scaled to 0..1, bias -> sigmoid score
LABELS = [
    ("general", 9, (0, 0, 0), 2.0), ("sensitive", 9, (0, 0, 0), -2.0),
    ("questionable", 9, (0, 0, 0), -3.0), ("explicit", 9, (0, 0, 0), -4.0),
    ("red_theme", 0, (-8, 0, 8), -2.0), ("blue_theme", 0, (8, 0, -8), -2.0),
    ("^_^", 0, (-8, 8, -8), 0.0), ("long_hair", 0, (0, 0, 0), 0.0),  # 0.5 always: above 0.35
    ("watermark", 0, (0, 0, 0), 3.0), ("red_(character)", 4, (-8, 0, 8), -1.0),
    ("almost_character", 4, (0, 0, 0), 1.0),  # 0.73: below the 0.85 character threshold
]
SIZE = 32


def write_model(folder: Path, batch=None, size: int = SIZE) -> Path:
    """model.onnx: ReduceMean over H,W -> MatMul -> Add -> Sigmoid; plus selected_tags.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(LABELS)
    w = np.array([lab[2] for lab in LABELS], dtype=np.float32).T / 255.0  # [3, n]
    b = np.array([lab[3] for lab in LABELS], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("w", TensorProto.FLOAT, [3, n], w.flatten().tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [n], b.tolist())]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch or "N", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch or "N", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _, _) in enumerate(LABELS):
            wr.writerow([1000 + i, name, cat, 10])
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("models") / "interrogators" / "wd-tiny-tagger")


def make_images(root: Path) -> Path:
    d = root / "10_x"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 24), (230, 20, 20)).save(d / "red.png")
    Image.new("RGB", (24, 40), (20, 20, 230)).save(d / "blue.jpg")
    Image.new("RGB", (32, 32), (10, 230, 10)).save(d / "green.png")
    (d / "blue.txt").write_text("existing, blue_theme", encoding="utf-8")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def reference_prepare(image: Image.Image, target: int) -> np.ndarray:
    """The wd-tagger Space's Predictor.prepare_image, verbatim apart from names."""
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    pad_left, pad_top = (max_dim - image.size[0]) // 2, (max_dim - image.size[1]) // 2
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, (pad_left, pad_top))
    if max_dim != target:
        padded = padded.resize((target, target), Image.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1]


def test_preprocessing_matches_the_reference_space():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA")
    for target in (448, 64, 50):
        ours = prepare_image(rgba, target)
        assert ours.shape == (target, target, 3) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, reference_prepare(rgba, target))
    for mode in ("RGB", "L", "P", "LA"):
        img = rgba.convert(mode)
        np.testing.assert_array_equal(prepare_image(img, 64), reference_prepare(img.convert("RGBA"), 64))
    red = prepare_image(Image.new("RGB", (10, 10), (230, 20, 10)), 10)
    assert red[0, 0].tolist() == [10.0, 20.0, 230.0]  # BGR, 0..255, no normalisation
    clear = prepare_image(Image.new("RGBA", (4, 2), (0, 0, 0, 0)), 4)
    assert (clear == 255).all()  # transparent and padding become white


def test_mcut():
    assert mcut_threshold(np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.5)
    assert mcut_threshold(np.array([0.3])) == 0.0


def test_labels_categories_and_kaomoji(model_dir):
    labels = load_labels(model_dir / "selected_tags.csv")
    assert labels.rating == (0, 1, 2, 3) and labels.character == (9, 10)
    assert labels.names[4] == "red theme" and labels.names[6] == "^_^" and labels.names[9] == "red (character)"
    assert load_labels(model_dir / "selected_tags.csv", replace_underscores=False).names[4] == "red_theme"


def test_selection_thresholds_mcut_exclusion_rating(model_dir):
    labels = load_labels(model_dir / "selected_tags.csv")
    scores = np.array([0.9, 0.1, 0.0, 0.0, 0.95, 0.02, 0.3, 0.5, 0.96, 0.9, 0.7])
    tags, sc, rating = select_tags(scores, labels, Wd14Config(Path("."), Path(".")))
    assert tags == ["red (character)", "watermark", "red theme", "long hair"]
    assert rating["general"] == pytest.approx(0.9) and sc["long hair"] == pytest.approx(0.5)
    cfg = Wd14Config(Path("."), Path("."), exclude=("watermark", "long_hair"), add_rating=True, escape_parens=True)
    assert select_tags(scores, labels, cfg)[0] == ["general", r"red \(character\)", "red theme"]
    cfg = Wd14Config(Path("."), Path("."), general_mcut=True, character_mcut=True)
    # general .96 .95 | .5 .3 .02 -> cut at .725; character .9 | .7 -> cut at .8 (floor .15)
    assert select_tags(scores, labels, cfg)[0] == ["red (character)", "watermark", "red theme"]


def test_whole_pipeline_tags_red_and_blue_images(tmp_path, model_dir):
    root = make_images(tmp_path)
    seen = []
    result = tag_dataset(Wd14Config(root, model_dir, exclude=("watermark",), batch_size=2, workers=2),
                         progress=lambda d, t, info: seen.append((d, t)))
    caps = {p.stem: p.read_text("utf-8") for p in (root / "10_x").glob("*.txt")}
    assert caps["red"] == "red (character), red theme, long hair"
    assert caps["blue"] == "existing, blue_theme, blue theme, long hair"  # appended, existing kept
    assert caps["green"] == "^_^, long hair"  # the kaomoji keeps its underscore
    assert "broken" not in caps and [p.name for p, _ in result.errors] == ["broken.png"]
    assert seen[-1] == (4, 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(result.written) == 3 and result.backup in list_backups(root)
    assert read_backup(result.backup)["10_x/blue.txt"] == b"existing, blue_theme"
    assert json.dumps(result.to_dict())


def test_modes_overwrite_prepend_skip_and_fixed_batch_model(tmp_path):
    fixed = write_model(tmp_path / "fixed", batch=1)
    assert open_model(fixed).fixed_batch == 1
    root = make_images(tmp_path / "ds")
    blue = root / "10_x" / "blue.txt"
    tag_dataset(Wd14Config(root, fixed, mode="skip", batch_size=4))
    assert blue.read_text("utf-8") == "existing, blue_theme"
    tag_dataset(Wd14Config(root, fixed, mode="prepend", exclude=("watermark", "long hair")))
    assert blue.read_text("utf-8") == "blue theme, existing, blue_theme"
    tag_dataset(Wd14Config(root, fixed, mode="overwrite", exclude=("watermark",)))
    assert blue.read_text("utf-8") == "blue theme, long hair"


def test_a_fixed_batch_larger_than_the_last_chunk_is_padded(tmp_path):
    fixed = write_model(tmp_path / "fixed3", batch=3)
    root = make_images(tmp_path / "ds")
    r = tag_dataset(Wd14Config(root, fixed, batch_size=8, exclude=("watermark",)))
    assert len([i for i in r.images if not i.error]) == 3
    assert (root / "10_x" / "red.txt").read_text("utf-8") == "red (character), red theme, long hair"


def test_cancel_writes_only_what_was_tagged(tmp_path, model_dir):
    root = make_images(tmp_path)
    calls = []
    result = tag_dataset(Wd14Config(root, model_dir, batch_size=1),
                         cancelled=lambda: len(calls) >= 1, progress=lambda d, t, i: calls.append(d))
    assert result.cancelled and len(result.images) == 1 and len(result.written) == 1


def test_input_size_comes_from_the_model(tmp_path):
    m = open_model(write_model(tmp_path / "m64", size=64))
    assert m.input_size == 64
    batch = np.stack([prepare_image(Image.new("RGB", (100, 30), (200, 0, 0)), m.input_size)])
    assert m.predict(batch).shape == (1, len(LABELS))


def test_model_discovery_and_errors(tmp_path, model_dir, monkeypatch):
    models_root = model_dir.parent.parent
    assert find_models(model_roots(models_dir=models_root)) == [model_dir.resolve()]
    monkeypatch.setenv("SDTUNE_TAGGER_DIR", str(models_root))
    assert find_models(model_roots()) == [model_dir.resolve()]
    with pytest.raises(SdtuneError, match="model.onnx and selected_tags.csv"):
        open_model(tmp_path)
    bad = tmp_path / "bad"
    write_model(bad)
    (bad / "selected_tags.csv").write_text("tag_id,name,category,count\n1,a,0,1\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match="different models"):
        open_model(bad)
    with pytest.raises(SdtuneError, match="mode"):
        Wd14Config(tmp_path, tmp_path, mode="replace")


def test_missing_onnxruntime_names_the_package(tmp_path, model_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ort(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(SdtuneError, match="pip install onnxruntime"):
        open_model(model_dir)


def test_download_only_names_the_repo_and_respects_offline_mode(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from lib_sdtune.tags.wd14_model import download_model

    calls = []

    def fake_download(repo_id, filename, revision=None, local_dir=None):
        calls.append((repo_id, filename))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_text("x")
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SdtuneError, match="HF_HUB_OFFLINE"):
        download_model("SmilingWolf/wd-vit-tagger-v3", tmp_path)
    assert calls == []
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    dest = download_model("SmilingWolf/wd-vit-tagger-v3", tmp_path)
    assert dest == tmp_path / "wd-vit-tagger-v3" and sorted(f for _, f in calls) == ["model.onnx", "selected_tags.csv"]
