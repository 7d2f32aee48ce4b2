"""The loss engine of issue 10: speed against the native peers, peak
memory, and accuracy against extended precision, on one backend.

    KERAS_BACKEND=torch python -m benchmarks.bench_engine [--quick]
        [--divergences kl,symmetric_kl,jsd,global_pointer] [--skip-memory]

Timed: one loss value and its gradient with respect to the student logits
(forward + backward), the batch mean of the per-row divergence times
`T**2`, at `T = 2` on `1024 x 32000` float32 logits drawn from N(0, 2^2),
in each backend's usual fast path (eager torch autograd, `jax.jit` of
`jax.value_and_grad`, `tf.function(jit_compile=True)` around a
`GradientTape`; on TensorFlow also without XLA, as `model.fit` runs on a
CPU). All implementations of one divergence are timed in the same process,
interleaved (`benchmarks.common.time_interleaved`); ratios divide medians.

Peers: torch's `F.kl_div(log_softmax(s/T), log_softmax(t/T),
log_target=True, reduction="batchmean") * T**2`, optax's
`kl_divergence_with_log_targets` under `jax.jit`, and on every backend a
plain `keras.ops` formula differentiated by autodiff (for the KL:
`T**2 * sum(exp(lp) * (lp - lq))` with `lp = log_softmax(t / T)`).

Accuracy: the largest relative error over 64 rows of 32000 classes against
NumPy's 80-bit `longdouble`, for a student close to its teacher
(`s = t + 1e-3 * noise`, KL about 1e-7) and at `T = 1000`.
"""

import json

import numpy as np

from benchmarks import common

NAME = "engine"
T = 2.0
SHAPE = (1024, 32000)
QUICK_SHAPE = (128, 32000)
DIVERGENCES = ("kl", "symmetric_kl", "jsd", "global_pointer")


# ---------------------------------------------------------------- functions


def keras_kd_fn(name, precise):
    """`(t, s) -> scalar` of keras-kd's divergence."""
    from keras import ops

    from keras_kd import ops as kd

    fns = {
        "kl": lambda t, s: kd.kl_divergence(
            t, s, temperature=T, precise=precise
        ),
        "symmetric_kl": lambda t, s: kd.symmetric_kl_divergence(
            t, s, temperature=T, precise=precise
        ),
        "jsd": lambda t, s: kd.jensen_shannon_divergence(
            t, s, 0.5, temperature=T, precise=precise
        ),
        "global_pointer": lambda t, s: kd.global_pointer_kl_divergence(
            t, s, T, precise=precise
        ),
    }
    return lambda t, s: ops.mean(fns[name](t, s))


def plain_fn(name):
    """The plain `keras.ops` formula, differentiated by autodiff."""
    from keras import ops

    def logs(t, s):
        return ops.log_softmax(t / T, axis=-1), ops.log_softmax(s / T, axis=-1)

    def kl(t, s):
        lp, lq = logs(t, s)
        return ops.sum(ops.exp(lp) * (lp - lq), axis=-1)

    def symmetric(t, s):
        lp, lq = logs(t, s)
        return ops.sum((ops.exp(lp) - ops.exp(lq)) * (lp - lq), axis=-1)

    def jsd(t, s):
        lp, lq = logs(t, s)
        p, q = ops.exp(lp), ops.exp(lq)
        lm = ops.log(0.5 * p + 0.5 * q)
        return 0.5 * ops.sum(p * (lp - lm), -1) + 0.5 * ops.sum(
            q * (lq - lm), -1
        )

    def global_pointer(t, s):
        a, b = s / T, t / T
        return ops.sum((ops.sigmoid(a) - ops.sigmoid(b)) * (a - b), -1)

    fn = {
        "kl": kl,
        "symmetric_kl": symmetric,
        "jsd": jsd,
        "global_pointer": global_pointer,
    }[name]
    return lambda t, s: ops.mean(fn(t, s)) * (T * T)


