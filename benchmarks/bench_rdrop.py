"""R-Drop training step time against a plain step at twice the batch size.

`keras_kd.RDrop` feeds a batch of `B` examples through the model once, as
`2B` rows (each example twice). Its cost should therefore be that of a plain
training step at batch size `2B`, plus the pair divergence, which is small:
no second forward pass and no extra copies of activations. This benchmark
measures, on the backend named by `KERAS_BACKEND`:

- `rdrop B`: `RDrop(model).train_on_batch` on `B` examples;
- `plain 2B`: `model.train_on_batch` on the same `B` examples repeated
  (`2B` rows, the same arithmetic minus the divergence);
- `no divergence`: `RDrop` with a divergence that returns zeros, which
  isolates the cost of the doubling itself (the repeat, the pair split,
  the repeated labels) from the cost of the divergence math;
- `plain B`: `model.train_on_batch` on the `B` examples, for scale.

Steps of the three are interleaved (see `benchmarks.common`); the ratio
`rdrop B / plain 2B` divides medians of the same run (target: <= 1.05).
Each timed call is a whole `train_on_batch`, Keras' per-call overhead
included, which is the same for both.

Run `python -m benchmarks.bench_rdrop [--quick]`.
"""

import numpy as np

from benchmarks import common

NAME = "rdrop"


def classifier(features, hidden, classes):
    import keras

    inputs = keras.Input((features,))
    x = inputs
    for _ in range(2):
        x = keras.layers.Dense(hidden, activation="relu")(x)
        x = keras.layers.Dropout(0.1)(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x))


def span_model(vocab, width, heads, head_size, attention_heads=0):
    """Token encoder + GlobalPointer. With `attention_heads`, two
    self-attention blocks (a small Transformer encoder, the usual setting);
    without, two dense blocks, so that the span grid dominates the cost."""
    import keras

    import keras_kd

    layers = keras.layers
    tokens = keras.Input((None,), dtype="int32")
    x = layers.Embedding(vocab, width, mask_zero=True)(tokens)
    for _ in range(2):
        if attention_heads:
            h = layers.MultiHeadAttention(
                attention_heads, width // attention_heads, dropout=0.1
            )(x, x)
            x = layers.LayerNormalization()(x + layers.Dropout(0.1)(h))
        h = layers.Dense(2 * width if attention_heads else width, "gelu")(x)
        if attention_heads:
            h = layers.Dense(width)(h)
        x = layers.LayerNormalization()(x + layers.Dropout(0.1)(h))
    logits = keras_kd.layers.GlobalPointer(heads, head_size)(x)
    return keras.Model(tokens, logits)


def cases(quick):
    """name -> (model factory, loss factory, data factory(batch), batch)."""
    import keras

    import keras_kd

    rng = np.random.default_rng(0)
    features, hidden, classes = (64, 128, 10) if quick else (512, 1024, 100)
    length, heads, width = (16, 2, 64) if quick else (64, 8, 256)

    def classifier_data(batch):
        x = rng.normal(size=(batch, features)).astype("float32")
        return x, rng.integers(0, classes, size=batch)

    def span_data(batch):
        x = rng.integers(1, 1000, size=(batch, length)).astype("int32")
        x[:, length - length // 4 :] = 0  # a padded tail
        y = (rng.random((batch, heads, length, length)) < 0.01).astype(
            "float32"
        )
        return x, y

    def sparse_ce():
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    return {
        f"MLP {features}-{hidden}-{hidden}-{classes}, softmax CE": (
            lambda: classifier(features, hidden, classes),
            sparse_ce,
            classifier_data,
            32 if quick else 128,
        ),
        f"Transformer 2x{width} + GlobalPointer {heads} heads, "
        f"length {length}": (
            lambda: span_model(1000, width, heads, 32, attention_heads=4),
            keras_kd.losses.MultilabelCategoricalCrossentropy,
            span_data,
            8 if quick else 32,
        ),
        f"Dense 2x{width} + GlobalPointer {heads} heads, length {length}": (
            lambda: span_model(1000, width, heads, 32),
            keras_kd.losses.MultilabelCategoricalCrossentropy,
            span_data,
            8 if quick else 32,
        ),
    }


def no_divergence(first, second):
    from keras import ops

    return ops.zeros(ops.shape(first)[:1])


def step(model, x, y):
    def run():
        return model.train_on_batch(x, y)

    return run


def measure(make_model, make_loss, make_data, batch, repeats):
    import keras

    import keras_kd

    x, y = make_data(batch)
    x2, y2 = np.repeat(x, 2, axis=0), np.repeat(y, 2, axis=0)

    def compiled(model):
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=make_loss())
        return model

    keras.utils.set_random_seed(0)
    rdrop = compiled(keras_kd.RDrop(make_model(), alpha=1.0))
    bare = compiled(keras_kd.RDrop(make_model(), divergence=no_divergence))
    plain = compiled(make_model())
    plain_small = compiled(make_model())
    return common.time_interleaved(
        {
            "rdrop": step(rdrop, x, y),
            "bare": step(bare, x, y),
            "plain2": step(plain, x2, y2),
            "plain": step(plain_small, x, y),
        },
        repeats=repeats,
        warmup=3,
    )


def run_benchmark(args):
    repeats = 7 if args.quick else 31
    rows = []
    for name, case in cases(args.quick).items():
        make_model, make_loss, make_data, batch = case
        samples = measure(make_model, make_loss, make_data, batch, repeats)
        plain2 = common.summary(samples["plain2"])[0]
        ratio = common.summary(samples["rdrop"])[0] / plain2
        bare = common.summary(samples["bare"])[0] / plain2
        rows.append(
            [
                name,
                batch,
                common.format_ms(samples["rdrop"]),
                common.format_ms(samples["plain2"]),
                f"**{common.fmt(ratio)}**",
                common.fmt(bare),
                common.format_ms(samples["plain"]),
            ]
        )
        print(f"{name}: rdrop/plain2B = {ratio:.3f}", flush=True)
    table = common.markdown_table(
        [
            "model",
            "B",
            "R-Drop step, B examples (ms)",
            "plain step, 2B rows (ms)",
            "ratio",
            "ratio, no divergence",
            "plain step, B rows (ms)",
        ],
        rows,
    )
    notes = (
        f"Median over {repeats} interleaved steps (interquartile range). "
        "Ratio = R-Drop step / plain step at twice the batch size, target "
        '<= 1.05. "No divergence" replaces the divergence by zeros: '
        "what remains is the cost of the doubling itself, and the rest of "
        "the ratio is the divergence math (for GlobalPointer it runs over "
        "the whole `length x length` grid of every head, as large as the "
        "loss itself when the encoder is light).\n"
    )
    text = (
        common.fragment_heading("R-Drop step time")
        + "\n"
        + notes
        + "\n"
        + table
        + "\n"
    )
    common.write_fragment(NAME, text, args.results_dir)
    print(text)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run_benchmark(args)


if __name__ == "__main__":
    main()
