"""The KL loss alone: speed, peak memory and error against float64.

Compares, on the backend named by `KERAS_BACKEND`:

- `keras_kd.losses.KLDivergence(temperature=T)` on logits;
- `keras.losses.KLDivergence` the way a user applies it to logits: on the
  softmax probabilities of teacher and student, times `T**2`;
- a plain `keras.ops` reference,
  `T**2 * sum(softmax(t/T) * (log_softmax(t/T) - log_softmax(s/T)))`;
- on torch, `F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T**2`.

Run `python -m benchmarks.bench_kl [--quick]`; `benchmarks.run` runs it once
per backend. `--memory-case NAME --rows B --classes V` is the child process
that measures one implementation's peak memory in a fresh interpreter.
"""

import json

import numpy as np

from benchmarks import common

NAME = "kl"
T = 2.0
SHAPES = [(256, 100), (2048, 32000)]
QUICK_SHAPES = [(64, 100), (256, 32000)]
LOGIT_SCALE = 2.0
LABELS = {
    "keras_kd": "keras_kd.losses.KLDivergence",
    "keras": "keras.losses.KLDivergence(softmax)",
    "reference": "keras.ops reference",
    "torch": "torch F.kl_div",
}


def implementations(temperature=T):
    """name -> (scalar loss fn, per-row fn), both `(t, s) -> tensor`."""
    import keras
    from keras import ops

    import keras_kd

    t2 = temperature * temperature
    ours = keras_kd.losses.KLDivergence(temperature=temperature)
    ours_rows = keras_kd.losses.KLDivergence(
        temperature=temperature, reduction="none"
    )
    theirs = keras.losses.KLDivergence()
    theirs_rows = keras.losses.KLDivergence(reduction="none")

    def keras_rows(t, s):
        p = ops.softmax(t / temperature, axis=-1)
        q = ops.softmax(s / temperature, axis=-1)
        return theirs_rows(p, q) * t2

    def keras_loss(t, s):
        p = ops.softmax(t / temperature, axis=-1)
        q = ops.softmax(s / temperature, axis=-1)
        return theirs(p, q) * t2

    def reference_rows(t, s):
        t, s = t / temperature, s / temperature
        log_ratio = ops.log_softmax(t, axis=-1) - ops.log_softmax(s, axis=-1)
        return ops.sum(ops.softmax(t, axis=-1) * log_ratio, axis=-1) * t2

    def reference_loss(t, s):
        return ops.mean(reference_rows(t, s))

    found = {
        "keras_kd": (ours, ours_rows),
        "keras": (keras_loss, keras_rows),
        "reference": (reference_loss, reference_rows),
    }
    if keras.backend.backend() == "torch":
        import torch.nn.functional as F

        def torch_terms(t, s):
            log_q = F.log_softmax(s / temperature, dim=-1)
            return log_q, F.softmax(t / temperature, dim=-1)

        def torch_loss(t, s):
            loss = F.kl_div(*torch_terms(t, s), reduction="batchmean")
            return loss * t2

        def torch_rows(t, s):
            terms = F.kl_div(*torch_terms(t, s), reduction="none")
            return terms.sum(dim=-1) * t2

        found["torch"] = (torch_loss, torch_rows)
    return found


def random_logits(shape, scale=LOGIT_SCALE, seed=0):
    rng = np.random.default_rng(seed)
    t = (rng.standard_normal(shape, dtype=np.float32) * scale).astype("f4")
    s = (rng.standard_normal(shape, dtype=np.float32) * scale).astype("f4")
    return t, s


def to_tensor(x):
    from keras import ops

    return ops.convert_to_tensor(x)


# -------------------------------------------------------------------- speed


