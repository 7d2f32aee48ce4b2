"""Fused linear distillation loss against the dense computation.

Compares, on the backend named by `KERAS_BACKEND`, one training step's
loss and gradients (with respect to the student's hidden states and
kernel) of:

- dense: `teacher_hidden @ teacher_kernel` and `student_hidden @
  student_kernel` materialized, then `keras_kd.ops.kl_divergence`, averaged
  over tokens, differentiated by the backend's autodiff;
- fused: `keras_kd.ops.fused_linear_divergence` (no `[tokens, vocab]`
  tensor), at its default chunk size and at 256 tokens per chunk.

Each is run the way `model.fit` runs it by default: `jax.jit`,
`tf.function(jit_compile=True)`, eager torch. Reported: the median time of
a forward+backward step (with quartiles), the growth of the process's peak
resident memory during the first step, the relative error of the loss against a
float64 NumPy computation, and on JAX the compiled programs' scratch memory
(`memory_analysis().temp_size_in_bytes`) at two token counts, to show that
the fused op's memory does not grow with the token count.

Run by hand, once per backend (a few minutes each on a 2-core CPU):

    KERAS_BACKEND=jax python -m benchmarks.bench_fused_linear
    KERAS_BACKEND=tensorflow python -m benchmarks.bench_fused_linear
    KERAS_BACKEND=torch python -m benchmarks.bench_fused_linear
    KERAS_BACKEND=torch python -m benchmarks.bench_fused_linear \
        --torch-threads 1

It prints markdown; it writes no file. `--quick` is a smoke run;
`--memory-case NAME --shape T,H,V` is the child process that measures one
implementation's first-call memory in a fresh interpreter.
"""

import json

import numpy as np

from benchmarks import common

T = 2.0


def make_inputs(tokens, hidden, vocab, seed=0):
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(hidden)
    return [
        rng.normal(size=(tokens, hidden)).astype("float32"),
        (rng.normal(size=(hidden, vocab)) * scale).astype("float32"),
        rng.normal(size=(tokens, hidden)).astype("float32"),
        (rng.normal(size=(hidden, vocab)) * 2 * scale).astype("float32"),
    ]


def losses():
    from keras import ops

    from keras_kd import ops as kd

    def dense(hs, ks, ht, kt):
        zs, zt = ops.matmul(hs, ks), ops.matmul(ht, kt)
        return ops.mean(kd.kl_divergence(zt, zs, temperature=T))

    def fused(chunk_size):
        def loss(hs, ks, ht, kt):
            return kd.fused_linear_divergence(
                hs, ks, ht, kt, temperature=T, chunk_size=chunk_size
            )

        return loss

    return {
        "dense": dense,
        "fused": fused(None),
        "fused256": fused(256),
    }


LABELS = {
    "dense": "dense (logits + kl_divergence)",
    "fused": "fused, default chunk",
    "fused256": "fused, 256-token chunks",
}


def step(loss_fn):
    """`run(hs, ks, ht, kt) -> (loss, (d hs, d ks))`, compiled as
    `model.fit` compiles it, blocking until done."""
    name = common.backend()
    if name == "jax":
        import jax

        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))

        def run(*args):
            return common.block(compiled(*args))

        run.lower = compiled.lower
        return run
    if name == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def compiled(hs, ks, ht, kt):
            with tf.GradientTape() as tape:
                tape.watch([hs, ks])
                value = loss_fn(hs, ks, ht, kt)
            return value, tape.gradient(value, [hs, ks])

        return compiled
    import torch

    def run(hs, ks, ht, kt):
        hs = hs.detach().requires_grad_(True)
        ks = ks.detach().requires_grad_(True)
        value = loss_fn(hs, ks, ht, kt)
        grads = torch.autograd.grad(value, [hs, ks])
        # On a GPU: wait for the kernels, or the timing reads the launch.
        return common.block((value.detach(), grads))

    return run


def reference(hs, ks, ht, kt):
    """The loss in float64 NumPy."""

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    f64 = [x.astype("float64") for x in (hs, ks, ht, kt)]
    lq = log_softmax(f64[0] @ f64[1] / T)
    lp = log_softmax(f64[2] @ f64[3] / T)
    return T * T * float(np.mean((np.exp(lp) * (lp - lq)).sum(-1)))


