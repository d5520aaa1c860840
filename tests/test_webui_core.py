"""The WebUI core: the A1111/Forge host integration (VRAM freed around a GPU job, generation paused meanwhile,
progress in shared.state, the host's Interrupt stops the job, settings read safely), the job runner's host
hooks, and the Train and Dataset panels' handlers called directly on the tiny model and demo dataset."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lib_sdtune.errors import SdtuneError
from lib_sdtune.host import HostFolders, list_folders, resolve_folder
from lib_sdtune.jobs import JobRunner
from lib_sdtune.webui.a1111_host import GUARD_MARK, GenerationPaused, WebUIHost
from lib_sdtune.webui.context import UiContext
from lib_sdtune.webui.settings import DEFAULTS, SETTINGS, read_values, ui_settings


def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


# --- the host side, with stand-ins for the WebUI's modules ---------------------------------------------------
class FakeState:
    """The fields and methods of A1111's shared.state that sdtune touches."""

    def __init__(self):
        self.interrupted, self.job, self.job_count, self.job_no = False, "", 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.textinfo, self.begun, self.ended = None, [], 0

    def begin(self, job="(unknown)"):
        self.begun.append(job)
        self.interrupted, self.job, self.job_count = False, job, -1

    def end(self):
        self.ended += 1
        self.job, self.job_count = "", 0


class FakeOptionInfo:
    """A1111's shared.OptionInfo as far as sdtune calls it."""

    def __init__(self, default, label, component=None, component_args=None, section=None, category_id=None):
        self.default, self.label, self.component, self.args, self.section, self.category_id = \
            default, label, component, component_args, section, category_id

    def info(self, text):
        self.help = text
        return self


def fake_webui(tmp_path: Path, forge: bool = False, loaded: bool = True, **opts):
    events = []
    model = SimpleNamespace(name="the WebUI's model")

    class SdModels:
        model_path = str(tmp_path / "models" / "Stable-diffusion")
        model_data = SimpleNamespace(sd_model=model if loaded else None)

        @staticmethod
        def unload_model_weights(m=None):
            events.append(("unload", m))

        @staticmethod
        def send_model_to_device(m):
            events.append(("to_device", m))

        @staticmethod
        def reload_model_weights(*args, **kwargs):
            events.append(("reload", args))
            return "loaded"

        @staticmethod
        def load_model(*args, **kwargs):
            events.append(("load", args))
            return "loaded"

    shared = SimpleNamespace(state=FakeState(), opts=SimpleNamespace(**opts), device="cpu",
                             cmd_opts=SimpleNamespace(ckpt_dir=str(tmp_path / "ckpts"), lora_dir=None, vae_dir=None))
    processing = SimpleNamespace(process_images_inner=lambda p: f"images of {p}")
    host = WebUIHost(shared, SdModels, processing, models_dir=tmp_path / "models", data_dir=tmp_path,
                     queue_lock=threading.Lock(), forge=forge)
    return host, shared, processing, events, model