def time_shape(shape, impls, repeats, warmup):
    """Forward and forward + backward samples, all interleaved."""
    t, s = (to_tensor(x) for x in random_logits(shape))
    calls = {}
    for key, (fn, _) in impls.items():
        calls["forward", key] = common.forward(fn)
        calls["grad", key] = common.value_and_grad(fn)
    samples = common.time_interleaved(
        {name: (lambda f=f: f(t, s)) for name, f in calls.items()},
        repeats,
        warmup,
    )
    forward = {key: samples["forward", key] for key in impls}
    grad = {key: samples["grad", key] for key in impls}
    return forward, grad


def jax_memory_analysis(shape, loss_fn):
    """XLA's temp and output bytes of the jitted forward + backward."""
    t, s = (to_tensor(x) for x in random_logits(shape))
    run = common.value_and_grad(loss_fn)
    analysis = run.lower(t, s).compile().memory_analysis()
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def memory_child(key, shape):
    """Child process: peak extra memory of one forward + backward."""
    loss_fn = implementations()[key][0]
    t, s = (to_tensor(x) for x in random_logits(shape))
    run = common.value_and_grad(loss_fn)
    fn = lambda: run(t, s)  # noqa: E731
    # Tracing and compilation happen before the measurement, so only the
    # buffers of the computation itself are counted.
    if hasattr(run, "lower"):
        compiled = run.lower(t, s).compile()
        fn = lambda: common.block(compiled(t, s))  # noqa: E731
    elif hasattr(run, "trace"):
        run.trace(t, s)
    extra, method = common.peak_memory_growth(fn)
    print(json.dumps({"bytes": extra, "method": method}))


def measure_memory(keys, shape):
    rows, classes = shape
    found = {}
    for key in keys:
        found[key] = common.run_child(
            "benchmarks.bench_kl",
            ["--memory-case", key, "--rows", str(rows)]
            + ["--classes", str(classes)],
            env={"KERAS_BACKEND": common.backend()},
        )
    return found


# ---------------------------------------------------------------- numerics


def error_cases(quick):
    vocab = 1000 if quick else 32000
    spec_t = np.array([[30.0, 0.0, -30.0]], dtype="f4")
    spec_s = np.array([[0.0, 0.0, 30.0]], dtype="f4")
    return [
        ("random N(0, 2^2), 256 x 100", random_logits((256, 100), seed=1)),
        (
            f"random N(0, 2^2), 256 x {vocab}",
            random_logits((256, vocab), seed=2),
        ),
        (
            "confident N(0, 30^2), 256 x 100",
            random_logits((256, 100), scale=30.0, seed=3),
        ),
        ("t = [30, 0, -30], s = [0, 0, 30]", (spec_t, spec_s)),
    ]


def float64_reference(t, s):
    """Per-row KL(softmax(t) || softmax(s)) and d mean(KL) / d s, float64."""
    from scipy.special import log_softmax

    log_p = log_softmax(t.astype("f8"), axis=-1)
    log_q = log_softmax(s.astype("f8"), axis=-1)
    p = np.exp(log_p)
    rows = np.sum(p * (log_p - log_q), axis=-1)
    grad = (np.exp(log_q) - p) / t.shape[0]
    return rows, grad


def measure_errors(impls, quick):
    from keras import ops

    results = []
    for case, (t, s) in error_cases(quick):
        ref_rows, ref_grad = float64_reference(t, s)
        for key, (loss_fn, rows_fn) in impls.items():
            tt, ss = to_tensor(t), to_tensor(s)
            rows = ops.convert_to_numpy(rows_fn(tt, ss)).astype("f8")
            _, grad = common.value_and_grad(loss_fn)(tt, ss)
            grad = ops.convert_to_numpy(grad).astype("f8")
            abs_err = np.abs(rows - ref_rows)
            grad_err = np.max(np.abs(grad - ref_grad)) / np.max(
                np.abs(ref_grad)
            )
            results.append(
                (
                    case,
                    key,
                    float(np.max(abs_err)),
                    float(np.max(abs_err / np.abs(ref_rows))),
                    float(grad_err),
                    float(rows[0]),
                    float(ref_rows[0]),
                )
            )
    return results


