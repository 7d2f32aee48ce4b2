"""Where the time of `keras_kd`'s KL loss goes, and a faster candidate.

A by-hand investigation, not part of `benchmarks.run`:

    KERAS_BACKEND=torch python -m benchmarks.profile_kl [--quick] [-t T]

prints (markdown) the torch profiler's per-operator split of one forward +
backward of `keras_kd.ops.kl_divergence` at 2048 x 32000 (torch only), then
times the current function, `candidate_kl_divergence` below and (on torch)
`F.kl_div`, interleaved, with the peak extra memory of each. On JAX and
TensorFlow it prints the timing and memory part.

`candidate_kl_divergence` is a proposal for `keras_kd.ops`: same value,
same masking rules (`-inf` logits carry no mass; a teacher row with no mass
gives 0), written with `ops.log_softmax` and `ops.custom_gradient` so that
the backward pass is the closed form `T * (q - p)` instead of autograd
through a dozen elementwise `where`s.
"""

import argparse
import json
import math

from benchmarks import common
from benchmarks.bench_kl import random_logits, to_tensor


def _lowest(dtype):
    import keras

    if keras.backend.standardize_dtype(dtype) == "float64":
        return -1.7976931348623157e308
    return -3.4028234663852886e38


def _finite_log_softmax(x, axis, temperature):
    """`log_softmax(x / T)` with every entry finite.

    Masked (`-inf`) entries end up at the lowest finite float, whose
    probability is still exactly 0, so that `p * (log p - log q)` needs no
    guard. When `T` is not a power of two the row maximum is subtracted
    before dividing (accurate for logits near 1e4); a power of two divides
    exactly and `log_softmax` subtracts the maximum itself.
    """
    from keras import ops

    lowest = _lowest(x.dtype)
    if math.frexp(temperature)[0] == 0.5:
        scaled = x if temperature == 1.0 else x / temperature
    else:
        top = ops.maximum(ops.max(x, axis=axis, keepdims=True), lowest)
        scaled = (x - ops.stop_gradient(top)) / temperature
    # After the division: x / T overflows to -inf for T < 1.
    return ops.log_softmax(ops.maximum(scaled, lowest), axis=axis)


def candidate_kl_divergence(y_true, y_pred, temperature=1.0, axis=-1):
    """`T**2 * KL(softmax(y_true / T) || softmax(y_pred / T))` per row."""
    from keras import ops

    # torch tensors tell whether the teacher needs a gradient; JAX and
    # TensorFlow drop an unused one themselves (jit / graph pruning).
    teacher_grad = getattr(y_true, "requires_grad", True)

    @ops.custom_gradient
    def kl(t, s):
        has_mass = ops.max(t, axis=axis) > -math.inf
        log_p = _finite_log_softmax(t, axis, temperature)
        log_q = _finite_log_softmax(s, axis, temperature)
        p = ops.exp(log_p)
        value = ops.sum(p * (log_p - log_q), axis=axis)
        value = ops.where(has_mass, value, 0.0)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            up = ops.where(has_mass, upstream, 0.0) / temperature
            up = ops.expand_dims(up, axis)
            d_s = up * (ops.exp(log_q) - p)
            if not teacher_grad:
                return None, d_s
            ratio = log_p - log_q - ops.expand_dims(value, axis)
            return up * p * ratio, d_s

        return value, grad

    return kl(y_true, y_pred) * (temperature * temperature)


def implementations(T):
    from keras import ops

    import keras_kd

    found = {
        "keras_kd.ops.kl_divergence": lambda t, s: ops.mean(
            keras_kd.ops.kl_divergence(t, s, temperature=T)
        ),
        "candidate": lambda t, s: ops.mean(
            candidate_kl_divergence(t, s, temperature=T)
        ),
    }
    if common.backend() == "torch":
        import torch.nn.functional as F

        found["torch F.kl_div"] = lambda t, s: (
            T
            * T
            * F.kl_div(
                F.log_softmax(s / T, dim=-1),
                F.softmax(t / T, dim=-1),
                reduction="batchmean",
            )
        )
    return found


