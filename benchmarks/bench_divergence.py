"""Divergences on logits: time, peak memory and accuracy, on one backend.

    KERAS_BACKEND=torch python -m benchmarks.bench_divergence [--quick]
        [--divergences kl,symmetric_kl,jsd,global_pointer]
        [--shapes 256x100,1024x32000] [--dtype float32] [--repeats N]
        [--jit-compile] [--skip-memory] [--skip-accuracy]

Timed: one loss value and its gradient with respect to the student logits
(forward + backward), the batch mean of the per-row divergence times
`T**2`, at `T = 2`, on logits drawn from N(0, 2^2), in each backend's
usual fast path (`benchmarks.common.value_and_grad`: eager torch autograd,
`jax.jit`, a `tf.function`; on TensorFlow with XLA only with
`--jit-compile`, as `model.fit` uses no XLA on a CPU). Every implementation
of one divergence and shape runs in the same process, in interleaved
rounds (`common.time_interleaved`); a cell reads `median (first
quartile-third quartile)` and the ratios divide medians of that one run.

Implementations (`common.peers`): the backend's own KL (torch's
`F.kl_div(log_target=True)`, optax's `kl_divergence_with_log_targets`),
Liger-Kernel's Triton KL where it runs (CUDA, installed),
`keras.losses.KLDivergence` on the softmax probabilities (how users apply
Keras' loss to logits), the plain `keras.ops` formula left to autodiff,
and keras-kd's `keras_kd.ops.<divergence>` on its default (fast) path and
with `precise=True`. `x floor`: the time over the byte floor, reading both
logits once and writing the gradient once at the copy bandwidth measured
in the same run.

Peak memory, in copies of one logits array (the gradient itself is one):
on JAX the compiled program's scratch plus outputs; on a GPU the
framework's peak counter; on a CPU the peak resident-set growth of one
call in a fresh process per implementation (KL only: a process per
implementation is slow), with glibc's mmap threshold fixed.

Accuracy: the largest relative error of the per-row value over rows of
32000 classes against NumPy's 80-bit `longdouble` from the same float32
inputs: random logits, confident logits (N(0, 30^2)), a student close to
its teacher (KL about 1e-7, where a float32 fast path is documented to be
off by a relative 0.1-10) and `T = 1000`.

`--memory-case LABEL --divergence NAME --shape BxV` is the child process
that measures one implementation's memory on a CPU.
"""

import argparse

import numpy as np

from benchmarks import common

NAME = "divergence"
T = 2.0
SHAPES = "256x100,1024x32000"
QUICK_SHAPES = "64x100,128x4000"
KERAS_KD = "keras-kd (default)"
PRECISE = "keras-kd, precise=True"
COMPILED = "keras-kd, torch.compile"
CAST = "keras-kd on float32 copies of the logits"
LARGE_BLOCKS = "keras-kd, 4x larger blocks"
OPS = {
    "kl": "kl_divergence",
    "symmetric_kl": "symmetric_kl_divergence",
    "jsd": "jensen_shannon_divergence",
    "global_pointer": "global_pointer_kl_divergence",
}


def keras_kd_rows(name, temperature, precise=None):
    """`keras_kd.ops.<divergence>` per row (JSD: `beta = 0.5`)."""
    import keras_kd

    fn = getattr(keras_kd.ops, OPS[name])
    if name == "global_pointer":
        return lambda t, s: fn(t, s, temperature, axis=-1, precise=precise)
    return lambda t, s: fn(t, s, temperature=temperature, precise=precise)


def compiled_rows(name, temperature):
    """`keras_kd_rows` with `keras_kd.ops.set_torch_compile(True)` (on a
    CPU compiling is off by default)."""
    import keras_kd

    rows = keras_kd_rows(name, temperature)

    def run(t, s):
        keras_kd.ops.set_torch_compile(True)
        try:
            return rows(t, s)
        finally:
            keras_kd.ops.set_torch_compile("auto")

    return run


def cast_rows(name, temperature):
    """`keras_kd_rows` on float32 copies of half-precision logits (how
    keras-kd computed them before its blocks of rows)."""
    from keras import ops

    rows = keras_kd_rows(name, temperature)
    return lambda t, s: rows(ops.cast(t, "float32"), ops.cast(s, "float32"))


