"""What the benchmark modules share: reports, timing, compiled steps,
inputs, memory, and the implementations keras-kd is measured against.

A benchmark module `benchmarks/bench_<name>.py` runs as
`python -m benchmarks.bench_<name> [--quick] [--results-dir DIR]` on the
backend named by `KERAS_BACKEND`. It prints markdown and writes it to
`<results-dir>/<name>_<backend>.md` (`write_fragment`), headed by the
command that reproduces it, the device and the date (`fragment_heading`).
`BENCHMARKS.md` quotes these fragments.

Only the public API of keras-kd is used (`keras_kd.ops.<function>`,
`keras_kd.losses.<Class>`, `keras_kd.Distiller`, ...).
"""

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Environment variables that change how the backends use the machine.
SETTINGS = (
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "XLA_FLAGS",
    "CUDA_VISIBLE_DEVICES",
)

# ----------------------------------------------------------------- reports


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
    """`CPU, ...` or the accelerator the current backend computes on."""
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
            return "CPU"
        return f"GPU: {device.device_kind}"
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"GPU: {details.get('device_name', gpus[0].name)}"
        return "CPU"
    return "unknown"


def on_gpu():
    return device_description().startswith("GPU")


def command_line():
    """The command that ran this process, as one would type it."""
    module = Path(sys.argv[0]).stem
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--results-dir"):
            skip = arg == "--results-dir"
            continue
        args.append(arg)
    settings = [
        f"{key}={shlex.quote(os.environ[key])}"
        for key in SETTINGS
        if key in os.environ
    ]
    words = settings + [f"KERAS_BACKEND={backend()}", "python", "-m"]
    return " ".join(words + [f"benchmarks.{module}"] + args)


def fragment_heading(title):
    """A `###` heading, then the command, versions, device and date."""
    name = backend()
    package = {"tensorflow": "tensorflow-cpu"}.get(name, name)
    backend_version = version(package) or version(name)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"### {title}: {name} backend\n\n"
        f"`{command_line()}`\n\n"
        f"{name} {backend_version}, keras {version('keras')}, keras-kd "
        f"{source_revision()}; {device_description()} ({machine_summary()}); "
        f"measured {stamp}, load average {os.getloadavg()[0]:.2f}.\n"
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


def write_fragment(stem, text, results_dir=RESULTS_DIR):
    """Writes `<stem>_<backend>.md` and returns its path."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{stem}_{backend()}.md"
    path.write_text(text.rstrip() + "\n")
    print(f"wrote {path}")
    return path


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
        f"{platform.system()}, Python {platform.python_version()}"
    )


def _meminfo_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemTotal")


def summary(samples):
    """(median, first quartile, third quartile) of a list of numbers."""
    if len(samples) < 4:
        med = statistics.median(samples)
        return med, min(samples), max(samples)
    q1, med, q3 = statistics.quantiles(samples, n=4)
    return med, q1, q3


def median(samples):
    return summary(samples)[0]


def format_ms(samples):
    """`median (first quartile-third quartile)` in milliseconds."""
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


def time_interleaved(fns, repeats, warmup=2, min_sample_s=0.05, cpu=False):
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
        cpu: also return the CPU time of this process (all its threads)
            per call: other processes stretch the wall time of whatever
            runs at that moment, not the CPU time spent on the work.

    Returns:
        dict name -> list of seconds per call; with `cpu`, a pair of such
        dicts (wall, CPU).
    """
    loops = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        single = _seconds(fn)[0]
        if single < min_sample_s:
            # The best of several calls: one preempted call must not cut
            # the number of calls per round.
            single = min(single, *(_seconds(fn)[0] for _ in range(5)))
        loops[name] = max(1, int(min_sample_s / max(single, 1e-7)))
    wall = {name: [] for name in fns}
    process = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            for _ in range(loops[name]):
                seconds, cpu_seconds = _seconds(fns[name])
                wall[name].append(seconds)
                process[name].append(cpu_seconds)
    return (wall, process) if cpu else wall