def first_call_memory(case, tokens, hidden, vocab):
    """Peak RSS growth of the first step of `case`, in a fresh process (no
    memory left over from another implementation; TensorFlow's allocator
    keeps what a call freed, so only a first call shows its peak)."""
    from keras import ops

    tensors = [
        ops.convert_to_tensor(x) for x in make_inputs(tokens, hidden, vocab)
    ]
    run = step(losses()[case])
    return common.peak_rss_growth(lambda: run(*tensors))


def timing_table(tokens, hidden, vocab, repeats):
    from keras import ops

    arrays = make_inputs(tokens, hidden, vocab)
    tensors = [ops.convert_to_tensor(x) for x in arrays]
    truth = reference(*arrays)
    fns, rows = {}, []
    for case, loss_fn in losses().items():
        memory = common.run_child(
            "benchmarks.bench_fused_linear",
            ["--memory-case", case, "--shape", f"{tokens},{hidden},{vocab}"],
            # glibc keeps freed blocks below its (adaptive) mmap threshold
            # in the heap: without a fixed threshold the RSS of many 8 MiB
            # chunk temporaries shows the allocator, not the live tensors.
            env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
        )["bytes"]
        run = step(loss_fn)
        value = float(ops.convert_to_numpy(run(*tensors)[0]))
        fns[case] = lambda run=run: run(*tensors)
        error = common.fmt(abs(value - truth) / truth, 2)
        rows.append([case, None, f"{memory / 2**20:.0f}", error])
    samples = common.time_interleaved(fns, repeats, warmup=1)
    dense_median = common.summary(samples["dense"])[0]
    for row in rows:
        median = common.summary(samples[row[0]])[0]
        row[1] = common.format_ms(samples[row[0]])
        row.insert(2, common.fmt(dense_median / median, 2))
        row[0] = LABELS[row[0]]
    header = [
        "implementation",
        "forward+backward ms, median (quartiles)",
        "speed-up over dense",
        "peak RSS growth MB, first call",
        "loss rel. error vs float64",
    ]
    return common.markdown_table(header, rows)


def jax_memory_table(token_counts, hidden, vocab):
    import jax
    import jax.numpy as jnp

    rows = []
    for tokens in token_counts:
        shapes = [(tokens, hidden), (hidden, vocab)] * 2
        specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        one = tokens * vocab * 4
        for case, loss_fn in losses().items():
            compiled = step(loss_fn).lower(*specs).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            rows.append(
                [
                    str(tokens),
                    LABELS[case],
                    f"{temp / 2**20:.1f}",
                    common.fmt(temp / one, 2),
                ]
            )
    header = [
        "tokens",
        "implementation",
        "temp_size_in_bytes (MiB)",
        "/ one float32 [tokens, vocab]",
    ]
    return common.markdown_table(header, rows)


def _memory_arguments(parser):
    parser.add_argument("--memory-case", choices=sorted(LABELS))
    parser.add_argument("--shape", help="tokens,hidden,vocab")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (on a loaded machine, 1 avoids "
        "threads waiting on each other at every small op)",
    )


def main(argv=None):
    args = common.parse_args(
        __doc__.splitlines()[0], argv, add_arguments=_memory_arguments
    )
    if args.memory_case:
        # The child process of `timing_table`: one JSON line.
        shape = [int(x) for x in args.shape.split(",")]
        print(
            json.dumps({"bytes": first_call_memory(args.memory_case, *shape)})
        )
        return
    name = common.backend()
    if args.quick:
        tokens, hidden, vocab, repeats, counts = 256, 64, 4000, 3, (256, 512)
    else:
        tokens, hidden, vocab, repeats, counts = (
            2048,
            256,
            32000,
            5,
            (2048, 8192),
        )
    if name == "torch":
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        threads = torch.get_num_threads()
    else:
        threads = None
    compiled = {
        "jax": "jax.jit",
        "tensorflow": "tf.function(jit_compile=True)",
        "torch": f"eager, {threads} threads",
    }[name]
    lines = [
        common.fragment_heading("Fused linear divergence").rstrip(),
        "",
        f"{common.machine_summary()}.",
        "",
        f"One step (loss and gradients w.r.t. student hidden states and "
        f"kernel), {tokens} tokens, hidden {hidden}, vocabulary {vocab}, "
        f"float32, KL at T = {T}, {compiled}; {repeats} interleaved "
        "rounds.",
        "",
        timing_table(tokens, hidden, vocab, repeats),
    ]
    if name == "jax":
        lines += [
            "",
            "Compiled scratch memory (XLA `memory_analysis()`), same step:",
            "",
            jax_memory_table(counts, hidden, vocab),
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
