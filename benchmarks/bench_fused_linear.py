"""The fused linear divergence against the dense computation, one backend.

    KERAS_BACKEND=jax python -m benchmarks.bench_fused_linear [--quick]
        [--shape TOKENS,HIDDEN,VOCAB] [--chunks 0,256] [--torch-threads N]

One training step's loss and gradients with respect to the student's
hidden states and kernel, KL at `T = 2`, float32 (the CPU setting; the GPU
one, bfloat16 with Liger-Kernel alongside, is `benchmarks.bench_gpu`):

- dense: `teacher_hidden @ teacher_kernel` and `student_hidden @
  student_kernel` materialized, then `keras_kd.ops.kl_divergence`,
  averaged over tokens, differentiated by the backend's autodiff;
- fused: `keras_kd.ops.fused_linear_divergence` (no `[tokens, vocab]`
  tensor) at each chunk size of `--chunks` (0: its default).

Each compiled as `model.fit` compiles it on a CPU's fastest setting:
`jax.jit`, `tf.function(jit_compile=True)`, eager torch. Reported: the
median step time (quartiles) of interleaved rounds, the speed-up over
dense (ratio of medians), the peak resident-memory growth of the first
step in a fresh process per implementation (glibc's mmap threshold fixed),
the loss's relative error against float64 NumPy, and on JAX the compiled
programs' scratch (`memory_analysis().temp_size_in_bytes`) at two token
counts: flat in the token count for the fused op.

`--memory-case LABEL` is the child process that measures one
implementation's first-call memory.
"""

import argparse

import numpy as np

from benchmarks import common

NAME = "fused_linear"
T = 2.0
DENSE = "dense (logits + kl_divergence)"