def _seconds(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


# ---------------------------------------------------------- compiled steps


def value_and_grad(loss_fn, argnums=1, jit_compile=False):
    """The backend's usual fast path for a loss and its gradients.

    `loss_fn(*args)` returns a scalar; `run(*args)` returns `(loss, grad)`
    (a tuple of gradients when `argnums` is a tuple) and blocks until they
    are computed: `jax.jit` of `jax.value_and_grad`, a `tf.function`
    around a `GradientTape` (with XLA if `jit_compile`; `model.fit` uses
    XLA on a GPU, not on a CPU), or eager torch autograd (what `model.fit`
    runs on each backend by default). On JAX, `run.lower` is the jitted
    function's `lower`, for `memory_analysis()`; on TensorFlow,
    `run.trace(*args)` traces without running.
    """
    many = isinstance(argnums, tuple)
    indices = argnums if many else (argnums,)
    name = backend()
    if name == "jax":
        import jax

        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=argnums))

        def run_jax(*args):
            return block(compiled(*args))

        run_jax.lower = compiled.lower
        return run_jax
    if name == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit_compile)
        def compiled_tf(*args):
            with tf.GradientTape() as tape:
                watched = [args[i] for i in indices]
                tape.watch(watched)
                value = loss_fn(*args)
            grads = tape.gradient(value, watched)
            return value, tuple(grads) if many else grads[0]

        def run_tf(*args):
            return block(compiled_tf(*args))

        run_tf.trace = compiled_tf.get_concrete_function
        return run_tf
    import torch

    def run_torch(*args):
        args = list(args)
        for i in indices:
            args[i] = args[i].detach().requires_grad_(True)
        value = loss_fn(*args)
        grads = torch.autograd.grad(value, [args[i] for i in indices])
        return block((value.detach(), tuple(grads) if many else grads[0]))

    return run_torch


def teacher_inference(teacher):
    """The teacher's forward pass in inference mode, compiled the way the
    distillers' train functions are on this backend (`jax.jit` of
    `stateless_call`, a `tf.function`, eager torch under `no_grad`),
    without `predict_on_batch`'s per-call overhead: the lowest honest
    floor for a distillation step."""
    name = backend()
    if name == "jax":
        import jax

        @jax.jit
        def forward(trainable, frozen, x):
            return teacher.stateless_call(trainable, frozen, x)[0]

        def run_jax(x):
            # The current values: `fit` replaces (and frees) the old arrays.
            trainable = [v.value for v in teacher.trainable_variables]
            frozen = [v.value for v in teacher.non_trainable_variables]
            return block(forward(trainable, frozen, x))

        return run_jax
    if name == "tensorflow":
        import tensorflow as tf

        forward_tf = tf.function(lambda x: teacher(x, training=False))
        return lambda x: block(forward_tf(x))
    import torch

    def run_torch(x):
        with torch.no_grad():
            return block(teacher(x, training=False))

    return run_torch


# ------------------------------------------------------------------ inputs


