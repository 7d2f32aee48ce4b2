"""Divergences and the fused linear divergence at GPU sizes, one backend.

    KERAS_BACKEND=torch python -m benchmarks.bench_gpu [--quick]
        [--sections kl,others,fused] [--chunks 0,128,256,512] [--repeats N]

Meant for a CUDA GPU with torch or JAX (it runs on a CPU too, with
`--quick`, to rehearse). Inputs are drawn on the device.

- `kl`: `benchmarks.bench_divergence`'s table (forward + backward, `T = 2`,
  batch mean) at 8192 x 32000 float32 and 8192 x 128256 bfloat16:
  keras-kd against the backend's own KL, Liger-Kernel's Triton
  `LigerKLDIVLoss` (torch, when installed), Keras' loss on softmax and a
  plain `keras.ops` formula; time, byte floor (copy bandwidth measured on
  the device in the same run) and peak memory (torch's
  `max_memory_allocated` growth, JAX's compiled `memory_analysis()`).
- `others`: the same for the symmetric KL, JSD and GlobalPointer
  divergence at 8192 x 32000 float32.
- `fused`: `keras_kd.ops.fused_linear_divergence` (KL, `T = 1`) at 8192
  tokens, student hidden 2048, teacher hidden 4096, vocabulary 128,256,
  bfloat16, gradients to the student's hidden states and kernel, at the
  chunk sizes of `--chunks`; against the dense computation (float32
  logits), torch's dense `F.kl_div` and Liger-Kernel's
  `LigerFusedLinearJSD(jsd_beta=0)` (forward KL). Time, peak memory beyond
  the inputs, agreement with the dense keras-kd computation; on JAX also
  the compiled scratch of the default step as the token count grows.
"""

from benchmarks import bench_divergence, bench_fused_linear, common

NAME = "gpu"
KL_SHAPES = ((8192, 32000, "float32"), (8192, 128256, "bfloat16"))
OTHERS_SHAPE = (8192, 32000)
FUSED_SHAPE = (8192, 2048, 4096, 128256)
LIGER_FUSED = "Liger-Kernel LigerFusedLinearJSD(jsd_beta=0)"
TORCH_DENSE = "torch dense F.kl_div (float32 log_softmax)"
QUICK = {
    "kl": ((256, 1000, "float32"), (256, 2000, "bfloat16")),
    "others": (256, 1000),
    "fused": (256, 64, 96, 1000),
    "chunks": "0,64",
}


def add_arguments(parser):
    parser.add_argument("--sections", default="kl,others,fused")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--chunks", default="0,128,256,512", help="0 for the default"
    )


# ------------------------------------------------------------ fused linear


def fused_inputs(tokens, hs_width, ht_width, vocab):
    return [
        common.normal((tokens, hs_width), "bfloat16", 3),
        common.normal((hs_width, vocab), "bfloat16", 4, hs_width**-0.5),
        common.normal((tokens, ht_width), "bfloat16", 5),
        common.normal((ht_width, vocab), "bfloat16", 6, 2 * ht_width**-0.5),
    ]


def fused_runs(chunks, args_):
    """label -> step `run(hs, ks, ht, kt) -> (loss, (d hs, d ks))`."""
    found = bench_fused_linear.losses(
        chunks, temperature=1.0, logits_dtype="float32"
    )
    if common.backend() == "torch":
        found[TORCH_DENSE] = common.torch_dense_linear_kl(1.0)
    runs = {k: bench_fused_linear.step(f) for k, f in found.items()}
    liger = common.liger_fused_linear_kl(args_[1], args_[3])
    if liger is not None:
        runs[LIGER_FUSED] = liger
    return runs


