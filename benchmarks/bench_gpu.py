"""The GPU figures of issues 10 and 11, on one backend (torch or JAX).

    KERAS_BACKEND=torch python -m benchmarks.bench_gpu [--quick]
        [--sections kl,others,fused]

- `kl`: one KL value and its gradient with respect to the student logits
  (forward + backward, `T = 2`, batch mean) at 8192 x 32000 float32 and
  8192 x 128256 bfloat16: keras-kd's three paths against the backend's
  own KL (`F.kl_div(log_target=True)`, optax), Liger-Kernel's Triton
  `LigerKLDIVLoss` on torch, and a plain `keras.ops` formula; time, the
  byte floor (read both logits, write the gradient, at the copy bandwidth
  measured in the same run) and peak memory in copies of the logits.
- `others`: the same for the symmetric KL, JSD and GlobalPointer
  divergence at 8192 x 32000 float32, against plain `keras.ops`.
- `fused`: `fused_linear_divergence` (KL, `T = 1`) at the shape of issue
  11 (8192 tokens, student hidden 2048, teacher hidden 4096, vocabulary
  128,256, bfloat16), gradients to the student's hidden states and
  kernel, at several chunk sizes; against the dense computation and, on
  torch, Liger-Kernel's `LigerFusedLinearJSD(jsd_beta=0)` (forward KL) and
  a dense `F.kl_div`. Time, peak memory beyond the inputs, and agreement
  with the dense keras-kd computation.

The usual fast path of each backend (eager torch autograd, `jax.jit`);
all implementations of one table in one process, interleaved
(`common.time_interleaved`); ratios divide medians. Inputs are drawn on
the device (N(0, 2^2) logits). Peak memory: torch's
`max_memory_allocated` growth (the returned gradients included), JAX's
compiled `memory_analysis()` (scratch + outputs). Liger-Kernel is used
only here, when it is installed and a GPU is present.
"""

import math

from benchmarks import bench_engine, bench_fused_linear, common

NAME = "gpu"
T = 2.0
KL_SHAPES = ((8192, 32000, "float32"), (8192, 128256, "bfloat16"))
FUSED_SHAPE = (8192, 2048, 4096, 128256)
CHUNKS = (None, 128, 256, 512, 1024, 2048)
QUICK = {
    "kl": ((256, 1000, "float32"), (256, 2000, "bfloat16")),
    "others": (256, 1000),
    "fused": (256, 64, 96, 1000),
    "chunks": (None, 64),
}


def add_arguments(parser):
    parser.add_argument("--sections", default="kl,others,fused")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--chunks",
        default=",".join(str(c or 0) for c in CHUNKS),
        help="fused chunk sizes, 0 for the default",
    )


# ------------------------------------------------------------------ inputs


def normal(shape, dtype, seed, scale=1.0):
    """N(0, scale^2) drawn on the device, in `dtype`."""
    if common.backend() == "torch":
        import torch

        gen = torch.Generator(device="cuda" if common.on_gpu() else "cpu")
        gen.manual_seed(seed)
        x = torch.randn(shape, generator=gen, device=gen.device) * scale
        return x.to(getattr(torch, dtype))
    import jax

    x = jax.random.normal(jax.random.key(seed), shape) * scale
    return x.astype(dtype)