def large_block_rows(name, temperature):
    """`keras_kd_rows` with blocks of half-precision rows 4x the default
    (traced with them under `jax.jit`): to choose the block size."""
    from keras_kd.ops import _half_logits

    rows = keras_kd_rows(name, temperature)
    default = _half_logits.rows_per_block

    def run(t, s):
        _half_logits.rows_per_block = lambda classes: 4 * default(classes)
        try:
            return rows(t, s)
        finally:
            _half_logits.rows_per_block = default

    return run


def implementations(name, temperature=T, dtype="float32"):
    """label -> `(loss, rows)`: the peers first, then keras-kd; `loss` is
    the batch mean of `rows` where a peer has no reduction of its own."""
    from keras import ops

    found = common.peers(name, temperature)
    found[KERAS_KD] = (None, keras_kd_rows(name, temperature))
    found[PRECISE] = (None, keras_kd_rows(name, temperature, precise=True))
    if common.backend() == "torch" and name != "global_pointer":
        found[COMPILED] = (None, compiled_rows(name, temperature))
    if dtype in ("bfloat16", "float16") and name != "global_pointer":
        found[CAST] = (None, cast_rows(name, temperature))
        found[LARGE_BLOCKS] = (None, large_block_rows(name, temperature))
    return {
        label: (
            loss or (lambda t, s, rows=rows: ops.mean(rows(t, s))),
            rows,
        )
        for label, (loss, rows) in found.items()
    }


def parse_shapes(text):
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


# -------------------------------------------------------------------- time


def speed_table(
    name, shape, dtype, repeats, bandwidth, memory=True, jit_compile=False
):
    """One divergence at one shape: a title line and a markdown table."""
    rows_n, classes = shape
    t = common.normal(shape, dtype, seed=1, scale=2.0)
    s = common.normal(shape, dtype, seed=2, scale=2.0)
    impls = implementations(name, dtype=dtype)
    runs = {
        label: common.value_and_grad(loss, jit_compile=jit_compile)
        for label, (loss, _) in impls.items()
    }
    base = next(iter(runs))
    reference = runs[KERAS_KD](t, s)[1]
    agree = {
        k: common.max_difference(run(t, s)[1], reference)
        for k, run in runs.items()
    }
    if memory:
        memory = measure_memory(name, shape, dtype, runs, (t, s), jit_compile)
    samples = common.time_interleaved(
        {k: (lambda run=run: run(t, s)) for k, run in runs.items()},
        repeats,
        warmup=1 if rows_n * classes > 10**6 else 3,
    )
    logits_bytes = rows_n * classes * (2 if dtype == "bfloat16" else 4)
    floor = 3 * logits_bytes / bandwidth
    base_ms = common.median(samples[base])
    table = []
    for key in runs:
        med = common.median(samples[key])
        row = [
            key,
            common.format_ms(samples[key]),
            common.fmt(med / base_ms),
            common.fmt(med / floor),
        ]
        if memory:
            row.append(
                common.fmt(memory[key] / logits_bytes, 2)
                if key in memory
                else "-"
            )
        row.append(f"{agree[key]:.1e}")
        table.append(row)
    header = [
        "implementation",
        "fwd + bwd ms",
        f"/ {base}",
        "x floor",
        *(["peak memory (logits copies)"] if memory else []),
        f"max grad difference to {KERAS_KD}",
    ]
    method = f"; memory: {memory.method}" if memory else ""
    title = (
        f"**{name}**, {rows_n} x {classes} {dtype}, T = {T:g}, "
        f"{repeats} rounds; floor {common.fmt(floor * 1e3)} ms{method}"
    )
    print(f"[{common.backend()}] {name} {shape} done", flush=True)
    return title + ":\n\n" + common.markdown_table(header, table)


class Memory(dict):
    method = ""


def measure_memory(name, shape, dtype, runs, inputs, jit_compile):
    """label -> peak bytes of one forward + backward of `runs[label]`;
    empty where not measured (other divergences than the KL on a CPU)."""
    memory = Memory()
    in_process = common.backend() == "jax" or common.on_gpu()
    if not in_process and name != "kl":
        return memory
    for label, run in runs.items():
        if in_process:
            memory[label], memory.method = common.peak_memory(run, inputs)
        else:
            found = common.run_child(
                "benchmarks.bench_divergence",
                ["--memory-case", label, "--divergences", name]
                + ["--shapes", "x".join(map(str, shape)), "--dtype", dtype]
                + (["--jit-compile"] if jit_compile else []),
                env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
            )
            memory[label], memory.method = found["bytes"], found["method"]
    return memory