def fused_table(shape, chunks, repeats):
    from keras import ops

    tokens, hs_width, _, vocab = shape
    args_ = fused_inputs(*shape)
    runs = fused_runs(chunks, args_)

    def scalar(v):
        return float(ops.convert_to_numpy(ops.cast(v, "float32")))

    value, grads = runs[bench_fused_linear.DENSE](*args_)
    agree, memory = {}, {}
    for key, run in runs.items():
        v, g = run(*args_)
        if key == LIGER_FUSED:  # its kernel gradient is [V, H]
            g = (g[0], ops.transpose(g[1]))
        differences = [
            common.relative_norm_difference(a, b) for a, b in zip(g, grads)
        ]
        agree[key] = (
            abs(scalar(v) - scalar(value)) / abs(scalar(value)),
            max(differences),
        )
        del v, g
        memory[key] = common.peak_memory(run, args_)[0]
    samples = common.time_interleaved(
        {k: (lambda r=r: r(*args_)) for k, r in runs.items()}, repeats
    )
    dense = common.median(samples[bench_fused_linear.DENSE])
    liger = LIGER_FUSED in samples and common.median(samples[LIGER_FUSED])
    gradient_bytes = (tokens * hs_width + hs_width * vocab) * 2
    table = []
    for key in runs:
        med = common.median(samples[key])
        table.append(
            [
                key,
                common.format_ms(samples[key]),
                common.fmt(dense / med, 2),
                common.fmt(med / liger, 2) if liger else "-",
                f"{memory[key] / 1e9:.2f}",
                common.fmt(
                    (memory[key] - gradient_bytes) / (tokens * vocab * 4), 2
                ),
                f"{agree[key][0]:.1e}",
                f"{agree[key][1]:.1e}",
            ]
        )
    header = [
        "implementation",
        "fwd + bwd ms",
        "speed-up over dense",
        "/ Liger",
        "peak beyond inputs, GB (gradients included)",
        "without the gradients, / one float32 [tokens, vocab]",
        "loss rel. diff. vs dense",
        "grad rel. norm diff. vs dense",
    ]
    title = (
        f"**fused linear KL**, {tokens} tokens, student hidden {hs_width}, "
        f"teacher hidden {shape[2]}, vocabulary {vocab}, bfloat16, T = 1, "
        f"{repeats} rounds:"
    )
    return title + "\n\n" + common.markdown_table(header, table)


def jax_scratch_table(shape):
    """Compiled scratch of the default fused step as tokens grow."""
    import jax
    import jax.numpy as jnp

    _, hs_width, ht_width, vocab = shape
    fused = bench_fused_linear.losses([None], temperature=1.0)
    run = bench_fused_linear.step(fused[bench_fused_linear.chunk_label(None)])
    rows = []
    for tokens in (shape[0] // 2, shape[0], shape[0] * 2):
        dims = [
            (tokens, hs_width),
            (hs_width, vocab),
            (tokens, ht_width),
            (ht_width, vocab),
        ]
        specs = [jax.ShapeDtypeStruct(d, jnp.bfloat16) for d in dims]
        temp = run.lower(*specs).compile().memory_analysis().temp_size_in_bytes
        rows.append(
            [
                str(tokens),
                f"{temp / 2**20:.0f}",
                common.fmt(temp / (tokens * vocab * 4), 3),
            ]
        )
    header = ["tokens", "scratch MiB", "/ one float32 [tokens, vocab]"]
    return "Compiled scratch of the default fused step:\n\n" + (
        common.markdown_table(header, rows)
    )


# -------------------------------------------------------------------- main


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    sections = args.sections.split(",")
    repeats = 3 if args.quick else args.repeats
    bandwidth = common.copy_bandwidth(2**24 if args.quick else 2**31)
    parts = [
        common.fragment_heading("GPU").rstrip(),
        f"Copy bandwidth on the device {bandwidth / 1e12:.2f} TB/s "
        "(read + write).",
    ]

    # In process on a GPU and on JAX; a CPU rehearsal skips the fresh
    # process per implementation that a CPU measurement needs.
    memory = common.on_gpu() or common.backend() == "jax"

    def add(text):
        parts.append(text)
        print(text + "\n", flush=True)

    if "kl" in sections:
        for rows, vocab, dtype in QUICK["kl"] if args.quick else KL_SHAPES:
            add(
                bench_divergence.speed_table(
                    "kl", (rows, vocab), dtype, repeats, bandwidth, memory
                )
            )
    if "others" in sections:
        shape = QUICK["others"] if args.quick else OTHERS_SHAPE
        for name in ("symmetric_kl", "jsd", "global_pointer"):
            add(
                bench_divergence.speed_table(
                    name, shape, "float32", repeats, bandwidth, memory
                )
            )
    if "fused" in sections:
        shape = QUICK["fused"] if args.quick else FUSED_SHAPE
        chunks = QUICK["chunks"] if args.quick else args.chunks
        chunks = [int(c) or None for c in chunks.split(",")]
        add(fused_table(shape, chunks, repeats))
        if common.backend() == "jax":
            add(jax_scratch_table(shape))
    common.write_fragment(NAME, "\n\n".join(parts), args.results_dir)


if __name__ == "__main__":
    main()