@pytest.mark.compat
def test_a_gpu_job_frees_vram_pauses_generation_shows_progress_and_obeys_interrupt(tmp_path):
    host, shared, processing, events, model = fake_webui(tmp_path)
    host.install_guard()
    host.install_guard()  # a second "Reload UI" does not wrap twice
    original = getattr(processing.process_images_inner, GUARD_MARK)
    assert getattr(original, GUARD_MARK, None) is None
    assert processing.process_images_inner("p") == "images of p"

    host.queue_lock.acquire()  # a generation is running: the job waits before unloading
    started = threading.Event()

    def work(jc):
        started.set()
        jc.progress(3, 10, {"loss": 0.25})
        while not jc.cancelled():
            time.sleep(0.01)
        return "partial"

    job = host.jobs.start("Train demo", work)
    time.sleep(0.2)
    assert events == [] and not started.is_set()
    host.queue_lock.release()
    started.wait(5)
    assert events == [("unload", model)]
    wait_for(lambda: shared.state.sampling_step == 3)
    assert shared.state.begun == ["sdtune: Train demo"] and shared.state.job == "sdtune: Train demo"
    assert shared.state.sampling_steps == 10 and shared.state.job_count == 1 and "loss 0.25" in shared.state.textinfo
    with pytest.raises(GenerationPaused, match="sdtune is running 'Train demo' on the GPU, so generation and model "
                                               "loading are paused"):
        processing.process_images_inner("p")
    with pytest.raises(GenerationPaused):  # A1111's checkpoint dropdown would load a model onto the GPU mid-run
        host.sd_models.reload_model_weights()
    with pytest.raises(GenerationPaused):  # so would the first use of shared.sd_model (an API txt2img, say)
        host.sd_models.load_model()

    shared.state.interrupted = True  # the WebUI's Interrupt button / /sdapi/v1/interrupt
    snap = host.jobs.wait(job.id, 5)
    assert snap.state == "cancelled" and snap.result == "partial"
    assert events == [("unload", model), ("to_device", model)]
    assert shared.state.ended == 1 and shared.state.interrupted is False and shared.state.textinfo is None
    assert processing.process_images_inner("p") == "images of p"  # generation works again
    assert host.sd_models.reload_model_weights() == "loaded" and events[-1] == ("reload", ())
    host.remove_guard()
    assert processing.process_images_inner is original
    assert getattr(host.sd_models.reload_model_weights, GUARD_MARK, None) is None
    assert getattr(host.sd_models.load_model, GUARD_MARK, None) is None


@pytest.mark.compat
def test_forge_unloads_everything_and_an_empty_a1111_model_slot_is_left_alone(tmp_path):
    host, _, _, events, _ = fake_webui(tmp_path, forge=True)
    host.free_gpu()
    host.restore_gpu()
    assert events == [("unload", None)]  # Forge: unload_all_models; it reloads by itself at the next generation
    host, _, _, events, _ = fake_webui(tmp_path, loaded=False)
    host.free_gpu()
    host.restore_gpu()
    assert events == []  # A1111 would load a model just to unload it


@pytest.mark.compat
def test_settings_fall_back_to_defaults_and_folders_follow_the_command_line(tmp_path):
    host, shared, *_ = fake_webui(tmp_path)  # --nowebui: no option registered, nothing saved
    assert read_values(shared.opts) == DEFAULTS
    folders = host.folders()
    assert folders.checkpoints == (tmp_path / "models" / "Stable-diffusion", tmp_path / "ckpts")
    assert folders.loras == (tmp_path / "models" / "Lora",) and folders.vaes == (tmp_path / "models" / "VAE",)
    assert folders.datasets == (tmp_path / "datasets",)
    settings = host.settings()
    assert settings.precision == "auto" and settings.output_dir is None and settings.device is None
    assert tmp_path / "models" / "interrogators" in settings.tagger_roots

    host, shared, *_ = fake_webui(tmp_path, sdtune_datasets_dir=f"{tmp_path / 'a'} ; {tmp_path / 'b'}",
                                  sdtune_precision="bf16", sdtune_output_dir=str(tmp_path / "out"),
                                  sdtune_tagger_dir=str(tmp_path / "tagger"))
    shared.cmd_opts.lora_dir, shared.cmd_opts.vae_dir = str(tmp_path / "my_loras"), str(tmp_path / "my_vaes")
    shared.device = "cuda:1"
    ctx = host.context()
    assert ctx.folders.datasets == (tmp_path / "a", tmp_path / "b")
    assert ctx.folders.loras == (tmp_path / "my_loras",) and ctx.folders.vaes[0] == tmp_path / "my_vaes"
    assert (ctx.settings.precision, ctx.settings.output_dir, ctx.settings.tagger_dir, ctx.settings.device) == \
        ("bf16", tmp_path / "out", tmp_path / "tagger", "cuda:1")
    assert ctx.jobs is host.jobs  # every tab built in this process shares one runner
    shared.opts.sdtune_precision = "fp16"
    host.update_context(ctx)
    assert ctx.settings.precision == "fp16"
    assert ui_settings({"sdtune_precision": "bogus"}, tmp_path).precision == "auto"