def memory_child(args):
    """Child process: peak extra memory of one forward + backward."""
    name = args.divergences
    shape = parse_shapes(args.shapes)[0]
    loss, _ = implementations(name, dtype=args.dtype)[args.memory_case]
    t = common.normal(shape, args.dtype, seed=1, scale=2.0)
    s = common.normal(shape, args.dtype, seed=2, scale=2.0)
    run = common.value_and_grad(loss, jit_compile=args.jit_compile)
    # Traced before the measurement. TensorFlow's allocator keeps what a
    # call freed, so only a first call shows its peak: traced, not run.
    if hasattr(run, "trace"):
        run.trace(t, s)
    else:
        run(t, s)
    found, method = common.peak_memory(run, (t, s))
    common.print_json({"bytes": found, "method": method})


# ---------------------------------------------------------------- accuracy


def accuracy_cases(rows, classes):
    rng = np.random.default_rng(1)
    t = (2.0 * rng.standard_normal((rows, classes))).astype("float32")
    near = (t + 1e-3 * rng.standard_normal(t.shape)).astype("float32")
    far = (2.0 * rng.standard_normal(t.shape)).astype("float32")
    confident = (30.0 * rng.standard_normal((2, rows, 100))).astype("float32")
    return [
        ("independent N(0, 2^2), T = 1", t, far, 1.0),
        ("confident N(0, 30^2), 100 classes, T = 1", *confident, 1.0),
        ("s = t + 1e-3 noise, T = 1", t, near, 1.0),
        ("s = t + 1e-3 noise, T = 2", t, near, 2.0),
        ("independent N(0, 2^2), T = 1000", t, far, 1000.0),
    ]


def accuracy_table(name, rows, classes):
    from keras import ops

    header, table = None, []
    for label, t, s, temperature in accuracy_cases(rows, classes):
        exact = np.asarray(
            common.extended_precision(name, t, s, temperature), np.float64
        )
        impls = {
            k: r
            for k, (_, r) in implementations(name, temperature).items()
            if r is not None
        }
        header = header or ["case", "median value", *impls]
        row = [label, common.fmt(float(np.median(exact)), 2)]
        for fn in impls.values():
            got = fn(common.to_tensor(t), common.to_tensor(s))
            got = ops.convert_to_numpy(got).astype(np.float64)
            error = np.max(np.abs(got - exact) / np.abs(exact))
            row.append(f"{error:.1e}")
        table.append(row)
    title = (
        f"**{name}**, largest relative error over {rows} rows of {classes} "
        "classes against 80-bit `longdouble`"
    )
    return title + ":\n\n" + common.markdown_table(header, table)


# -------------------------------------------------------------------- main


def add_arguments(parser):
    parser.add_argument("--divergences", default=",".join(common.DIVERGENCES))
    parser.add_argument("--shapes", default=None, help=f"default {SHAPES}")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="TensorFlow: tf.function(jit_compile=True) (XLA)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)


def tables(args, bandwidth):
    """The speed tables, then the accuracy tables, as markdown blocks."""
    shapes = parse_shapes(args.shapes)
    parts = []
    for name in args.divergences.split(","):
        for index, shape in enumerate(shapes):
            large = index == len(shapes) - 1
            repeats = args.repeats or (
                (3 if args.quick else 7) if large else (5 if args.quick else 21)
            )
            print(f"[{common.backend()}] timing {name} at {shape}", flush=True)
            parts.append(
                speed_table(
                    name,
                    shape,
                    args.dtype,
                    repeats,
                    bandwidth,
                    memory=large and not args.skip_memory,
                    jit_compile=args.jit_compile,
                )
            )
    if not args.skip_accuracy:
        rows, classes = (16, 1000) if args.quick else (64, 32000)
        for name in args.divergences.split(","):
            print(f"[{common.backend()}] accuracy of {name}", flush=True)
            parts.append(accuracy_table(name, rows, classes))
    return parts


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    if args.memory_case:
        memory_child(args)
        return
    bandwidth = common.copy_bandwidth((64 if args.quick else 512) * 2**20)
    mode = {
        "torch": "eager",
        "jax": "jax.jit",
        "tensorflow": "tf.function"
        + (" with XLA" if args.jit_compile else ", no XLA"),
    }[common.backend()]
    parts = [
        common.fragment_heading("Divergences on logits").rstrip(),
        f"{mode}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write).",
        *tables(args, bandwidth),
    ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    common.write_fragment(NAME, text, args.results_dir)


if __name__ == "__main__":
    main()