def operator_profile(shape, T):
    """torch profiler: self time and calls per aten operator."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import keras_kd

    t, s = (to_tensor(x) for x in random_logits(shape))

    def step():
        student = s.detach().requires_grad_(True)
        value = keras_kd.ops.kl_divergence(t, student, temperature=T).mean()
        return torch.autograd.grad(value, student)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [
        [
            e.key,
            e.count,
            common.fmt(e.self_cpu_time_total / 1e3),
            f"{100 * e.self_cpu_time_total / total:.0f}%",
        ]
        for e in events[:12]
    ]
    return common.markdown_table(
        ["operator", "calls", "self ms", "share"], rows
    )


def memory_child(name, shape, T):
    loss_fn = implementations(T)[name]
    t, s = (to_tensor(x) for x in random_logits(shape))
    run = common.value_and_grad(loss_fn)
    fn = lambda: run(t, s)  # noqa: E731
    if hasattr(run, "lower"):
        compiled = run.lower(t, s).compile()
        fn = lambda: common.block(compiled(t, s))  # noqa: E731
    elif hasattr(run, "trace"):
        run.trace(t, s)
    print(json.dumps({"bytes": common.peak_memory_growth(fn)[0]}))


def compare(shapes, repeats, T):
    from keras import ops

    impls = implementations(T)
    lines = []
    for shape, rounds in zip(shapes, repeats):
        t, s = (to_tensor(x) for x in random_logits(shape))
        runs = {k: common.value_and_grad(f) for k, f in impls.items()}
        values = {k: r(t, s) for k, r in runs.items()}
        base_grad = ops.convert_to_numpy(
            values["keras_kd.ops.kl_divergence"][1]
        )
        samples = common.time_interleaved(
            {k: (lambda r=r: r(t, s)) for k, r in runs.items()}, rounds
        )
        base = common.summary(samples["keras_kd.ops.kl_divergence"])[0]
        large = shape == shapes[-1]
        rows = []
        for key, run in runs.items():
            grad = ops.convert_to_numpy(values[key][1])
            row = [key, common.format_ms(samples[key])]
            row.append(common.fmt(common.summary(samples[key])[0] / base))
            row.append(f"{abs(grad - base_grad).max():.1e}")
            if large:
                found = common.run_child(
                    "benchmarks.profile_kl",
                    [f"-t={T}", f"--memory-case={key}"]
                    + [f"--shape={shape[0]}x{shape[1]}"],
                    env={"KERAS_BACKEND": common.backend()},
                )
                row.append(
                    common.fmt(found["bytes"] / (shape[0] * shape[1] * 4), 2)
                )
            rows.append(row)
        header = ["implementation", "forward + backward ms", "/ current"]
        header += ["max grad difference"]
        header += ["peak extra memory (copies)"] if large else []
        lines.append(f"**{shape[0]} x {shape[1]}**, {rounds} rounds:\n")
        lines.append(common.markdown_table(header, rows) + "\n")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("-t", "--temperature", type=float, default=2.0)
    parser.add_argument("--memory-case")
    parser.add_argument("--shape")
    args = parser.parse_args(argv)
    T = args.temperature
    if args.memory_case:
        rows, classes = (int(n) for n in args.shape.split("x"))
        memory_child(args.memory_case, (rows, classes), T)
        return
    if args.quick:
        shapes, repeats = [(64, 100), (256, 32000)], [5, 3]
    else:
        shapes, repeats = [(256, 100), (2048, 32000)], [41, 7]
    print(common.fragment_heading(f"KL profile at T = {T}"))
    if common.backend() == "torch":
        print(f"Operators of one forward + backward at {shapes[-1]}:\n")
        print(operator_profile(shapes[-1], T) + "\n")
    print(compare(shapes, repeats, T))


if __name__ == "__main__":
    main()
