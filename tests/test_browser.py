"""The standalone app in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

A fixture serves `python -m lib_sdtune ui` on a free 127.0.0.1 port over the tiny SD1 checkpoint and the demo
dataset. The tests open every sub-tab, train the tiny demo from the Train tab (live status, then the LoRA file
on disk), batch-edit tags and undo with the Ctrl+Z shortcut, and run a merge. Any browser console error fails
the test. Screenshots go to build/test-artifacts/screenshots/ and, with SDTUNE_SCREENSHOTS=DIR, into DIR too.
Requests that would leave 127.0.0.1 (web fonts) are answered empty, as the machine is offline.
SDTUNE_UI_PYTHON=PATH serves the app with another interpreter (an A1111-like venv with gradio 3.41, say).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

CHROMIUM = Path(os.environ.get("SDTUNE_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "build" / "test-artifacts" / "screenshots"
STARTUP_SECONDS = 120
TRAIN_SECONDS = 90
# the demo's CPU overrides, shrunk to four steps of two 64 px images (as the Train tab's "More settings")
TINY_RUN = ("resolution = 64\nmin_bucket_reso = 64\nmax_bucket_reso = 128\nmax_train_steps = 4\n"
            "train_batch_size = 2\ncache_latents = false")

if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install playwright")
pytest.importorskip("gradio", reason="the standalone app needs gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_checkpoints):
    """The standalone app over tiny models and the demo dataset, served by a subprocess."""
    from lib_sdtune.demo.dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("browser")
    ckpts = root / "models" / "Stable-diffusion"
    ckpts.mkdir(parents=True)
    for name in ("tiny.safetensors", "tiny_b.safetensors"):
        shutil.copy(tiny_checkpoints["sd1"], ckpts / name)
    write_demo_dataset(root / "datasets" / "demo")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        python = os.environ.get("SDTUNE_UI_PYTHON", sys.executable)
        proc = subprocess.Popen([python, "-m", "lib_sdtune", "ui", "--port", str(port), "--models-dir", "models",
                                 "--datasets-dir", "datasets"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + STARTUP_SECONDS
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the app exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the app did not answer within {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(url=url, root=root, log=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield b
        b.close()


@pytest.fixture(scope="module")
def console_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(browser, app, console_errors):
    """One page on the app for the module (loading it costs seconds); console errors are collected."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.on("console", lambda m: console_errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: console_errors.append(f"page error: {e}"))

    def offline(route):
        if route.request.url.startswith("http://127.0.0.1"):
            return route.continue_()
        return route.fulfill(status=200, body="")

    pg.route("**/*", offline)
    pg.goto(app.url)
    pg.wait_for_selector("#sdtune_train_start", timeout=30_000)
    yield pg
    pg.close()


@pytest.fixture(autouse=True)
def no_console_errors(console_errors):
    """Fail a test during which the browser logged an error."""
    console_errors.clear()
    yield
    assert not console_errors, "browser console errors:\n" + "\n".join(console_errors)


def shot(pg, name: str) -> None:
    """Save a full-page screenshot as a test artefact (and into $SDTUNE_SCREENSHOTS)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    extra = os.environ.get("SDTUNE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", Path(extra) / f"{name}.png")


def box(pg, elem_id: str):
    """The text field of a gradio Textbox (a textarea or an input, by gradio version)."""
    return pg.locator(f"#{elem_id} textarea, #{elem_id} input").first


def text_of(pg, elem_id: str) -> str:
    """What a component shows: a Textbox's text, or the text of an HTML/Markdown block."""
    field = box(pg, elem_id)
    return field.input_value() if field.count() else pg.locator(f"#{elem_id}").first.inner_text().strip()


def wait_value(pg, elem_id: str, predicate, timeout: float = 30.0) -> str:
    """Poll a component until its text satisfies `predicate`; its last text in the failure message."""
    deadline, value = time.time() + timeout, ""
    while time.time() < deadline:
        value = text_of(pg, elem_id)
        if predicate(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"#{elem_id} never matched; last value: {value!r}")


def choose(pg, elem_id: str, value: str) -> None:
    """Pick a dropdown entry by typing it (and taking the matching option where one is listed)."""
    field = pg.locator(f"#{elem_id} input").first
    field.click()
    field.fill(value)
    option = pg.locator("[role=option]", has_text=value).first
    if option.count():
        option.click()
    else:
        field.press("Enter")
    field.evaluate("el => el.blur()")  # close the list


def open_tab(pg, label: str) -> None:
    """Click a sub-tab (a role=tab button from gradio 4 on, a plain button in 3.41)."""
    tab = pg.get_by_role("tab", name=label, exact=True)
    (tab if tab.count() else pg.locator("#sdtune_tabs").get_by_role("button", name=label, exact=True)).click()


def test_every_sub_tab_opens(page):
    for label, elem_id, name in (("Dataset", "sdtune_ds_load", "dataset-empty"),
                                 ("Merge", "sdtune_merge_run", "merge-empty"),
                                 ("LoRA tools", "sdtune_lora_refresh", "lora"),
                                 ("Repair", "sdtune_repair_refresh", "repair"),
                                 ("Model", "sdtune_model_inspect", "model"),
                                 ("Train", "sdtune_train_start", "train-empty")):
        open_tab(page, label)
        page.locator(f"#{elem_id}").first.wait_for(state="visible", timeout=10_000)
        shot(page, name)


