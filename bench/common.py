"""Shared benchmark helpers: environment record, timing, copy bandwidth, result files and their table cells."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback

import torch


def environment(command: str | None = None) -> dict:
    """Device, versions, date and command: every result file carries them."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def device_slug(env: dict) -> str:
    """A folder name for the device, e.g. 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def results_folder(out: str | None, env: dict) -> str:
    """``out``, or by default bench/results/<device slug>."""
    return out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device_slug(env))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds of one ``fn()``: CUDA events on CUDA (synchronised before and after), wall clock elsewhere."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def stack_dumps(path: str | None, every: float, label: str):
    """While the block runs, every thread's Python stack appended to ``path`` every ``every`` seconds, after a
    ``label`` line, each dump flushed (where a long compile spends its time shows even when a time limit kills
    the process); nothing when ``path`` is None.  The dumps come from a Python thread holding the GIL
    (``sys._current_frames``): ``faulthandler.dump_traceback_later``, which reads the frames from a C thread
    without it, crashed the process (a segmentation fault in the middle of a dump) in two compiling steps on an
    H200, and a CPU process building deeply recursive strings within a minute (dumps every millisecond), which
    this helper's dumps ran through."""
    if path is None:
        yield
        return
    done = threading.Event()

    def dump(f, number: int) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        f.write(f"-- dump {number}, {time.strftime('%H:%M:%S')}\n")
        for ident, frame in sys._current_frames().items():
            if ident != threading.get_ident():
                f.write(f"Thread {names.get(ident, ident)} (most recent call last):\n")
                f.write("".join(traceback.format_stack(frame)))
        f.flush()

    def run(f) -> None:
        number = 0
        while not done.wait(every):
            number += 1
            dump(f, number)

    with open(path, "a") as f:
        f.write(f"== {label}\n")
        f.flush()
        thread = threading.Thread(target=run, args=(f,), name="stack_dumps", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def bench_ms(fn, warmup: int = 10, rep: int = 50, return_mode: str = "median") -> float:
    """Milliseconds of ``fn()``, the median (or with ``return_mode`` "min" the fastest) of its timed calls:
    ``triton.testing.do_bench`` (CUDA events, cache flush between runs) on CUDA, wall clock with
    synchronisation elsewhere (``warmup // 5`` untimed calls, then ``rep // 10``, at least 3)."""
    if return_mode not in ("median", "min"):
        raise ValueError(f"return_mode must be 'median' or 'min', got {return_mode!r}")
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode=return_mode))
    for _ in range(max(1, warmup // 5)):
        fn()
    times = [time_call(fn, torch.device("cpu")) * 1e3 for _ in range(max(3, rep // 10))]
    return min(times) if return_mode == "min" else sorted(times)[len(times) // 2]


def graph_ms(fn, setup=None, rep_ms: float = 20.0, most_calls: int = 100, replays: int = 10) -> float:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph of many calls: the GPU time of its
    kernels alone, with no host work or launch gaps between them (and no cache flush between calls).
    With ``setup``, ``setup()`` runs first on the capture stream and ``fn(setup())`` is timed: a backward
    needs its forward there, since autograd runs each backward kernel on its forward's stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        arg = setup() if setup is not None else None
        call = fn if setup is None else (lambda: fn(arg))
        for _ in range(3):
            call()
        start.record()
        for _ in range(5):
            call()
        end.record()
        end.synchronize()
        calls = max(1, min(most_calls, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                call()
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    torch.cuda.current_stream().wait_stream(stream)
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second, GB/s)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def l2_cache_bytes() -> int:
    """The CUDA device's L2 cache size in bytes (0 without CUDA): an op moving fewer bytes than this can be
    served from L2 when it repeats with no flush between calls (``graph_ms``)."""
    if not torch.cuda.is_available():
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0))


def check_arguments(parser, args, models: str | None = None, at_least_one: tuple = (), out: str = "out") -> None:
    """``parser.error`` (a one-line message naming the flag, exit status 2) before any measuring: an unknown model
    name in ``args.<models>``, a value below 1 in any of ``args.<name>`` for ``at_least_one`` (ints or lists of
    ints), an ``args.<out>`` folder that cannot be made or written (where the results would be lost after the
    run)."""
    from maskdit.config import parse_model_name
    from maskdit.files import make_output_folder

    for name in getattr(args, models) if models else ():
        try:
            parse_model_name(name)
        except ValueError as e:
            parser.error(f"--{models}: {e}")
    for key in at_least_one:
        value = getattr(args, key)
        if value is not None and min(value if isinstance(value, (list, tuple)) else [value]) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
    folder = getattr(args, out, None)
    if folder == "":
        parser.error(f"--{out} must name a folder, got ''")
    if folder:
        try:
            make_output_folder(folder, f"--{out}")
        except ValueError as e:
            parser.error(str(e))


def write_results(folder: str, name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Write ``name``.json and ``name``.md into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    jpath, mpath = os.path.join(folder, name + ".json"), os.path.join(folder, name + ".md")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=2)
    with open(mpath, "w") as f:
        f.write(markdown + "\n")
    return jpath, mpath


def fmt(value, spec: str, suffix: str = "") -> str:
    """A table cell: ``value`` formatted by ``spec`` followed by ``suffix``, or "-" for None."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


@contextlib.contextmanager
def module_constants(modules, **values):
    """Within the block, each of ``modules`` has the attributes ``values`` (launch-parameter constants of the
    kernel modules: ``BWD_STAGES``, ``num_warps``, ...); the previous values come back after it."""
    saved = [{name: getattr(m, name) for name in values} for m in modules]
    for m in modules:
        for name, value in values.items():
            setattr(m, name, value)
    try:
        yield
    finally:
        for m, before in zip(modules, saved):
            for name, value in before.items():
                setattr(m, name, value)


@contextlib.contextmanager
def kernel_constants_set(constants: dict):
    """Within the block, the constants ``{module: {NAME: value}}`` of the ``kernels.<module>`` modules (as
    ``--kernel-constant`` gives them, ``bench.train_step.kernel_constants``) are set; the previous values after."""
    import importlib

    with contextlib.ExitStack() as stack:
        for module, values in constants.items():
            stack.enter_context(module_constants([importlib.import_module(f"kernels.{module}")], **values))
        yield