def native_peer(name):
    """`(label, fn)` of the backend's own KL, or `None`."""
    backend = common.backend()
    if name != "kl":
        return None
    if backend == "torch":
        import torch.nn.functional as F

        def torch_kl(t, s):
            return (
                F.kl_div(
                    F.log_softmax(s / T, -1),
                    F.log_softmax(t / T, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                * T
                * T
            )

        return "torch F.kl_div(log_target=True)", torch_kl
    if backend == "jax":
        import jax
        import optax

        def optax_kl(t, s):
            value = optax.losses.kl_divergence_with_log_targets(
                jax.nn.log_softmax(s / T), jax.nn.log_softmax(t / T)
            )
            return value.mean() * T * T

        return "optax kl_divergence_with_log_targets", optax_kl
    return None


def implementations(name):
    """label -> `(t, s) -> scalar`, the peer first."""
    found = {}
    peer = native_peer(name)
    if peer is not None:
        found[peer[0]] = peer[1]
    found["plain keras.ops (autodiff)"] = plain_fn(name)
    found["keras-kd, precise=None (default)"] = keras_kd_fn(name, None)
    found["keras-kd, precise=True"] = keras_kd_fn(name, True)
    found["keras-kd, precise=False"] = keras_kd_fn(name, False)
    return found


def value_and_grad(loss_fn, xla=True):
    """`common.value_and_grad`, with XLA on TensorFlow unless `xla=False`."""
    if common.backend() != "tensorflow" or not xla:
        return common.value_and_grad(loss_fn)
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def compiled(t, s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            value = loss_fn(t, s)
        return value, tape.gradient(value, s)

    return lambda t, s: common.block(compiled(t, s))


def random_logits(shape, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(shape, dtype=np.float32) * 2.0
    s = rng.standard_normal(shape, dtype=np.float32) * 2.0
    return t, s


# -------------------------------------------------------------------- speed


def time_divergence(name, shape, repeats, xla=True):
    from keras import ops

    t, s = (ops.convert_to_tensor(x) for x in random_logits(shape))
    impls = implementations(name)
    runs = {k: value_and_grad(f, xla) for k, f in impls.items()}
    grads = {k: ops.convert_to_numpy(r(t, s)[1]) for k, r in runs.items()}
    first = next(iter(grads.values()))
    agree = {k: float(np.abs(g - first).max()) for k, g in grads.items()}
    samples = common.time_interleaved(
        {k: (lambda r=r: r(t, s)) for k, r in runs.items()}, repeats, 1
    )
    base = common.summary(next(iter(samples.values())))[0]
    rows = []
    for key in impls:
        median = common.summary(samples[key])[0]
        rows.append(
            [
                key,
                common.format_ms(samples[key]),
                common.fmt(median / base),
                f"{agree[key]:.1e}",
            ]
        )
    header = [
        "implementation",
        "forward + backward ms",
        f"/ {next(iter(impls))}",
        "max grad difference",
    ]
    return common.markdown_table(header, rows)


# ------------------------------------------------------------------- memory


def memory_child(key, shape):
    """Child process: peak extra memory of one KL forward + backward."""
    from keras import ops

    fn = implementations("kl")[key]
    t, s = (ops.convert_to_tensor(x) for x in random_logits(shape))
    run = value_and_grad(fn)
    run(t, s)
    print(
        json.dumps({"bytes": common.peak_memory_growth(lambda: run(t, s))[0]})
    )


def memory_table(shape):
    rows = []
    for key in implementations("kl"):
        found = common.run_child(
            "benchmarks.bench_engine",
            [f"--memory-case={key}", f"--rows={shape[0]}"],
            env={"KERAS_BACKEND": common.backend()},
        )
        copies = found["bytes"] / (shape[0] * shape[1] * 4)
        rows.append([key, common.fmt(copies, 2)])
    header = ["KL implementation", "peak extra memory (copies of the logits)"]
    return common.markdown_table(header, rows)


# ----------------------------------------------------------------- accuracy


def _log_softmax_ld(x, temperature):
    x = np.asarray(x, np.longdouble) / np.longdouble(temperature)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def truth(name, t, s, temperature):
    """The divergence per row in 80-bit extended precision."""
    t2 = np.longdouble(temperature) ** 2
    if name == "global_pointer":
        a = np.asarray(s, np.longdouble) / np.longdouble(temperature)
        b = np.asarray(t, np.longdouble) / np.longdouble(temperature)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        return t2 * ((sig(a) - sig(b)) * (a - b)).sum(-1)
    lp, lq = _log_softmax_ld(t, temperature), _log_softmax_ld(s, temperature)
    p, q = np.exp(lp), np.exp(lq)
    if name == "kl":
        return t2 * (p * (lp - lq)).sum(-1)
    if name == "reverse_kl":
        return t2 * (q * (lq - lp)).sum(-1)
    if name == "symmetric_kl":
        return t2 * ((p - q) * (lp - lq)).sum(-1)
    lm = np.log(0.5 * p + 0.5 * q)
    return t2 * 0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1))


def per_row(name, precise):
    from keras_kd import ops as kd

    def fn(t, s, temperature):
        if name == "kl":
            return kd.kl_divergence(
                t, s, temperature=temperature, precise=precise
            )
        if name == "reverse_kl":
            return kd.kl_divergence(
                s, t, temperature=temperature, precise=precise
            )
        if name == "symmetric_kl":
            return kd.symmetric_kl_divergence(
                t, s, temperature=temperature, precise=precise
            )
        if name == "jsd":
            return kd.jensen_shannon_divergence(
                t, s, 0.5, temperature=temperature, precise=precise
            )
        return kd.global_pointer_kl_divergence(
            t, s, temperature, precise=precise
        )

    return fn


def accuracy_table(rows):
    from keras import ops

    rng = np.random.default_rng(1)
    t = (2.0 * rng.standard_normal((rows, 32000))).astype("float32")
    near = (t + 1e-3 * rng.standard_normal(t.shape)).astype("float32")
    far = (2.0 * rng.standard_normal(t.shape)).astype("float32")
    cases = [
        ("s = t + 1e-3 noise, T = 1", near, 1.0),
        ("s = t + 1e-3 noise, T = 2", near, 2.0),
        ("independent s, T = 1000", far, 1000.0),
    ]
    names = ("kl", "reverse_kl", "symmetric_kl", "jsd", "global_pointer")
    table = []
    for label, s, temperature in cases:
        for name in names:
            exact = np.asarray(truth(name, t, s, temperature), np.float64)
            row = [label, name, common.fmt(float(np.median(exact)), 2)]
            for precise in (None, True, False):
                got = ops.convert_to_numpy(
                    per_row(name, precise)(t, s, temperature)
                ).astype(np.float64)
                error = np.max(np.abs(got - exact) / np.abs(exact))
                row.append(f"{error:.1e}")
            table.append(row)
    header = [
        "case",
        "divergence",
        "median value",
        "rel. error, default",
        "precise=True",
        "precise=False",
    ]
    return common.markdown_table(header, table)


# -------------------------------------------------------------------- main


def _extra_arguments(parser):
    parser.add_argument("--divergences", default=",".join(DIVERGENCES))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--memory-case")
    parser.add_argument("--rows", type=int)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, _extra_arguments)
    if args.memory_case:
        memory_child(args.memory_case, (args.rows, SHAPE[1]))
        return
    backend = common.backend()
    shape = QUICK_SHAPE if args.quick else SHAPE
    repeats = args.repeats or (3 if args.quick else 7)
    parts = [
        common.fragment_heading("Loss engine"),
        f"Machine: {common.machine_summary()}.\n",
    ]
    for name in args.divergences.split(","):
        print(f"[{backend}] timing {name} at {shape}", flush=True)
        mode = "XLA" if backend == "tensorflow" else "default mode"
        parts.append(
            f"**{name}**, {shape[0]} x {shape[1]} float32, T = {T}, {mode}, "
            f"{repeats} rounds:\n"
        )
        parts.append(time_divergence(name, shape, repeats) + "\n")
        if backend == "tensorflow" and name == "kl":
            parts.append(
                "**kl** without XLA (`tf.function`, as `model.fit` on a CPU):\n"
            )
            parts.append(time_divergence(name, shape, repeats, xla=False))
            parts.append("")
    if not args.skip_memory and backend == "torch":
        print(f"[{backend}] memory", flush=True)
        parts.append(f"**Peak extra memory**, KL at {shape[0]} x {shape[1]}:\n")
        parts.append(memory_table(shape) + "\n")
    if not args.skip_accuracy:
        print(f"[{backend}] accuracy", flush=True)
        parts.append(
            "**Accuracy** against 80-bit extended precision, largest "
            "relative error over 64 rows x 32000 classes:\n"
        )
        parts.append(accuracy_table(16 if args.quick else 64) + "\n")
    text = "\n".join(parts)
    print(text)
    common.write_fragment(NAME, text, args.results_dir)


if __name__ == "__main__":
    main()