def bandwidth(nbytes=2**31):
    """Device memory bandwidth (bytes read + written per second) of a
    large copy, the best of 10."""
    import time

    if common.backend() == "torch":
        import torch

        src = normal((nbytes // 4,), "float32", 0)
        dst = torch.empty_like(src)
        copy = lambda: dst.copy_(src)  # noqa: E731
    else:
        import jax

        src = normal((nbytes // 4,), "float32", 0)
        step = jax.jit(lambda x: x + 1.0)
        copy = lambda: step(src)  # noqa: E731
    best = math.inf
    for _ in range(12):
        start = time.perf_counter()
        common.block(copy())
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


# ------------------------------------------------------------------ shared


def device_max_difference(a, b):
    """max |a - b| computed on the device, as a Python float."""
    from keras import ops

    diff = ops.abs(ops.cast(a, "float32") - ops.cast(b, "float32"))
    return float(ops.convert_to_numpy(ops.max(diff)))


def relative_norm_difference(a, b):
    from keras import ops

    a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    num = ops.sqrt(ops.sum(ops.square(a - b)))
    return float(ops.convert_to_numpy(num / ops.sqrt(ops.sum(ops.square(b)))))


def peak_bytes(run, args):
    """Peak memory of `run(*args)` beyond what existed before (torch), or
    scratch + outputs of the compiled program (JAX)."""
    if common.backend() == "jax":
        analysis = run.lower(*args).compile().memory_analysis()
        return analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    found, _ = common.peak_memory_growth(lambda: run(*args))
    return found


def timed_rows(runs, args, repeats):
    """`{label: samples}` of interleaved calls `run(*args)`."""
    return common.time_interleaved(
        {k: (lambda r=r: r(*args)) for k, r in runs.items()},
        repeats,
        warmup=2,
    )


# ---------------------------------------------------------------- KL tables


def liger_kl():
    """Liger-Kernel's Triton KL as `(t, s) -> scalar`, or None."""
    if common.backend() != "torch" or not common.on_gpu():
        return None
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    import torch.nn.functional as F

    loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda t, s: (
        loss(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)) * T * T
    )


def kl_implementations(name="kl"):
    """`bench_engine.implementations`, with Liger-Kernel's KL after the
    backend's own where it runs."""
    found = bench_engine.implementations(name)
    liger = liger_kl() if name == "kl" else None
    if liger is None:
        return found
    items = list(found.items())
    items.insert(1, ("Liger-Kernel LigerKLDIVLoss (Triton)", liger))
    return dict(items)


def divergence_table(name, rows, vocab, dtype, repeats, gbps):
    t = normal((rows, vocab), dtype, 1, 2.0)
    s = normal((rows, vocab), dtype, 2, 2.0)
    impls = kl_implementations(name)
    runs = {k: common.value_and_grad(f) for k, f in impls.items()}
    first = next(iter(runs))
    reference = runs[first](t, s)[1]
    agree = {
        k: device_max_difference(r(t, s)[1], reference) for k, r in runs.items()
    }
    memory = {k: peak_bytes(r, (t, s)) for k, r in runs.items()}
    samples = timed_rows(runs, (t, s), repeats)
    itemsize = 2 if dtype == "bfloat16" else 4
    logits_bytes = rows * vocab * itemsize
    floor_ms = 3 * logits_bytes / gbps * 1e3
    base = common.summary(samples[first])[0]
    table = []
    for key in impls:
        median = common.summary(samples[key])[0]
        table.append(
            [
                key,
                common.format_ms(samples[key]),
                common.fmt(median / base),
                common.fmt(median * 1e3 / floor_ms),
                common.fmt(memory[key] / logits_bytes, 2),
                f"{agree[key]:.1e}",
            ]
        )
    header = [
        "implementation",
        "fwd + bwd ms, median (IQR)",
        f"/ {first}",
        "/ byte floor",
        "peak memory, copies of the logits",
        "max grad difference",
    ]
    title = (
        f"{name}, {rows} x {vocab} {dtype}, T = {T}; byte floor "
        f"{common.fmt(floor_ms)} ms (3 logits-sized transfers at "
        f"{gbps / 1e12:.2f} TB/s measured)"
    )
    return f"#### {title}\n\n" + common.markdown_table(header, table)


# ------------------------------------------------------------ fused linear


def fused_inputs(tokens, hs_width, ht_width, vocab):
    return [
        normal((tokens, hs_width), "bfloat16", 3),
        normal((hs_width, vocab), "bfloat16", 4, hs_width**-0.5),
        normal((tokens, ht_width), "bfloat16", 5),
        normal((ht_width, vocab), "bfloat16", 6, 2 * ht_width**-0.5),
    ]


def fused_step(loss_fn):
    """`run(hs, ks, ht, kt) -> (loss, (d hs, d ks))`, blocking: the step
    of `bench_fused_linear`."""
    return bench_fused_linear.step(loss_fn)


def fused_losses(chunks):
    from keras import ops

    from keras_kd import ops as kd

    def dense(hs, ks, ht, kt):
        zs = ops.cast(ops.matmul(hs, ks), "float32")
        zt = ops.cast(ops.matmul(ht, kt), "float32")
        return ops.mean(kd.kl_divergence(zt, zs))

    found = {"keras-kd dense (bf16 logits, kl_divergence)": dense}
    for chunk in chunks:

        def fused(hs, ks, ht, kt, chunk=chunk):
            return kd.fused_linear_divergence(hs, ks, ht, kt, chunk_size=chunk)

        label = "default" if chunk is None else str(chunk)
        found[f"keras-kd fused, chunk {label}"] = fused
    if common.backend() == "torch":
        import torch.nn.functional as F

        def torch_dense(hs, ks, ht, kt):
            lq = F.log_softmax((hs @ ks).float(), -1)
            lp = F.log_softmax((ht @ kt).float(), -1)
            return F.kl_div(lq, lp, log_target=True, reduction="batchmean")

        found["torch dense F.kl_div (float32 softmax)"] = torch_dense
    return found


def liger_fused(ks, kt):
    """Liger-Kernel's fused linear JSD at beta = 0 (forward KL), given the
    kernels in its `[V, H]` layout (made once, outside the timing)."""
    if common.backend() != "torch" or not common.on_gpu():
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        return None
    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    ks_t, kt_t = ks.t().contiguous(), kt.t().contiguous()

    import torch

    def run(hs, ks_, ht, kt_):
        hs = hs.detach().requires_grad_(True)
        weight = ks_t.detach().requires_grad_(True)
        value = loss(hs, weight, ht, kt_t, None)
        grads = torch.autograd.grad(value, [hs, weight])
        return common.block((value.detach(), grads))

    return run


def fused_table(shape, chunks, repeats):
    tokens, hs_width, ht_width, vocab = shape
    args = fused_inputs(*shape)
    runs = {k: fused_step(f) for k, f in fused_losses(chunks).items()}
    liger = liger_fused(args[1], args[3])
    if liger is not None:
        runs["Liger-Kernel LigerFusedLinearJSD(jsd_beta=0)"] = liger
    from keras import ops

    def scalar(v):
        return float(ops.convert_to_numpy(ops.cast(v, "float32")))

    dense_key = next(iter(runs))
    value, grads = runs[dense_key](*args)
    rows, memory = {}, {}
    for key, run in runs.items():
        v, g = run(*args)
        rel = abs(scalar(v) - scalar(value)) / abs(scalar(value))
        if key.startswith("Liger"):
            g = (g[0], ops.transpose(g[1]))
        g_rel = [relative_norm_difference(a, b) for a, b in zip(g, grads)]
        rows[key] = [f"{rel:.1e}", f"{max(g_rel):.1e}"]
        del v, g
        memory[key] = peak_bytes(run, args)
    samples = timed_rows(runs, args, repeats)
    grads_bytes = (tokens * hs_width + hs_width * vocab) * 2
    one_f32 = tokens * vocab * 4
    liger_key = "Liger-Kernel LigerFusedLinearJSD(jsd_beta=0)"
    reference = None
    if liger_key in samples:
        reference = common.summary(samples[liger_key])[0]
    base = common.summary(samples[dense_key])[0]
    table = []
    for key in runs:
        median = common.summary(samples[key])[0]
        extra = memory[key] - grads_bytes
        table.append(
            [
                key,
                common.format_ms(samples[key]),
                common.fmt(base / median, 2),
                "-" if reference is None else common.fmt(median / reference, 2),
                f"{memory[key] / 1e9:.2f}",
                common.fmt(extra / one_f32, 2),
                *rows[key],
            ]
        )
    header = [
        "implementation",
        "fwd + bwd ms, median (IQR)",
        "speed-up over dense",
        "/ Liger",
        "peak beyond inputs, GB (gradients included)",
        "without the gradients, / one float32 [tokens, vocab]",
        "loss rel. diff. vs dense",
        "grad rel. norm diff. vs dense",
    ]
    title = (
        f"fused linear KL, {tokens} tokens, student hidden {hs_width}, "
        f"teacher hidden {ht_width}, vocabulary {vocab}, bfloat16, T = 1"
    )
    return f"#### {title}\n\n" + common.markdown_table(header, table)


def jax_scratch_table(shape):
    """Compiled scratch of the default fused step as tokens grow."""
    import jax
    import jax.numpy as jnp

    _, hs_width, ht_width, vocab = shape
    fused = fused_losses((None,))["keras-kd fused, chunk default"]
    rows = []
    for tokens in (4096, 8192, 16384):
        dims = [
            (tokens, hs_width),
            (hs_width, vocab),
            (tokens, ht_width),
            (ht_width, vocab),
        ]
        specs = [jax.ShapeDtypeStruct(d, jnp.bfloat16) for d in dims]
        analysis = fused_step(fused).lower(*specs).compile().memory_analysis()
        temp = analysis.temp_size_in_bytes
        rows.append(
            [
                str(tokens),
                f"{temp / 2**20:.0f}",
                common.fmt(temp / (tokens * vocab * 4), 3),
            ]
        )
    header = ["tokens", "scratch MiB", "/ one float32 [tokens, vocab]"]
    return common.markdown_table(header, rows)


# -------------------------------------------------------------------- main


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    sections = args.sections.split(",")
    repeats = 3 if args.quick else args.repeats
    parts = [common.fragment_heading("GPU").rstrip(), ""]
    gbps = bandwidth(2**24 if args.quick else 2**31)
    if "kl" in sections:
        for rows, vocab, dtype in QUICK["kl"] if args.quick else KL_SHAPES:
            parts += [
                divergence_table("kl", rows, vocab, dtype, repeats, gbps),
                "",
            ]
            print(parts[-2], flush=True)
    if "others" in sections:
        rows, vocab = QUICK["others"] if args.quick else KL_SHAPES[0][:2]
        for name in ("symmetric_kl", "jsd", "global_pointer"):
            parts += [
                divergence_table(name, rows, vocab, "float32", repeats, gbps),
                "",
            ]
            print(parts[-2], flush=True)
    if "fused" in sections:
        shape = QUICK["fused"] if args.quick else FUSED_SHAPE
        chunks = [int(c) or None for c in args.chunks.split(",")]
        chunks = QUICK["chunks"] if args.quick else chunks
        parts += [fused_table(shape, chunks, repeats), ""]
        print(parts[-2], flush=True)
        if common.backend() == "jax":
            parts += [
                "Compiled scratch of the default fused step:",
                "",
                jax_scratch_table(shape),
                "",
            ]
            print(parts[-2], flush=True)
    common.write_fragment(NAME, "\n".join(parts), results_dir=args.results_dir)


if __name__ == "__main__":
    main()