def test_tag_edit_and_undo_from_the_keyboard(page, app):
    caption = app.root / "datasets" / "demo" / "reg" / "1_shape" / "0000.txt"
    before = caption.read_text()
    open_tab(page, "Dataset")
    choose(page, "sdtune_ds_dataset", "demo/reg")
    page.locator("#sdtune_ds_load").click()
    page.locator("#sdtune_ds_summary", has_text="12 images, 12 captioned").first.wait_for(timeout=20_000)
    assert page.locator("#sdtune_ds_gallery img").count() >= 12
    box(page, "sdtune_ds_arg").fill("browsertag")
    page.locator("#sdtune_ds_apply").click()
    wait_value(page, "sdtune_ds_edit_result", lambda v: v.startswith("Changed 12 caption(s)"))
    assert caption.read_text().startswith("browsertag, ")
    page.locator("#sdtune_ds_gallery img").first.click()
    wait_value(page, "sdtune_ds_caption", lambda v: v.startswith("browsertag, "))
    shot(page, "dataset")
    page.locator("#sdtune_ds_summary").first.click()  # focus outside the text fields, then Ctrl+Z: undo
    page.keyboard.press("Control+z")
    wait_value(page, "sdtune_ds_edit_result", lambda v: v.startswith("Undid: restored 12 caption(s)"))
    assert caption.read_text() == before
    box(page, "sdtune_ds_caption").fill(before.strip() + ", typed here")
    box(page, "sdtune_ds_caption").press("Control+Enter")  # the editor's save shortcut
    page.locator("#sdtune_ds_picked", has_text="Saved").first.wait_for(timeout=10_000)
    assert caption.read_text().endswith("typed here")
    page.locator("#sdtune_ds_undo").click()
    wait_value(page, "sdtune_ds_edit_result", lambda v: v.startswith("Undid: restored 1 caption(s)"))
    assert caption.read_text() == before


def test_train_the_tiny_demo_from_the_train_tab(page, app):
    open_tab(page, "Train")
    choose(page, "sdtune_train_model", "tiny.safetensors")
    choose(page, "sdtune_train_dataset", "demo/train")
    box(page, "sdtune_train_output_name").fill("browser_lora")
    page.locator("#sdtune_train_plan").click()
    wait_value(page, "sdtune_train_plan_text", lambda v: "network_dim = 32" in v)
    page.locator("#sdtune_train_advanced").get_by_text("Advanced settings").click()
    box(page, "sdtune_train_extra").fill(TINY_RUN)
    box(page, "sdtune_train_prompts").fill("sdtdemo, circle --w 64 --h 64 --s 2 --d 1")
    page.locator("#sdtune_train_start").click()
    wait_value(page, "sdtune_train_progress", lambda v: v.startswith(("Running", "Done", "Error")))
    final = wait_value(page, "sdtune_train_progress", lambda v: v.startswith(("Done", "Error", "Stopped")),
                       TRAIN_SECONDS)
    assert final.startswith("Done: Train browser_lora | 4 steps"), final
    lora = app.root / "models" / "Lora" / "browser_lora" / "browser_lora.safetensors"
    assert str(lora) in wait_value(page, "sdtune_train_result", lambda v: "LoRA files written" in v)
    assert lora.is_file()
    page.locator("#sdtune_train_chart img").wait_for(timeout=10_000)
    page.locator("#sdtune_train_samples img").first.wait_for(timeout=10_000)  # the epoch's sample image
    shot(page, "train")
    page.locator("#sdtune_train_start").click()  # the same name again is refused without Overwrite
    wait_value(page, "sdtune_train_progress", lambda v: "already holds a run named 'browser_lora'" in v)


def test_merge_two_models_from_the_merge_tab(page, app):
    open_tab(page, "Merge")
    choose(page, "sdtune_merge_a", "tiny.safetensors")
    choose(page, "sdtune_merge_b", "tiny_b.safetensors")
    box(page, "sdtune_merge_output").fill("browser_merge")
    page.locator("#sdtune_merge_run").click()
    final = wait_value(page, "sdtune_merge_status", lambda v: v.startswith(("Done", "Error", "Stopped")), 60)
    assert final.startswith("Done"), final
    assert (app.root / "models" / "Stable-diffusion" / "browser_merge.safetensors").is_file()
    shot(page, "merge")


def test_diagnose_the_trained_lora_from_the_repair_tab(page, app):
    lora = app.root / "models" / "Lora" / "browser_lora" / "browser_lora.safetensors"
    if not lora.is_file():
        pytest.skip("needs the LoRA test_train_the_tiny_demo_from_the_train_tab writes")
    open_tab(page, "Repair")
    page.locator("#sdtune_repair_refresh").click()  # the LoRA was written after the page was built
    choose(page, "sdtune_repair_lora", "browser_lora/browser_lora.safetensors")
    choose(page, "sdtune_repair_base", "tiny.safetensors")
    page.locator("#sdtune_repair_diagnose_run").click()
    final = wait_value(page, "sdtune_repair_diagnose_status", lambda v: v.startswith(("Done", "Error", "Stopped")),
                       60)
    assert final.startswith("Done"), final
    report = wait_value(page, "sdtune_repair_diagnose_result", lambda v: "browser_lora.safetensors" in v)
    assert "tiny.safetensors" in report
    page.locator("#sdtune_repair_chart img").wait_for(timeout=10_000)
    shot(page, "repair")
