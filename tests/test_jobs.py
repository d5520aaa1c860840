"""Background jobs: progress is visible while running, Stop is honoured, errors become text, one GPU job at a time."""

import threading

import pytest

from lib_sdtune.errors import SdtuneError
from lib_sdtune.jobs import JobRunner


def test_a_job_reports_progress_and_its_result():
    gate = threading.Event()
    runner = JobRunner()

    def work(ctx):
        ctx.progress(1, 4, {"loss": 0.5})
        ctx.log("epoch 1")
        gate.wait(5)
        ctx.progress(4, 4, "saving")
        return "out.safetensors"

    job = runner.start("train", work)
    for _ in range(100):
        snap = job.snapshot()
        if snap.done == 1:
            break
        threading.Event().wait(0.01)
    assert snap.running and snap.fraction == 0.25 and snap.info == {"loss": 0.5} and snap.log == ("epoch 1",)
    gate.set()
    snap = runner.wait(job.id, 5)
    assert snap.state == "done" and snap.result == "out.safetensors" and snap.message == "saving"


def test_stop_is_honoured_and_a_second_gpu_job_is_refused_meanwhile():
    events = []
    runner = JobRunner(before_gpu=lambda: events.append("unload"), after_gpu=lambda: events.append("reload"))
    started = threading.Event()

    def work(ctx):
        started.set()
        while not ctx.cancelled():
            threading.Event().wait(0.01)
        return "partial"

    job = runner.start("train", work)
    started.wait(5)
    assert runner.busy().title == "train"
    with pytest.raises(SdtuneError, match="'train' is still running"):
        runner.start("merge", lambda ctx: None)
    cpu_job = runner.start("tag edit", lambda ctx: 3, uses_gpu=False)  # CPU jobs may run beside it
    assert runner.wait(cpu_job.id, 5).result == 3
    assert runner.cancel() is True
    assert runner.wait(job.id, 5).state == "cancelled"
    assert events == ["unload", "reload"] and runner.busy() is None


def test_errors_become_readable_text():
    runner = JobRunner()

    def bad_input(ctx):
        raise SdtuneError("model.safetensors: not a checkpoint")

    def bug(ctx):
        return {}["missing"]

    a, b = runner.start("a", bad_input), runner.start("b", bug, uses_gpu=False)
    sa, sb = runner.wait(a.id, 5), runner.wait(b.id, 5)
    assert sa.state == "failed" and sa.error == "model.safetensors: not a checkpoint"
    assert sb.state == "failed" and sb.error == "KeyError: 'missing'" and sb.log[-1].startswith("Error:")


def test_the_ui_status_line_follows_a_job_to_its_end():
    from lib_sdtune.webui.jobs_view import follow, job_status, start_job

    runner = JobRunner()

    def work(ctx):
        ctx.progress(3, 6, {"loss": 0.123456, "it/s": 2.0})
        threading.Event().wait(0.05)
        return "ok"

    job, err = start_job(runner, "merge", work)
    lines = [job_status(s) for s in follow(job, interval=0.01)]
    assert err is None and lines[-1].startswith("Done: merge | 3/6 (50%) | loss 0.1235, it/s 2")
    blocker, _ = start_job(runner, "train", lambda ctx: threading.Event().wait(0.2))
    second, err = start_job(runner, "merge", lambda ctx: None)
    assert second is None and err.startswith("Error: 'train' is still running")
    runner.wait(blocker.id, 5)