@pytest.mark.compat
def test_the_settings_section_registers_every_option(tmp_path):
    gr = pytest.importorskip("gradio")
    added = {}
    host, shared, *_ = fake_webui(tmp_path)
    shared.OptionInfo = FakeOptionInfo
    shared.opts.add_option = lambda key, info: added.setdefault(key, info)
    host.add_settings()
    assert list(added) == [s.key for s in SETTINGS]
    precision = added["sdtune_precision"]
    assert precision.component is gr.Radio and precision.args == {"choices": ["auto", "fp16", "bf16", "no"]}
    # A1111 1.10's settings page does `elem_id, text = item.section`: a pair, the category passed on its own
    assert precision.section == ("sdtune", "sdtune") and precision.category_id == "training"
    assert "planner" in precision.help


@pytest.mark.compat
def test_job_runner_hooks_series_and_meta():
    seen = []
    runner = JobRunner(on_progress=lambda snap: seen.append((snap.state, snap.done)))

    def work(jc):
        for step in (1, 2):
            jc.progress(step, 2, {"loss": 1.0 / step})
            jc.record("loss", step, 1.0 / step)
        return "ok"

    job = runner.start("train", work, meta={"kind": "train"})
    snap = runner.wait(job.id, 5)
    assert snap.series == {"loss": ((1.0, 1.0), (2.0, 0.5))} and snap.meta == {"kind": "train"}
    assert seen == [("running", 0), ("running", 1), ("running", 2), ("done", 2)]
    cpu = runner.start("lint", lambda jc: jc.progress(1, 1), uses_gpu=False)
    runner.wait(cpu.id, 5)
    assert len(seen) == 4  # CPU jobs stay out of the host's progress display

    def broken_host():
        raise RuntimeError("host gone")

    runner = JobRunner(on_progress=lambda snap: broken_host(), host_interrupted=broken_host)
    job = runner.start("train", lambda jc: (jc.progress(1, 1), jc.cancelled())[1])
    snap = runner.wait(job.id, 5)
    assert snap.state == "done" and snap.result is False  # a failing host hook never breaks the job


# --- folders ------------------------------------------------------------------------------------------------
def test_dataset_folders_are_listed_and_typed_paths_stay_inside(tmp_path):
    root = tmp_path / "datasets"
    (root / "mine" / "10_cat").mkdir(parents=True)
    (root / "mine" / "10_cat" / "a.png").write_bytes(b"")
    (root / "mine" / ".sdtune_backups" / "x").mkdir(parents=True)
    (root / "empty").mkdir()
    (tmp_path / "secret").mkdir()
    assert list_folders([root]) == ["mine", "mine/10_cat"]
    assert resolve_folder("mine", [root]) == (root / "mine").resolve()
    assert resolve_folder(str(root / "mine" / "10_cat"), [root]).name == "10_cat"
    for bad in ("../secret", str(tmp_path / "secret")):
        with pytest.raises(SdtuneError, match="outside the allowed dataset folder"):
            resolve_folder(bad, [root])
    with pytest.raises(SdtuneError, match="no such dataset folder"):
        resolve_folder("absent", [root])
    with pytest.raises(SdtuneError, match="choose a dataset"):
        resolve_folder(" ", [root])


# --- the Train and Dataset panels on the demo data ----------------------------------------------------------
@pytest.fixture(scope="module")
def demo_ctx(tmp_path_factory, tiny_checkpoints) -> UiContext:
    """A1111-layout folders with the tiny SD1 checkpoint and the demo dataset."""
    import shutil

    from lib_sdtune.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("webui_core")
    folders = HostFolders.under(root / "models", root / "datasets")
    folders.checkpoints[0].mkdir(parents=True)
    shutil.copy(tiny_checkpoints["sd1"], folders.checkpoints[0] / "tiny.safetensors")
    write_demo_dataset(root / "datasets" / "demo")
    return UiContext(folders)


