"""A separate process for the buffered writer's shutdown and fork tests.

Run as ``python -m tests.writer_process SCENARIO [N]`` with ``DATABASE_URL`` naming a database
that has the schema (``migrate`` makes it), or served by gunicorn as
``tests.writer_process:application`` or uvicorn as ``tests.writer_process:asgi_application``.
It uses the buffered writer with a flush interval of an hour, so only a flush at exit (or an
explicit ``flush()``) can write the rows. Scenarios print one JSON line each.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys
import threading
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
os.environ.setdefault("DJANGO_CFG_RPC__WRITE_MODE", "buffered")
os.environ.setdefault("DJANGO_CFG_RPC__BUFFER_FLUSH_INTERVAL", "3600")

import django  # noqa: E402

django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

from django_rpc_audit import get_rpc_client  # noqa: E402
from django_rpc_audit.transports import register_local_handler  # noqa: E402
from django_rpc_audit.writers import (  # noqa: E402
    BufferedLogWriter,
    flush,
    get_writer,
    install_sigterm_flush,
    lifecycle,
    writer_stats,
)

register_local_handler("test.echo", lambda params: {"echo": params})

application = get_wsgi_application()
asgi_application = get_asgi_application()


def emit(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def make_calls(count: int, who: str) -> None:
    client = get_rpc_client()
    for n in range(count):
        client.call("test.echo", {"n": n, "who": who})


def writer_thread_ident() -> int | None:
    writer = get_writer()
    assert isinstance(writer, BufferedLogWriter)
    thread = writer._thread
    # The kernel's thread id: unlike ident, never reused while the parent's thread lives.
    return thread.native_id if thread is not None else None


def call_in_child(n: int) -> int:
    """One call from a multiprocessing child (a ``Process`` target or a ``Pool`` task)."""
    get_rpc_client().call("test.echo", {"n": n, "who": "child"})
    return os.getpid()


_queue: Any = None


def _share_queue(queue: Any) -> None:
    global _queue
    _queue = queue


def call_then_wait(n: int) -> None:
    pid = call_in_child(n)
    _queue.put(pid)
    time.sleep(60)  # until terminate()


def calls_in_child(first: int, count: int) -> None:
    for n in range(first, first + count):
        call_in_child(n)


def multiprocessing_children(how: str, count: int) -> None:
    """``count`` calls made in multiprocessing children; the parent makes none. Children end
    through ``os._exit`` (fork, forkserver), which runs no exit handler."""
    import multiprocessing

    start_method, _, shape = how.partition(":")
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # As a Django project would: the server imports Django once, its children fork from it.
        context.set_forkserver_preload([__name__])
    # Each spawn or forkserver child imports Django anew: two of them are enough.
    workers = 4 if start_method == "fork" else 2
    if shape == "process":
        per_child = -(-count // workers)
        children = [
            context.Process(target=calls_in_child, args=(first, min(per_child, count - first)))
            for first in range(0, count, per_child)
        ]
        for child in children:
            child.start()
        for child in children:
            child.join()
        emit(exitcodes=sorted({child.exitcode for child in children}))
    elif shape == "pool":
        pool = context.Pool(workers)
        pids = pool.map(call_in_child, range(count))
        pool.close()
        pool.join()
        emit(children=len(set(pids)))
    elif shape == "with-pool":
        # Pool.__exit__ terminates the workers: SIGTERM while they wait for work.
        with context.Pool(workers) as pool:
            pids = pool.map(call_in_child, range(count))
        emit(children=len(set(pids)))
    elif shape == "unseen-sigterm":
        # A child whose main thread misses its SIGTERM (see the scenario of that name). The
        # forkserver preloads this module by its name, so that the children it forks have
        # Django set up already: the server resets the wakeup fd after each fork.
        this = importlib.import_module("tests.writer_process")
        context.set_forkserver_preload(["tests.writer_process"])
        child = context.Process(target=this.sigterm_the_main_thread_never_sees, args=(count,))
        child.start()
        child.join(timeout=30)
        exitcode = child.exitcode
        if exitcode is None:
            child.kill()
        emit(exitcodes=[exitcode])
    elif shape == "terminate-busy":
        # The workers are inside a task (after their call) when terminate() sends SIGTERM:
        # only the SIGTERM flush can write their rows.
        queue = context.SimpleQueue()
        pool = context.Pool(workers, initializer=_share_queue, initargs=(queue,))
        pool.map_async(call_then_wait, range(count))
        done = [queue.get() for _ in range(workers)]  # a call made in each worker, waiting
        pool.terminate()
        pool.join()
        emit(children=len(set(done)))
    else:
        raise SystemExit(f"unknown multiprocessing shape {how!r}")


def sigterm_the_main_thread_never_sees(count: int) -> None:
    """The C handler notes SIGTERM in another thread; the main thread, blocked in a lock wait
    the signal did not interrupt, would never run the Python handler (as a Pool worker waiting
    for work may not): the watch sends it SIGTERM again."""
    make_calls(count, "exit")
    emit(buffered=writer_stats().buffered, written=writer_stats().written)
    never = threading.Lock()

    def signal_this_thread_once_the_main_thread_waits() -> None:
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=signal_this_thread_once_the_main_thread_waits).start()
    never.acquire()
    never.acquire()  # not reached past: SIGTERM's default action ends the process


def install_counting_sigterm_handler() -> list[int]:
    """Make SIGTERM's handler one that counts its calls, then install the SIGTERM flush over
    it (as over a server's handler); return the list it appends to."""
    handled: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
    assert install_sigterm_flush()
    return handled


def main(scenario: str, count: int) -> None:
    if scenario == "migrate":
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
    elif scenario == "report":
        from django_rpc_audit.models import RPCLog

        rows = list(RPCLog.objects.values_list("params", "status"))
        emit(
            count=len(rows),
            statuses=sorted({status for _, status in rows}),
            by_who={
                who: sum(1 for params, _ in rows if params.get("who") == who)
                for who in ("parent", "child", "exit", "web")
            },
        )
    elif scenario == "exit":
        # Calls, then a normal interpreter exit: only the atexit flush writes the rows.
        make_calls(count, "exit")
        emit(buffered=writer_stats().buffered, written=writer_stats().written)
    elif scenario == "sigterm":
        # A bare process killed by SIGTERM runs no exit handler: the SIGTERM flush writes.
        make_calls(count, "exit")
        emit(buffered=writer_stats().buffered, written=writer_stats().written)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # not reached: SIGTERM's default action ends the process
    elif scenario == "sigterm-inside-the-writer":
        # SIGTERM lands while the main thread is inside the writer, holding its lock (as in
        # the middle of buffering a call): the handler must not wait for that lock forever.
        make_calls(count, "exit")
        writer = get_writer()
        assert isinstance(writer, BufferedLogWriter)
        emit(buffered=writer_stats().buffered)
        with writer._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # not reached: the handler gives up waiting and SIGTERM ends us
    elif scenario == "sigterm-the-main-thread-never-sees":
        sigterm_the_main_thread_never_sees(count)
    elif scenario == "sigterm-handled-once":
        # The handler that was SIGTERM's before runs once per SIGTERM: the watch never sends
        # again a signal the handler has seen, however long the process lives on.
        handled = install_counting_sigterm_handler()
        make_calls(count, "exit")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(4 * lifecycle._SIGTERM_NUDGE_INTERVAL)
        emit(handled=len(handled), buffered=writer_stats().buffered)
    elif scenario == "sigterm-in-a-forked-child":
        # A forked child's SIGTERM is the child's: the parent's watch never hears of it.
        handled = install_counting_sigterm_handler()
        make_calls(count, "parent")
        pid = os.fork()
        if pid == 0:
            make_calls(10, "child")
            os.kill(os.getpid(), signal.SIGTERM)
            emit(who="child", handled=len(handled), buffered=writer_stats().buffered)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        time.sleep(4 * lifecycle._SIGTERM_NUDGE_INTERVAL)
        emit(who="parent", child_status=status, handled=len(handled))
    elif scenario == "sigterm-stops-a-command":
        # A command's loop (rpc_logs_ingest, rpc_webhooks_deliver) stopped by SIGTERM while
        # the writer's thread, and so the SIGTERM watch, runs; the flush handler is SIGTERM's
        # again after it. The process must live on: the watch saw that SIGTERM too.
        from django_rpc_audit.management.stopping import stop_on_signals

        assert install_sigterm_flush()
        make_calls(count, "exit")
        assert writer_thread_ident() is not None
        assert lifecycle._sigterm_watch._thread_pid == os.getpid()
        stopped = threading.Event()
        with stop_on_signals(stopped.set):
            os.kill(os.getpid(), signal.SIGTERM)
            stopped.wait(5)
        time.sleep(4 * lifecycle._SIGTERM_NUDGE_INTERVAL)
        # The same with a handler of someone else's (a test's, a library's) for a moment.
        flush_handler = signal.getsignal(signal.SIGTERM)
        handled: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        pipe = select.poll()
        pipe.register(lifecycle._sigterm_watch._read_fd, select.POLLIN)
        deadline = time.monotonic() + 30
        while pipe.poll(0) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the watch has read the signal
        signal.signal(signal.SIGTERM, flush_handler)
        time.sleep(4 * lifecycle._SIGTERM_NUDGE_INTERVAL)
        emit(
            stopped=stopped.is_set(),
            other_handled=len(handled),
            flush_handler_back=lifecycle._is_sigterm_flush(signal.getsignal(signal.SIGTERM)),
            buffered=writer_stats().buffered,
        )
    elif scenario == "fork":
        make_calls(count, "parent")
        parent_thread = writer_thread_ident()
        pid = os.fork()
        if pid == 0:
            # The child inherits the parent's buffer in memory; it must write only its own.
            inherited = writer_stats().buffered
            make_calls(10, "child")
            child_thread = writer_thread_ident()
            flushed = flush(timeout=30)
            emit(
                who="child",
                inherited=inherited,
                flushed=flushed,
                written=writer_stats().written,
                own_thread=child_thread is not None
                and child_thread != parent_thread
                and threading.current_thread().native_id != child_thread,
            )
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        emit(who="parent", child_status=status, buffered=writer_stats().buffered)
    elif scenario.startswith("mp-"):
        multiprocessing_children(scenario.removeprefix("mp-"), count)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
