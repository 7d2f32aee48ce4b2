"""CausalLMDistiller step time against its floor, on the backend named by
`KERAS_BACKEND`, all in one process with interleaved samples:

- `student`: the student keras-hub `LlamaCausalLM`'s own training step
  (`train_on_batch` with its next-token cross-entropy on logits);
- `teacher`: one teacher forward pass (backbone and head, logits built),
  compiled as the train functions are
  (`benchmarks.common.teacher_inference`);
- `fused`: `keras_kd.CausalLMDistiller.train_on_batch` (no logits built);
- `dense`: `keras_kd.Distiller` with the same loss on materialized logits.

The floor is `student + teacher`; the target for the CausalLMDistiller is
<= 1.05 of it.

Run `python -m benchmarks.bench_causal_lm [--quick]`.
"""

import numpy as np

from benchmarks import common

NAME = "causal_lm"


def add_arguments(parser):
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--teacher", default="4x256", help="layers x hidden width"
    )
    parser.add_argument(
        "--student", default="2x128", help="layers x hidden width"
    )
    parser.add_argument(
        "--dtype-policy",
        default="float32",
        help="Keras dtype policy, e.g. mixed_bfloat16",
    )


def layers_and_width(text):
    layers, width = (int(x) for x in text.split("x"))
    return layers, width


def llama(vocab, layers, hidden, seed):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_query_heads=max(4, hidden // 64),
        num_key_value_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


def measure(args):
    import keras

    import keras_kd

    keras.config.set_dtype_policy(args.dtype_policy)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, args.vocab, (args.batch, args.length + 1))
    tokens = tokens.astype("int32")
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((args.batch, args.length), "int32"),
    }
    y = tokens[:, 1:]
    w = np.ones(y.shape, "float32")
    teacher = llama(args.vocab, *layers_and_width(args.teacher), 0)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def student():
        return llama(args.vocab, *layers_and_width(args.student), 1)

    alone = student()
    alone.compile(keras.optimizers.Adam(1e-4), loss=ce, weighted_metrics=[])
    kl = keras_kd.losses.KLDivergence(temperature=2.0)
    fused = keras_kd.CausalLMDistiller(student(), teacher)
    fused.compile(keras.optimizers.Adam(1e-4), distillation_loss=kl)
    dense = keras_kd.Distiller(student(), teacher)
    dense.compile(keras.optimizers.Adam(1e-4), loss=ce, distillation_loss=kl)
    infer = common.teacher_inference(teacher)
    x_backend = {k: keras.ops.convert_to_tensor(v) for k, v in x.items()}
    samples = common.time_interleaved(
        {
            "student": lambda: alone.train_on_batch(x, y, sample_weight=w),
            "teacher": lambda: infer(x_backend),
            "fused": lambda: fused.train_on_batch(x, y, sample_weight=w),
            "dense": lambda: dense.train_on_batch(x, y, sample_weight=w),
        },
        repeats=args.repeats,
        warmup=3,
    )
    return samples


def section(samples, args):
    median = {k: common.summary(v)[0] for k, v in samples.items()}
    floor = median["student"] + median["teacher"]
    rows = [
        ["student train step", common.format_ms(samples["student"])],
        ["teacher forward", common.format_ms(samples["teacher"])],
        ["floor = student + teacher", common.fmt(floor * 1e3)],
        ["CausalLMDistiller step", common.format_ms(samples["fused"])],
        ["Distiller step (dense logits)", common.format_ms(samples["dense"])],
    ]
    ratios = [
        ["CausalLMDistiller / floor", common.fmt(median["fused"] / floor)],
        ["dense Distiller / floor", common.fmt(median["dense"] / floor)],
        [
            "CausalLMDistiller / dense",
            common.fmt(median["fused"] / median["dense"]),
        ],
    ]
    return "\n".join(
        [
            common.fragment_heading("CausalLMDistiller step time"),
            f"Llama teacher {args.teacher}, student {args.student} (layers x "
            f"width), vocabulary {args.vocab}, {args.batch} x {args.length} "
            f"tokens, dtype policy {args.dtype_policy}, "
            f"{args.repeats} interleaved rounds.",
            "",
            common.markdown_table(["step", "median ms (IQR)"], rows),
            "",
            common.markdown_table(["ratio", "value"], ratios),
            "",
        ]
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv, add_arguments)
    if args.quick:
        args.vocab, args.length, args.repeats = 512, 32, 3
    text = section(measure(args), args)
    print(text)
    common.write_fragment(NAME, text, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