def random_logits(shape, scale=2.0, seed=0):
    """Teacher and student logits, float32 NumPy, from N(0, scale^2)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    s = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return t, s


def normal(shape, dtype="float32", seed=0, scale=1.0):
    """N(0, scale^2) in `dtype`, drawn on the device where the backend
    allows it (no host copy of a multi-gigabyte input)."""
    name = backend()
    if name == "torch":
        import torch

        gen = torch.Generator(device="cuda" if on_gpu() else "cpu")
        gen.manual_seed(seed)
        x = torch.randn(shape, generator=gen, device=gen.device) * scale
        return x.to(getattr(torch, dtype))
    if name == "jax":
        import jax

        x = jax.random.normal(jax.random.key(seed), shape) * scale
        return x.astype(dtype)
    from keras import ops

    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return ops.cast(ops.convert_to_tensor(x * np.float32(scale)), dtype)


def to_tensor(x):
    from keras import ops

    return ops.convert_to_tensor(x)


def max_difference(a, b):
    """max |a - b|, computed on the device, as a Python float."""
    from keras import ops

    diff = ops.abs(ops.cast(a, "float32") - ops.cast(b, "float32"))
    return float(ops.convert_to_numpy(ops.max(diff)))


def relative_norm_difference(a, b):
    """||a - b|| / ||b||, computed on the device."""
    from keras import ops

    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    num = ops.sqrt(ops.sum(ops.square(a - b)))
    return float(ops.convert_to_numpy(num / ops.sqrt(ops.sum(ops.square(b)))))


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


def peak_memory(run, args):
    """Peak extra memory of `run(*args)` in bytes, and how it was measured.

    JAX: the compiled program's `memory_analysis()`, scratch plus outputs
    (`run` from `value_and_grad`). A GPU: the framework's peak counter
    (the returned gradients included). A CPU: the growth of the resident
    set (`peak_rss_growth`), which is only clean in a fresh process
    (`run_child`) with tracing done before.
    """
    name = backend()
    if name == "jax" and hasattr(run, "lower"):
        analysis = run.lower(*args).compile().memory_analysis()
        found = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        return found, "XLA memory_analysis, scratch + outputs"
    if on_gpu() and name == "torch":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = run(*args)
        peak = torch.cuda.max_memory_allocated()
        del result
        return peak - base, "torch.cuda.max_memory_allocated growth"
    if on_gpu() and name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
        base = tf.config.experimental.get_memory_info("GPU:0")["current"]
        result = run(*args)
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        del result
        return peak - base, "tf get_memory_info peak growth"
    return peak_rss_growth(lambda: run(*args)), "peak RSS growth"


def run_child(module, args, env=None, timeout=600):
    """Runs `python -m module *args` in a fresh interpreter, returns the
    JSON object printed on its last stdout line."""
    environ = dict(os.environ, KERAS_BACKEND=backend(), **(env or {}))
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


def print_json(value):
    """The last stdout line of a `run_child` child."""
    print(json.dumps(value), flush=True)


def copy_bandwidth(nbytes=512 * 2**20, repeats=10):
    """Memory bandwidth in bytes/s (read + write) of a large copy: on the
    device for a GPU, a NumPy copy on a CPU. The best of `repeats`, buffers
    touched first: the machine's floor, not its typical speed."""
    if on_gpu() and backend() in ("torch", "jax"):
        src = normal((nbytes // 4,), "float32")
        if backend() == "torch":
            import torch

            dst = torch.empty_like(src)
            copy = lambda: dst.copy_(src)  # noqa: E731
        else:
            import jax

            step = jax.jit(lambda x: x + 1.0)
            copy = lambda: step(src)  # noqa: E731
        copy()
    else:
        src = np.ones(nbytes // 4, dtype=np.float32)
        dst = np.zeros_like(src)
        copy = lambda: np.copyto(dst, src)  # noqa: E731
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        block(copy())
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# ------------------------------------------------------------------- peers
#
# What keras-kd is measured against. A divergence implementation is
# `rows(t, s) -> [batch]`, `T**2` times the per-row divergence of the
# teacher logits `t` and the student logits `s` at temperature `T`; peers
# with a reduction of their own also give `loss(t, s) -> scalar`, the batch
# mean the way their users call them.

DIVERGENCES = ("kl", "symmetric_kl", "jsd", "global_pointer")


def plain_rows(name, temperature):
    """The textbook `keras.ops` formula of a divergence, per row, left to
    the backend's autodiff (JSD: `beta = 0.5`)."""
    from keras import ops

    t2 = temperature * temperature

    def logs(t, s):
        return (
            ops.log_softmax(t / temperature, axis=-1),
            ops.log_softmax(s / temperature, axis=-1),
        )

    def kl(t, s):
        lp, lq = logs(t, s)
        return ops.sum(ops.exp(lp) * (lp - lq), axis=-1) * t2

    def symmetric_kl(t, s):
        lp, lq = logs(t, s)
        return ops.sum((ops.exp(lp) - ops.exp(lq)) * (lp - lq), axis=-1) * t2

    def jsd(t, s):
        lp, lq = logs(t, s)
        p, q = ops.exp(lp), ops.exp(lq)
        lm = ops.log(0.5 * p + 0.5 * q)
        both = ops.sum(p * (lp - lm), -1) + ops.sum(q * (lq - lm), -1)
        return 0.5 * both * t2

    def global_pointer(t, s):
        a, b = s / temperature, t / temperature
        return ops.sum((ops.sigmoid(a) - ops.sigmoid(b)) * (a - b), -1) * t2

    return {
        "kl": kl,
        "symmetric_kl": symmetric_kl,
        "jsd": jsd,
        "global_pointer": global_pointer,
    }[name]


def keras_softmax_kl(temperature):
    """`keras.losses.KLDivergence` the way users apply it to logits: on the
    softmax probabilities of teacher and student, times `T**2`.
    Returns `(loss, rows)`."""
    import keras
    from keras import ops

    t2 = temperature * temperature
    loss = keras.losses.KLDivergence()
    rows = keras.losses.KLDivergence(reduction="none")

    def probabilities(t, s):
        return (
            ops.softmax(t / temperature, axis=-1),
            ops.softmax(s / temperature, axis=-1),
        )

    return (
        lambda t, s: loss(*probabilities(t, s)) * t2,
        lambda t, s: rows(*probabilities(t, s)) * t2,
    )


def torch_kl_div(temperature):
    """torch's `F.kl_div(log_softmax(s/T), log_softmax(t/T),
    log_target=True, reduction="batchmean") * T**2`; `(loss, rows)`."""
    import torch.nn.functional as F

    t2 = temperature * temperature

    def terms(t, s):
        return (
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
        )

    def loss(t, s):
        value = F.kl_div(*terms(t, s), log_target=True, reduction="batchmean")
        return value * t2

    def rows(t, s):
        value = F.kl_div(*terms(t, s), log_target=True, reduction="none")
        return value.sum(-1) * t2

    return loss, rows


def optax_kl(temperature):
    """optax's `kl_divergence_with_log_targets` on `jax.nn.log_softmax`
    of both logits, times `T**2`; `(loss, rows)`."""
    import jax
    import optax

    t2 = temperature * temperature

    def rows(t, s):
        return (
            optax.losses.kl_divergence_with_log_targets(
                jax.nn.log_softmax(s / temperature),
                jax.nn.log_softmax(t / temperature),
            )
            * t2
        )

    return lambda t, s: rows(t, s).mean(), rows


def liger_kl(temperature):
    """Liger-Kernel's Triton `LigerKLDIVLoss` (batch mean), on a CUDA GPU
    with `liger_kernel` installed; `(loss, None)` or None."""
    if backend() != "torch" or not on_gpu():
        return None
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    import torch.nn.functional as F

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    t2 = temperature * temperature

    def loss(t, s):
        lq = F.log_softmax(s / temperature, -1)
        return kl(lq, F.log_softmax(t / temperature, -1)) * t2

    return loss, None


def peers(name, temperature):
    """label -> `(loss or None, rows or None)` of the implementations of
    divergence `name` that keras-kd is measured against, the backend's own
    first (the denominator of the ratios) where there is one."""
    found = {}
    if name == "kl":
        if backend() == "torch":
            found["torch F.kl_div(log_target=True)"] = torch_kl_div(temperature)
        if backend() == "jax":
            found["optax kl_divergence_with_log_targets"] = optax_kl(
                temperature
            )
        liger = liger_kl(temperature)
        if liger is not None:
            found["Liger-Kernel LigerKLDIVLoss (Triton)"] = liger
        found["keras.losses.KLDivergence on softmax"] = keras_softmax_kl(
            temperature
        )
    found["plain keras.ops (autodiff)"] = (None, plain_rows(name, temperature))
    return found


def extended_precision(name, t, s, temperature):
    """`T**2` times the per-row divergence in NumPy's 80-bit `longdouble`
    (JSD: `beta = 0.5`), from the same (float32) inputs."""
    ld = np.longdouble
    t2 = ld(temperature) ** 2
    a = np.asarray(t, ld) / ld(temperature)
    b = np.asarray(s, ld) / ld(temperature)
    if name == "global_pointer":

        def sigmoid(x):
            return 1 / (1 + np.exp(-x))

        return t2 * ((sigmoid(b) - sigmoid(a)) * (b - a)).sum(-1)

    def log_softmax(x):
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    lp, lq = log_softmax(a), log_softmax(b)
    p, q = np.exp(lp), np.exp(lq)
    if name == "kl":
        return t2 * (p * (lp - lq)).sum(-1)
    if name == "symmetric_kl":
        return t2 * ((p - q) * (lp - lq)).sum(-1)
    lm = np.log(0.5 * p + 0.5 * q)
    return t2 * 0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1))


def liger_fused_linear_kl(student_kernel, teacher_kernel):
    """Liger-Kernel's `LigerFusedLinearJSD(jsd_beta=0)` (the forward KL) as
    a step `run(hs, ks, ht, kt) -> (loss, (d hs, d ks^T))`, on a CUDA GPU
    with `liger_kernel` installed, else None. Its kernels are `[V, H]`:
    transposed once here, outside any timing."""
    if backend() != "torch" or not on_gpu():
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    import torch

    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    ks_t = student_kernel.t().contiguous()
    kt_t = teacher_kernel.t().contiguous()

    def run(hs, ks, ht, kt):
        hs = hs.detach().requires_grad_(True)
        weight = ks_t.detach().requires_grad_(True)
        value = loss(hs, weight, ht, kt_t, None)
        grads = torch.autograd.grad(value, [hs, weight])
        return block((value.detach(), tuple(grads)))

    return run


def torch_dense_linear_kl(temperature):
    """Both logits materialized, float32 `log_softmax`, `F.kl_div`:
    `(hs, ks, ht, kt) -> scalar`, torch only."""
    import torch.nn.functional as F

    def loss(hs, ks, ht, kt):
        lq = F.log_softmax((hs @ ks).float() / temperature, -1)
        lp = F.log_softmax((ht @ kt).float() / temperature, -1)
        value = F.kl_div(lq, lp, log_target=True, reduction="batchmean")
        return value * temperature * temperature

    return loss