# the demo's CPU overrides, shrunk to two steps of two 64 px images
TINY_RUN = "resolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 128\nmax_train_steps = 2\n" \
           "train_batch_size = 2\ncache_latents = false"


def test_train_panel_plans_trains_and_refuses_overwrite_and_outside_paths(demo_ctx):
    from lib_sdtune.webui import train_panel as tp

    form = tp.TrainForm(model="tiny.safetensors", dataset="demo/train", output_name="demo_lora", extra=TINY_RUN,
                        prompts="sdtdemo, circle --w 64 --h 64 --s 2 --d 1")
    plan = tp.make_plan(demo_ctx, form)
    text = tp.plan_summary(plan)
    assert "network_dim = 32" in text and "SD1.5 LoRAs are usually rank 16-64" in text  # values with reasons
    assert tp.plan_fields(plan)[0] == str(plan.config["max_train_epochs"])
    precision = [k for k, _ in tp.FIELDS].index("mixed_precision")
    assert tp.plan_fields(plan, "bf16")[precision] == "bf16"  # the host's default precision shows as it applies
    run = tp.prepare_run(demo_ctx, tp.TrainForm(**{**form.__dict__, "fields": {"max_train_epochs": "3"}}))
    assert run.cfg.max_train_epochs == 3 and 0 < run.cfg.lr_warmup_steps < 1  # warm-up follows the new length
    assert run.run_dir == (demo_ctx.folders.loras[0] / "demo_lora").resolve()
    state = demo_ctx.folders.loras[0] / "demo_lora" / "demo_lora-state"
    run = tp.prepare_run(demo_ctx, tp.TrainForm(**{**form.__dict__, "extra": 'resume = "demo_lora/demo_lora-state"'}))
    assert run.cfg.resume == str(state.resolve())  # a path setting is confined to its folder kind, then absolute

    outside = demo_ctx.folders.checkpoints[0].parent.parent / "outside.safetensors"
    outside.write_bytes(b"")
    for bad, message in ((dict(dataset="../.."), "outside the allowed dataset folder"),
                         (dict(model="../../outside.safetensors"), "outside the allowed"),
                         (dict(model="absent.safetensors"), "no such checkpoint"),
                         (dict(output_name="../evil"), "output name"),
                         (dict(extra="not_a_setting = 1"), "More settings, line 1"),
                         (dict(extra="\noutput_dir = /tmp"), "line 2: output_dir is set by the 'Output name' field"),
                         (dict(extra="resume = '/etc'"), "outside the allowed resume (loras) folders"),
                         (dict(model=""), "choose a base model")):
        job, error = tp.start_training(demo_ctx, tp.TrainForm(**{**form.__dict__, **bad}))
        assert job is None and message in error, (bad, error)

    job, error = tp.start_training(demo_ctx, form)
    assert error is None
    updates = list(tp.follow_training(job, poll=0.2))
    lines = [u[0] for u in updates]
    assert any(line.startswith("Running: Train demo_lora") for line in lines)
    final_line, bar, chart, samples, result = updates[-1]
    assert final_line.startswith("Done: Train demo_lora | 2 steps"), final_line
    assert 'data-state="done"' in bar and chart.size == (800, 400)
    lora = demo_ctx.folders.loras[0] / "demo_lora" / "demo_lora.safetensors"
    assert lora.is_file() and str(lora.resolve()) in result
    shown = [u[3] for u in updates if u[3] is not None][-1]
    assert shown and shown[-1][1].startswith("epoch 1 #0")  # the sample of epoch 1, labelled

    job, error = tp.start_training(demo_ctx, form)  # the same name again: refused without Overwrite
    assert job is None and "already holds a run named 'demo_lora'" in error
    assert tp.stop_training(demo_ctx, None) == "Nothing is training."


