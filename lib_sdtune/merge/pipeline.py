"""A three-stage pipeline (read -> compute -> write) with bounded queues, so disk and math overlap.

Reading runs in one thread, writing in another, the math in the caller's thread (torch and file I/O
release the GIL). At most `depth` items wait between two stages, so memory stays near a few tensors
whatever the model size. Cancelling or any error stops all stages before the caller's writer closes.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Optional, TypeVar

from ..errors import SdtuneError

T = TypeVar("T")
_DONE = object()


class MergeCancelled(SdtuneError):
    """The user cancelled; nothing was written."""


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping; False when it is."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> object:
    """Get the next item, or _DONE when the pipeline is stopping."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _DONE


def run_pipeline(items: Iterable[T], fetch: Callable[[T], object], compute: Callable[[T, object], object],
                 write: Callable[[T, object], None], *, cancelled: Optional[Callable[[], bool]] = None,
                 on_done: Optional[Callable[[int, T], None]] = None,
                 after_write: Optional[Callable[[T, object, object], None]] = None,
                 depth: int = 2, threaded: bool = True) -> None:
    """fetch(item) in a reader thread, compute(item, fetched) here, write(item, computed) in a writer thread,
    then after_write(item, fetched, computed) (to recycle buffers) once the item is on disk."""
    if not threaded:
        for n, item in enumerate(items, 1):
            if cancelled is not None and cancelled():
                raise MergeCancelled("merge cancelled; nothing was written")
            fetched = fetch(item)
            value = compute(item, fetched)
            write(item, value)
            if after_write is not None:
                after_write(item, fetched, value)
            if on_done is not None:
                on_done(n, item)
        return

    stop = threading.Event()
    errors: list[BaseException] = []
    read_q: queue.Queue = queue.Queue(maxsize=depth)
    write_q: queue.Queue = queue.Queue(maxsize=depth)

    def reader() -> None:
        try:
            for item in items:
                if not _put(read_q, (item, fetch(item)), stop):
                    return
            _put(read_q, _DONE, stop)
        except BaseException as e:  # handed to the caller's thread
            errors.append(e)
            stop.set()

    def writer() -> None:
        try:
            while True:
                got = _get(write_q, stop)
                if got is _DONE:
                    return
                item, fetched, value = got  # type: ignore[misc]
                write(item, value)
                if after_write is not None:
                    after_write(item, fetched, value)
                del fetched, value
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=reader, name="sdtune-merge-read", daemon=True),
               threading.Thread(target=writer, name="sdtune-merge-write", daemon=True)]
    for t in threads:
        t.start()
    finished = False
    try:
        n = 0
        while True:
            got = _get(read_q, stop)
            if got is _DONE:
                break
            if cancelled is not None and cancelled():
                raise MergeCancelled("merge cancelled; nothing was written")
            item, fetched = got  # type: ignore[misc]
            value = compute(item, fetched)
            if not _put(write_q, (item, fetched, value), stop):
                break
            del fetched, value
            n += 1
            if on_done is not None:
                on_done(n, item)
        _put(write_q, _DONE, stop)
        threads[1].join()
        finished = True
    finally:
        if not finished:
            stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