# ------------------------------------------------------------------ report


def speed_table(shape, fwd, grad, floor_bytes, bandwidth, memory, xla):
    has_torch = "torch" in grad
    torch_ms = common.summary(grad["torch"])[0] if has_torch else None
    header = ["implementation", "forward ms", "forward + backward ms"]
    header += ["/ F.kl_div"] if has_torch else []
    header += ["x floor"]
    header += ["peak extra memory (logits copies)"] if memory else []
    header += ["XLA temp + output (copies)"] if xla else []
    logits_bytes = shape[0] * shape[1] * 4
    rows = []
    for key in grad:
        med = common.summary(grad[key])[0]
        row = [LABELS[key], common.format_ms(fwd[key])]
        row.append(common.format_ms(grad[key]))
        if has_torch:
            row.append(common.fmt(med / torch_ms))
        row.append(common.fmt(med / (floor_bytes / bandwidth)))
        if memory:
            extra = memory[key]["bytes"]
            row.append(
                "-" if extra is None else common.fmt(extra / logits_bytes, 2)
            )
        if xla:
            temp, out = xla[key]
            row.append(
                f"{common.fmt(temp / logits_bytes, 2)} + "
                f"{common.fmt(out / logits_bytes, 2)}"
            )
        rows.append(row)
    return common.markdown_table(header, rows)


def error_table(errors):
    header = [
        "case",
        "implementation",
        "max abs error",
        "max rel error",
        "grad error",
        "row 0: computed / float64",
    ]
    rows = [
        [
            case,
            LABELS[key],
            f"{abs_err:.1e}",
            f"{rel_err:.1e}",
            f"{grad_err:.1e}",
            f"{common.fmt(value, 5)} / {common.fmt(ref, 5)}",
        ]
        for case, key, abs_err, rel_err, grad_err, value, ref in errors
    ]
    return common.markdown_table(header, rows)


def targets(measured):
    """One paragraph: keras_kd against the issue's targets."""
    base = "torch" if "torch" in measured[0][1] else "reference"
    ratios = []
    for shape, grad, _ in measured:
        ratio = (
            common.summary(grad["keras_kd"])[0] / common.summary(grad[base])[0]
        )
        ratios.append(f"{common.fmt(ratio)} at {shape[0]} x {shape[1]}")
    shape, _, memory = measured[-1]
    copies = {
        key: memory[key]["bytes"] / (shape[0] * shape[1] * 4)
        for key in ("keras_kd", base)
        if memory[key]["bytes"] is not None
    }
    text = (
        f"keras_kd forward + backward time / {LABELS[base]}: "
        f"{', '.join(ratios)}"
    )
    if base == "torch":
        slow = any(
            common.summary(g["keras_kd"])[0] > common.summary(g["torch"])[0]
            for _, g, _ in measured
        )
        text += f" (target <= 1: {'not met' if slow else 'met'})"
    if len(copies) == 2:
        text += (
            f". Peak extra memory at {shape[0]} x {shape[1]}: "
            f"{common.fmt(copies['keras_kd'], 2)} copies of the logits "
            f"({LABELS[base]}: {common.fmt(copies[base], 2)})"
        )
    return text + "."