def test_dataset_panel_edits_captions_with_undo_and_confines_folders(demo_ctx):
    from lib_sdtune.webui import dataset_panel as dp

    with pytest.raises(SdtuneError, match="outside the allowed dataset folder"):
        dp.open_session(demo_ctx, "../models")
    session = dp.open_session(demo_ctx, "demo/train", reload=True)
    assert "trigger-word candidates): sdtdemo" in dp.summary(session)
    indices, page, pages = dp.page_of(session, "", 1, size=5)
    assert (len(indices), page, pages) == (5, 1, 3)
    thumbs = dp.thumbnails(session, indices)
    assert max(thumbs[0][0].size) <= dp.THUMB and thumbs[0][1] == "0000.png"
    assert dp.page_of(session, "circle AND NOT square", 9)[1] >= 1  # pages clamp

    label, caption = dp.caption_text(session, 0)
    assert "0000.png" in label and caption.startswith("sdtdemo")
    assert dp.save_caption(session, 0, caption + ", hand tag").startswith("Saved")
    first = session.store.items[0].caption
    assert first.read_text().endswith("hand tag")

    assert "would change" in dp.preview_edit(session, "Remove tags", "sdtdemo", "", "")
    assert first.read_text().startswith("sdtdemo")  # a preview writes nothing
    assert dp.apply_edit(session, "Remove tags", "sdtdemo", "", "").startswith("Changed 12 caption(s)")
    assert "sdtdemo" not in first.read_text()
    assert dict(dp.tag_rows(session)).get("sdtdemo") is None
    assert dp.undo_edit(session).startswith("Undid")
    assert first.read_text().startswith("sdtdemo") and first.read_text().endswith("hand tag")
    assert dp.redo_edit(session).startswith("Redid") and "sdtdemo" not in first.read_text()
    dp.undo_edit(session)
    dp.undo_edit(session)  # the hand edit too
    assert not first.read_text().endswith("hand tag")
    with pytest.raises(SdtuneError, match="nothing to undo"):
        dp.undo_edit(session)

    assert [type(op).__name__ for op in dp.build_ops("Add tags at the front", "a, b")] == ["AddTag", "AddTag"]
    with pytest.raises(SdtuneError, match="enter at least one tag"):
        dp.build_ops("Remove tags", " ")
    with pytest.raises(SdtuneError, match="not a number"):
        dp.build_ops("Sort tags by frequency", "x")

    job, error = dp.start_lint(demo_ctx, session, 64)
    *_, (bar, report) = list(dp.follow_text_job(job))
    assert error is None and report.startswith("12 images checked") and 'data-state="done"' in bar


def test_wd14_tagging_from_the_panel_is_one_undoable_step(demo_ctx, tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from lib_sdtune.webui import dataset_panel as dp

    folder = tmp_path / "models" / "interrogators" / "tiny-tagger"  # scores "red_theme" from the red channel
    folder.mkdir(parents=True)
    nodes = [helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "w"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [0, 0, 0, 0, 0.05, -1])]  # BGR: R -> tag 0
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                            ["N", 32, 32, 3])],
                              [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", 2])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n1,red_theme,0,1\n2,never,0,1\n")

    ctx = UiContext(demo_ctx.folders, settings=ui_settings({}, tmp_path / "models"))
    assert dp.list_taggers(ctx) == [str(folder.resolve())]
    session = dp.open_session(ctx, "demo/reg", reload=True)
    with pytest.raises(SdtuneError, match="choose a WD14 tagger"):
        dp.start_wd14(ctx, session, str(tmp_path), 0.35, 0.85, "append")
    before = [it.caption.read_text() for it in session.store.items]
    job, error = dp.start_wd14(ctx, session, dp.list_taggers(ctx)[0], 0.35, 0.85, "append")
    *_, (bar, text) = list(dp.follow_text_job(job))
    assert error is None and text.startswith("12 image(s) tagged, 12 caption(s) written"), text
    assert all(it.caption.read_text().endswith("red theme") for it in session.store.items)
    dp.undo_edit(session)
    assert [it.caption.read_text() for it in session.store.items] == before


