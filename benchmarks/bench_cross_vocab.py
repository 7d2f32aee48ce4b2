"""Cross-vocabulary distances from hidden states: fused against dense, one
backend.

    KERAS_BACKEND=jax python -m benchmarks.bench_cross_vocab [--quick]
        [--shape ROWS,HIDDEN,STUDENT_VOCAB,TEACHER_VOCAB] [--chunks 0,64]

One training step's loss and gradients with respect to the student's
hidden states and kernel, for ULD (`universal`) and the hybrid distance
(`hybrid`, half of the student's ids matched to teacher ids), `T = 1`,
float32:

- dense: both `[rows, vocab]` logits materialized, then
  `keras_kd.ops.universal_logit_distance` or `hybrid_logit_distance`
  (plain `keras.ops`, a full sort per row), averaged, differentiated by the
  backend's autodiff;
- fused: `keras_kd.ops.fused_linear_logit_distance` (no `[rows, vocab]`
  tensor, closed-form gradients) at each chunk size of `--chunks` (0: its
  default).

Compiled as `model.fit` compiles on a CPU (`jax.jit`,
`tf.function(jit_compile=True)`, eager torch). Reported: the median step
time of interleaved rounds, the speed-up over dense, the peak
resident-memory growth of the first step in a fresh process per
implementation, and the loss's relative error against float64 NumPy.

`--memory-case LABEL` is the child process that measures one
implementation's first-call memory.
"""

import argparse

import numpy as np

from benchmarks import common

NAME = "cross_vocab"
DISTANCES = ("universal", "hybrid")


def make_inputs(rows, hidden, vocab, t_vocab, seed=0):
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(hidden)
    return [
        rng.normal(size=(rows, hidden)).astype("float32"),
        (rng.normal(size=(hidden, vocab)) * scale).astype("float32"),
        rng.normal(size=(rows, hidden)).astype("float32"),
        (rng.normal(size=(hidden, t_vocab)) * 2 * scale).astype("float32"),
    ]


def matched_ids(vocab, t_vocab, seed=1):
    rng = np.random.default_rng(seed)
    count = vocab // 2
    student = np.sort(rng.choice(vocab, count, replace=False))
    return student, rng.choice(t_vocab, count, replace=False)


def losses(distance, chunks, match):
    """label -> `(hs, ks, ht, kt) -> scalar`."""
    from keras import ops

    import keras_kd

    def dense(hs, ks, ht, kt):
        zs, zt = ops.matmul(hs, ks), ops.matmul(ht, kt)
        if distance == "universal":
            rows = keras_kd.ops.universal_logit_distance(zt, zs)
        else:
            rows = keras_kd.ops.hybrid_logit_distance(zt, zs, matched_ids=match)
        return ops.mean(rows)

    found = {f"{distance}, dense": dense}
    for chunk in chunks:

        def fused(hs, ks, ht, kt, chunk=chunk):
            return keras_kd.ops.fused_linear_logit_distance(
                hs,
                ks,
                ht,
                kt,
                distance=distance,
                matched_ids=match if distance == "hybrid" else None,
                chunk_size=chunk,
            )

        size = "default" if chunk is None else chunk
        found[f"{distance}, fused, chunk {size}"] = fused
    return found


def step(loss_fn):
    return common.value_and_grad(loss_fn, argnums=(0, 1), jit_compile=True)


def float64_loss(distance, arrays, match):
    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    def sorted_l1(a, b):
        width = max(a.shape[-1], b.shape[-1])
        a = np.pad(-np.sort(-a, -1), [(0, 0), (0, width - a.shape[-1])])
        b = np.pad(-np.sort(-b, -1), [(0, 0), (0, width - b.shape[-1])])
        return np.abs(a - b).sum(-1)

    hs, ks, ht, kt = (x.astype("float64") for x in arrays)
    q, p = softmax(hs @ ks), softmax(ht @ kt)
    if distance == "universal":
        return float(sorted_l1(q, p).mean())
    qm, pm = q[:, match[0]], p[:, match[1]]
    m = 0.5 * (qm + pm)
    exact = 0.5 * (pm * np.log(pm / m) + qm * np.log(qm / m)).sum(-1)
    rest = sorted_l1(np.delete(q, match[0], 1), np.delete(p, match[1], 1))
    return float((exact + rest).mean())


def memory_child(args):
    arrays = make_inputs(*args.shape)
    tensors = [common.to_tensor(x) for x in arrays]
    match = matched_ids(*args.shape[2:])
    distance = args.memory_case.split(",")[0]
    run = step(losses(distance, args.chunks, match)[args.memory_case])
    common.print_json({"bytes": common.peak_rss_growth(lambda: run(*tensors))})


def timing_table(args, repeats):
    from keras import ops

    arrays = make_inputs(*args.shape)
    tensors = [common.to_tensor(x) for x in arrays]
    match = matched_ids(*args.shape[2:])
    child_args = ["--shape", ",".join(map(str, args.shape))]
    child_args += ["--chunks", ",".join(str(c or 0) for c in args.chunks)]
    fns, rows = {}, {}
    for distance in DISTANCES:
        truth = float64_loss(distance, arrays, match)
        for label, loss_fn in losses(distance, args.chunks, match).items():
            memory = common.run_child(
                "benchmarks.bench_cross_vocab",
                ["--memory-case", label, *child_args],
                env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
            )["bytes"]
            run = step(loss_fn)
            value = float(ops.convert_to_numpy(run(*tensors)[0]))
            fns[label] = lambda run=run: run(*tensors)
            rows[label] = (memory, abs(value - truth) / truth)
    samples = common.time_interleaved(fns, repeats, warmup=1)
    table = []
    for label, (memory, error) in rows.items():
        dense = common.median(samples[label.split(",")[0] + ", dense"])
        table.append(
            [
                label,
                common.format_ms(samples[label]),
                common.fmt(dense / common.median(samples[label]), 2),
                f"{memory / 2**20:.0f}",
                f"{error:.1e}",
            ]
        )
    header = [
        "distance, implementation",
        "fwd + bwd ms",
        "speed-up over dense",
        "peak RSS growth MiB, first call",
        "loss rel. error vs float64",
    ]
    return common.markdown_table(header, table)


def add_arguments(parser):
    parser.add_argument(
        "--shape",
        default=None,
        help="rows,hidden,student_vocab,teacher_vocab (1024,256,16000,32000)",
    )
    parser.add_argument(
        "--chunks", default="0,64", help="chunk sizes, 0 for the default"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    quick = "128,64,2000,3000" if args.quick else "1024,256,16000,32000"
    args.shape = [int(x) for x in (args.shape or quick).split(",")]
    args.chunks = [int(c) or None for c in args.chunks.split(",")]
    if args.memory_case:
        memory_child(args)
        return
    repeats = args.repeats or (3 if args.quick else 5)
    rows, hidden, vocab, t_vocab = args.shape
    compiled = {
        "jax": "jax.jit",
        "tensorflow": "tf.function(jit_compile=True)",
        "torch": "eager",
    }[common.backend()]
    text = "\n\n".join(
        [
            common.fragment_heading("Cross-vocabulary distances").rstrip(),
            f"One step, {rows} rows, hidden {hidden}, student vocabulary "
            f"{vocab}, teacher vocabulary {t_vocab} (hybrid: {vocab // 2} "
            f"matched ids), float32, T = 1, {compiled}; {repeats} "
            "interleaved rounds.",
            timing_table(args, repeats),
        ]
    )
    print(text + "\n")
    common.write_fragment(NAME, text + "\n", args.results_dir)


if __name__ == "__main__":
    main()