METHOD = """\
## KL divergence loss alone

What is timed: one loss value (forward) and one loss value plus its
gradient with respect to the student logits (forward + backward), the batch
mean of the per-row KL times `T**2`, at `T = {T}`, on float32 logits drawn
from N(0, {scale}^2). Each backend runs its usual fast path: `jax.jit` of
`jax.value_and_grad`, a `tf.function` around a `GradientTape` (no XLA, as
`model.fit` on a CPU), eager torch autograd. All implementations are timed
in the same process, in rounds that call each of them in a shuffled order
(a fast one several times per round), after warm-up. A cell reads
`median (first quartile - third quartile)` of the milliseconds per call,
and the ratios divide medians from that one process.

- `/ F.kl_div`: forward + backward time over torch's
  `F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2`.
- `x floor`: forward + backward time over the memory-bandwidth floor, the
  time to read both logits arrays once and write the gradient once
  (3 arrays) at the bandwidth of a large NumPy copy (best of 7, counting
  read + write bytes). No implementation can beat it; one fused kernel
  would need about two reads of each input.
- Peak extra memory: the most memory held at once during one forward +
  backward beyond the inputs, in copies of one logits array (1 copy =
  rows x classes x 4 bytes, 262 MB at 2048 x 32000); the gradient itself
  is one copy, so 1.0 is the floor. Measured in a fresh process per
  implementation after tracing/compilation: on a CPU as the growth of the
  resident set (Linux VmHWM, reset through /proc/self/clear_refs, the
  arrays being far above glibc's mmap threshold); on JAX also XLA's own
  `memory_analysis()` of the compiled program (temporaries + outputs).
- Error: each implementation in float32 against float64 SciPy
  (`scipy.special.log_softmax`) on the same float32 inputs, at `T = 1`:
  the largest absolute and relative error of the per-row KL, and the
  largest absolute error of the gradient of the batch-mean loss divided by
  the largest gradient entry. On the confident logits every exact
  implementation shows the same 1e-4 relative error on a few rows: their
  KL is small against log-probabilities of size ~100, whose float32
  rounding no float32 implementation avoids.

Reproduce with `OMP_NUM_THREADS=1 python -m benchmarks.run --modules
bench_kl` (`--quick` for a smoke run). Where keras_kd's time goes, and a
faster candidate: `python -m benchmarks.profile_kl`.
"""


def run_benchmark(args):
    backend = common.backend()
    impls = implementations()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    bandwidth = common.copy_bandwidth(
        nbytes=(64 if args.quick else 512) * 2**20
    )
    parts = [
        common.fragment_heading("KL loss"),
        f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write).\n",
    ]
    measured = []
    for index, shape in enumerate(shapes):
        large = index == len(shapes) - 1
        repeats = (3 if large else 5) if args.quick else (7 if large else 41)
        print(f"[{backend}] timing {shape} x {repeats}", flush=True)
        fwd, grad = time_shape(shape, impls, repeats, 1 if large else 3)
        memory = measure_memory(impls, shape) if large else None
        xla = None
        if backend == "jax":
            xla = {}
            for key, (fn, _) in impls.items():
                xla[key] = jax_memory_analysis(shape, fn)
        measured.append((shape, grad, memory))
        logits_bytes = shape[0] * shape[1] * 4
        floor_ms = 3 * logits_bytes / bandwidth * 1e3
        parts.append(
            f"**{shape[0]} x {shape[1]}** (floor {common.fmt(floor_ms)} ms "
            f"forward + backward, {repeats} rounds):\n"
        )
        parts.append(
            speed_table(
                shape, fwd, grad, 3 * logits_bytes, bandwidth, memory, xla
            )
            + "\n"
        )
    parts.append(targets(measured) + "\n")
    print(f"[{backend}] numerical error", flush=True)
    parts.append("**Error against float64** (T = 1):\n")
    parts.append(error_table(measure_errors(implementations(1.0), args.quick)))
    common.write_fragment(NAME, "\n".join(parts), args.results_dir)
    method = METHOD.format(T=T, scale=common.fmt(LOGIT_SCALE))
    common.write_fragment(NAME, method, args.results_dir, per_backend=False)


def _extra_arguments(parser):
    parser.add_argument("--memory-case", choices=sorted(LABELS))
    parser.add_argument("--rows", type=int)
    parser.add_argument("--classes", type=int)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, _extra_arguments)
    if args.memory_case:
        memory_child(args.memory_case, (args.rows, args.classes))
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()