@pytest.mark.compat
def test_the_whole_ui_builds_with_every_panel(tmp_path):
    pytest.importorskip("gradio")
    import warnings

    from lib_sdtune.webui.app import build_blocks, javascript

    folders = HostFolders.under(tmp_path / "models", tmp_path / "datasets")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blocks = build_blocks(UiContext(folders))
    spam = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if not issubclass(w.category, ResourceWarning)
            and "on_event is deprecated" not in str(w.message)]  # gradio 4.40's own FastAPI start-up notice
    assert not spam, spam  # no deprecation or argument warning from building our panels
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for elem_id in ("sdtune_tab_train", "sdtune_tab_dataset", "sdtune_tab_merge", "sdtune_tab_lora",
                    "sdtune_tab_repair", "sdtune_tab_model", "sdtune_train_start", "sdtune_train_stop",
                    "sdtune_ds_undo", "sdtune_ds_caption", "sdtune_ds_save"):
        assert elem_id in ids, elem_id
    js = javascript()
    for clicked in ("sdtune_ds_save", "sdtune_ds_caption", "sdtune_ds_undo", "sdtune_ds_redo",
                    "sdtune_model_refresh", "sdtune_train_refresh"):  # every id the javascript uses exists
        assert clicked in js and clicked in ids


@pytest.mark.compat
def test_the_a1111_script_registers_the_tab_settings_and_guard(tmp_path, monkeypatch):
    """scripts/sdtune.py as the WebUI runs it, over stand-in `modules.*`: it registers its callbacks, wraps
    generation, builds the tab from the WebUI's folders, and undoes the wrap when unloaded."""
    import runpy
    import sys
    import types

    gr = pytest.importorskip("gradio")
    from lib_sdtune.webui import a1111_host

    host, shared, processing, _, _ = fake_webui(tmp_path)
    callbacks: dict[str, list] = {}
    shared.opts.data_labels, changes = {}, {}
    shared.opts.add_option = lambda key, info: shared.opts.data_labels.setdefault(key, info)
    shared.opts.onchange = lambda key, fn, call=True: changes.setdefault(key, fn)
    shared.OptionInfo = FakeOptionInfo
    fakes = {
        "script_callbacks": SimpleNamespace(**{name: (lambda n: lambda fn: callbacks.setdefault(n, []).append(fn))(
            name) for name in ("on_ui_settings", "on_ui_tabs", "on_script_unloaded")}),
        "shared": shared, "processing": processing, "sd_models": host.sd_models,
        "call_queue": SimpleNamespace(queue_lock=threading.Lock()),
        "paths": SimpleNamespace(models_path=str(tmp_path / "models"), data_path=str(tmp_path)),
    }
    package = types.ModuleType("modules")
    package.__path__ = []
    for name, module in fakes.items():
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setattr(a1111_host, "_HOSTS", [])
    original = processing.process_images_inner

    runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "sdtune.py"))
    assert set(callbacks) == {"on_ui_settings", "on_ui_tabs", "on_script_unloaded"}
    assert getattr(processing.process_images_inner, GUARD_MARK) is original
    callbacks["on_ui_settings"][0]()
    assert set(shared.opts.data_labels) == {s.key for s in SETTINGS}
    [(blocks, title, elem_id)] = callbacks["on_ui_tabs"][0]()
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("sdtune", "sdtune")
    assert set(changes) == {s.key for s in SETTINGS}  # the open tab follows settings changes
    callbacks["on_script_unloaded"][0]()
    assert processing.process_images_inner is original and a1111_host._HOSTS == []