def make_inputs(tokens, hidden, vocab, seed=0):
    """Student hidden, kernel, teacher hidden, kernel: float32 NumPy."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(hidden)
    return [
        rng.normal(size=(tokens, hidden)).astype("float32"),
        (rng.normal(size=(hidden, vocab)) * scale).astype("float32"),
        rng.normal(size=(tokens, hidden)).astype("float32"),
        (rng.normal(size=(hidden, vocab)) * 2 * scale).astype("float32"),
    ]


def chunk_label(chunk):
    return f"fused, chunk {'default' if chunk is None else chunk}"


def losses(chunks, temperature=T, logits_dtype=None):
    """label -> `(hs, ks, ht, kt) -> scalar`: dense keras-kd, then the
    fused op at each chunk size. `logits_dtype` casts the dense logits
    (float32 for a bfloat16 model, as a training step does)."""
    from keras import ops

    import keras_kd

    def dense(hs, ks, ht, kt):
        zs, zt = ops.matmul(hs, ks), ops.matmul(ht, kt)
        if logits_dtype is not None:
            zs, zt = ops.cast(zs, logits_dtype), ops.cast(zt, logits_dtype)
        rows = keras_kd.ops.kl_divergence(zt, zs, temperature=temperature)
        return ops.mean(rows)

    found = {DENSE: dense}
    for chunk in chunks:

        def fused(hs, ks, ht, kt, chunk=chunk):
            return keras_kd.ops.fused_linear_divergence(
                hs, ks, ht, kt, temperature=temperature, chunk_size=chunk
            )

        found[chunk_label(chunk)] = fused
    return found


def step(loss_fn):
    """`run(hs, ks, ht, kt) -> (loss, (d hs, d ks))`, blocking."""
    return common.value_and_grad(loss_fn, argnums=(0, 1), jit_compile=True)


def float64_loss(hs, ks, ht, kt):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    f64 = [x.astype("float64") for x in (hs, ks, ht, kt)]
    lq = log_softmax(f64[0] @ f64[1] / T)
    lp = log_softmax(f64[2] @ f64[3] / T)
    return T * T * float(np.mean((np.exp(lp) * (lp - lq)).sum(-1)))


def memory_child(args):
    """Child process: peak RSS growth of the first step of one case (no
    memory left over from another implementation; TensorFlow's allocator
    keeps what a call freed, so only a first call shows its peak)."""
    tensors = [common.to_tensor(x) for x in make_inputs(*args.shape)]
    run = step(losses(args.chunks)[args.memory_case])
    common.print_json({"bytes": common.peak_rss_growth(lambda: run(*tensors))})


def timing_table(args, repeats):
    from keras import ops

    arrays = make_inputs(*args.shape)
    tensors = [common.to_tensor(x) for x in arrays]
    truth = float64_loss(*arrays)
    fns, rows = {}, {}
    child_args = ["--shape", ",".join(map(str, args.shape))]
    child_args += ["--chunks", ",".join(str(c or 0) for c in args.chunks)]
    if args.torch_threads:
        child_args += ["--torch-threads", str(args.torch_threads)]
    for label, loss_fn in losses(args.chunks).items():
        memory = common.run_child(
            "benchmarks.bench_fused_linear",
            ["--memory-case", label, *child_args],
            # glibc keeps freed blocks below its (adaptive) mmap threshold
            # in the heap: without a fixed threshold the RSS of many chunk
            # temporaries shows the allocator, not the live tensors.
            env={"MALLOC_MMAP_THRESHOLD_": str(2**20)},
        )["bytes"]
        run = step(loss_fn)
        value = float(ops.convert_to_numpy(run(*tensors)[0]))
        fns[label] = lambda run=run: run(*tensors)
        rows[label] = (memory, abs(value - truth) / truth)
    samples = common.time_interleaved(fns, repeats, warmup=1)
    dense = common.median(samples[DENSE])
    table = [
        [
            label,
            common.format_ms(samples[label]),
            common.fmt(dense / common.median(samples[label]), 2),
            f"{memory / 2**20:.0f}",
            f"{error:.1e}",
        ]
        for label, (memory, error) in rows.items()
    ]
    header = [
        "implementation",
        "fwd + bwd ms",
        "speed-up over dense",
        "peak RSS growth MiB, first call",
        "loss rel. error vs float64",
    ]
    return common.markdown_table(header, table)


def jax_scratch_table(args, token_counts):
    """Compiled scratch of each step at several token counts."""
    import jax
    import jax.numpy as jnp

    _, hidden, vocab = args.shape
    rows = []
    for tokens in token_counts:
        shapes = [(tokens, hidden), (hidden, vocab)] * 2
        specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        for label, loss_fn in losses(args.chunks).items():
            compiled = step(loss_fn).lower(*specs).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            rows.append(
                [
                    str(tokens),
                    label,
                    f"{temp / 2**20:.1f}",
                    common.fmt(temp / (tokens * vocab * 4), 2),
                ]
            )
    header = [
        "tokens",
        "implementation",
        "scratch MiB",
        "/ one float32 [tokens, vocab]",
    ]
    return common.markdown_table(header, rows)


def add_arguments(parser):
    parser.add_argument(
        "--shape", default=None, help="tokens,hidden,vocab (2048,256,32000)"
    )
    parser.add_argument(
        "--chunks", default="0,256", help="chunk sizes, 0 for the default"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads (on a loaded machine, 1 avoids "
        "threads waiting on each other at every small op)",
    )
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    quick_shape = "256,64,4000" if args.quick else "2048,256,32000"
    args.shape = [int(x) for x in (args.shape or quick_shape).split(",")]
    args.chunks = [int(c) or None for c in args.chunks.split(",")]
    if common.backend() == "torch" and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.memory_case:
        memory_child(args)
        return
    repeats = args.repeats or (3 if args.quick else 5)
    tokens, hidden, vocab = args.shape
    compiled = {
        "jax": "jax.jit",
        "tensorflow": "tf.function(jit_compile=True)",
        "torch": "eager",
    }[common.backend()]
    lines = [
        common.fragment_heading("Fused linear divergence").rstrip(),
        f"One step, {tokens} tokens, hidden {hidden}, vocabulary {vocab}, "
        f"float32, KL at T = {T:g}, {compiled}; {repeats} interleaved "
        "rounds.",
        timing_table(args, repeats),
    ]
    if common.backend() == "jax":
        lines += [
            "Compiled scratch (XLA `memory_analysis()`), same step:",
            jax_scratch_table(args, (tokens, 4 * tokens)),
        ]
    text = "\n\n".join(lines) + "\n"
    print(text)
    common.write_fragment(NAME, text, args.results_dir)


if __name__ == "__main__":
    main()
