"""Shared pieces of the benchmark modules: timing, memory, fragments.

A benchmark module `benchmarks/bench_<name>.py` is run as
`python -m benchmarks.bench_<name> [--quick] [--results-dir DIR]` with the
backend taken from `KERAS_BACKEND`. It writes one markdown fragment,
`<results-dir>/<name>_<backend>.md`, through `write_fragment`, and may write
a backend-independent `<results-dir>/<name>.md` (method notes) that
`benchmarks.run` places before the per-backend fragments.
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("keras", "tensorflow-cpu", "tensorflow", "torch", "jax", "jaxlib")
# Environment variables that change how the backends use the machine.
SETTINGS = (
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "XLA_FLAGS",
    "CUDA_VISIBLE_DEVICES",
)


def parse_args(description, argv=None, add_arguments=None):
    """The command line every benchmark module accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few repeats and small shapes: a smoke run, not for citing",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the markdown fragment is written",
    )
    if add_arguments is not None:
        add_arguments(parser)
    return parser.parse_args(argv)


def backend():
    import keras

    return keras.backend.backend()


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_description():
    """`CPU` or the accelerator the current backend computes on."""
    name = backend()
    if name == "torch":
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}"
        return f"CPU, {torch.get_num_threads()} torch threads"
    if name == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return f"CPU, {os.cpu_count()} cores"
        return f"{device.platform.upper()}: {device.device_kind}"
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return (
            f"GPU: {gpus[0].name}" if gpus else f"CPU, {os.cpu_count()} cores"
        )
    return "unknown"


def on_gpu():
    return device_description().startswith("GPU")


def fragment_heading(title):
    """A `###` heading naming the backend, its version and the device."""
    name = backend()
    package = {"tensorflow": "tensorflow-cpu"}.get(name, name)
    backend_version = version(package) or version(name)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    settings = "".join(
        f", {key}={os.environ[key]}" for key in SETTINGS if key in os.environ
    )
    return (
        f"### {title}: {name} backend\n\n"
        f"{name} {backend_version}, keras {version('keras')}, keras-kd "
        f"{source_revision()}; {device_description()}{settings}; measured "
        f"{stamp}, load average at the end {os.getloadavg()[0]:.2f}.\n"
    )


def source_revision():
    """The commit of the measured keras_kd, marked when it has edits."""

    def git(*args):
        return subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "keras_kd")
    except (OSError, subprocess.SubprocessError):
        return "(unknown revision)"
    if not commit:
        return "(unknown revision)"
    return f"{commit}" + (" with uncommitted edits" if dirty else "")


def write_fragment(stem, text, results_dir=RESULTS_DIR, per_backend=True):
    """Writes `<stem>_<backend>.md` (or `<stem>.md`) and returns its path."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    name = f"{stem}_{backend()}.md" if per_backend else f"{stem}.md"
    path = results_dir / name
    path.write_text(text.rstrip() + "\n")
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------ timing


def block(x):
    """Waits until every array in `x` (nested tuples) has been computed."""
    name = backend()
    if name == "jax":
        import jax

        jax.block_until_ready(x)
    elif name == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif name == "tensorflow" and on_gpu():
        import tensorflow as tf

        tf.test.experimental.sync_devices()
    return x


def time_interleaved(fns, repeats, warmup=2, min_sample_s=0.05):
    """Samples of seconds per call for several callables, interleaved.

    Every round calls each function in a shuffled order, so that load from
    other processes falls on all of them alike and the ratios between them
    stay meaningful. A fast function is called several times per round,
    enough to fill `min_sample_s`, and every call is one sample: on a
    loaded machine a call now and then waits tens of milliseconds for a
    descheduled thread, which a median over calls ignores while an average
    over a loop would not.

    Args:
        fns: dict name -> zero-argument callable that blocks until done.
        repeats: rounds.
        warmup: untimed calls per function first (compilation, caches).
        min_sample_s: the least time per function and round.

    Returns:
        dict name -> list of seconds per call.
    """
    loops = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        single = _seconds(fn)
        if single < min_sample_s:
            # The best of several calls: one preempted call must not cut
            # the number of calls per round.
            single = min(single, *(_seconds(fn) for _ in range(5)))
        loops[name] = max(1, int(min_sample_s / max(single, 1e-7)))
    samples = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            samples[name] += [_seconds(fn) for _ in range(loops[name])]
    return samples


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(samples):
    """(median, first quartile, third quartile) of a list of numbers."""
    if len(samples) < 4:
        med = statistics.median(samples)
        return med, min(samples), max(samples)
    q1, med, q3 = statistics.quantiles(samples, n=4)
    return med, q1, q3


def format_ms(samples):
    med, q1, q3 = summary(samples)
    return f"{fmt(med * 1e3)} ({fmt(q1 * 1e3)}-{fmt(q3 * 1e3)})"


def fmt(x, digits=3):
    """A number with `digits` significant digits, no exponent if avoidable."""
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return f"{x:.{digits - 1}e}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def value_and_grad(loss_fn):
    """The backend's usual fast path for a loss and its student gradient.

    `loss_fn(t, s)` returns a scalar; the result `run(t, s)` returns
    `(loss, d loss / d s)` and blocks until both are computed: `jax.jit` of
    `jax.value_and_grad`, a `tf.function` around a `GradientTape`, or eager
    torch autograd (what `model.fit` runs on each backend by default).
    """
    name = backend()
    if name == "jax":
        import jax

        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=1))

        def run(t, s):
            return block(compiled(t, s))

        run.lower = compiled.lower
        return run
    if name == "tensorflow":
        import tensorflow as tf

        @tf.function
        def compiled(t, s):
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = loss_fn(t, s)
            return value, tape.gradient(value, s)

        def run(t, s):
            return block(compiled(t, s))

        run.trace = compiled.get_concrete_function
        return run
    import torch

    def run(t, s):
        s = s.detach().requires_grad_(True)
        value = loss_fn(t, s)
        (grad,) = torch.autograd.grad(value, s)
        return block((value.detach(), grad))

    return run


def forward(loss_fn):
    """The backend's usual fast path for the loss value alone."""
    name = backend()
    if name == "jax":
        import jax

        compiled = jax.jit(loss_fn)
    elif name == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(loss_fn)
    else:
        compiled = loss_fn

    def run(t, s):
        return block(compiled(t, s))

    return run


# ------------------------------------------------------------------ memory


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_growth(fn):
    """Bytes by which the resident set peaks above its level before `fn()`.

    Linux only: writing 5 to /proc/self/clear_refs resets the high-water
    mark VmHWM, so the peak of this one call is measured, not the peak of
    the whole process. Arrays above glibc's mmap threshold (32 MB) are
    mapped and unmapped per allocation, so for large tensors the growth is
    the memory the call really needed at once.
    """
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = fn()
    peak = _status("VmHWM")
    del result
    return peak - base


def peak_memory_growth(fn):
    """Peak extra memory of `fn()` in bytes, and how it was measured.

    On a GPU the framework's own peak counter is used (torch, TensorFlow;
    JAX reports only its compile-time analysis, see `bench_kl`); on a CPU
    the growth of the resident set (`peak_rss_growth`).
    """
    name = backend()
    if on_gpu() and name == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        peak = torch.cuda.max_memory_allocated()
        del result
        return peak - base, "torch.cuda.max_memory_allocated"
    if on_gpu() and name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
        base = tf.config.experimental.get_memory_info("GPU:0")["current"]
        result = fn()
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        del result
        return peak - base, "tf get_memory_info peak"
    if on_gpu():
        return None, "not measured on this device"
    return peak_rss_growth(fn), "peak RSS growth"


def run_child(module, args, env=None, timeout=600):
    """Runs `python -m module *args` in a fresh interpreter, returns the
    JSON object printed on its last stdout line."""
    environ = dict(os.environ, **(env or {}))
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"{module} {' '.join(args)} failed:\n{completed.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


def copy_bandwidth(nbytes=512 * 2**20, repeats=7):
    """Memory bandwidth in bytes/s of a large NumPy copy (read + write).

    Both buffers are touched first, so page faults are not timed; the best
    of `repeats` is the machine's floor, not its typical speed.
    """
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def machine_summary():
    """One line: CPU model, cores, memory, OS and Python."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory = f"{_meminfo_total() / 2**30:.1f} GiB"
    except OSError:
        memory = "unknown memory"
    return (
        f"{model}, {os.cpu_count()} cores, {memory}, "
        f"{platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _meminfo_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal")
