"""GlobalPointer span extraction with R-Drop.

    python examples/globalpointer_rdrop.py [--tiny] [--alpha 0.25]

The same model and data as `globalpointer_plain.py`, trained through
`keras_kd.RDrop`: every batch runs through the model once, with each
sentence twice, and the sigmoid "KL" of GlobalPointer logits
(`GlobalPointerKLDivergence`, inferred from the multi-label loss) pulls the
two dropout draws together. `alpha` needs tuning: the divergence sums over
the whole `length x length` span grid of each type, so it is large compared
with the crossentropy and small values work best here.
"""

import time

import keras
from globalpointer_task import (
    build_model,
    dense_labels,
    make_data,
    parse_args,
    sizes,
    span_f1,
    summary,
)

import keras_kd


def main():
    args = parse_args(__doc__.splitlines()[0], alpha=0.25)
    train_count, test_count, epochs = sizes(args.tiny)
    epochs = args.epochs or epochs
    x_train, spans = make_data(train_count, seed=1)
    x_test, test_spans = make_data(test_count, seed=2)
    y_train, y_test = dense_labels(spans), dense_labels(test_spans)

    start = time.perf_counter()
    model = build_model(width=64, head_size=32, dropout=0.3)
    rdrop = keras_kd.RDrop(model, alpha=args.alpha)
    rdrop.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras_kd.losses.MultilabelCategoricalCrossentropy(),
        metrics=[keras_kd.metrics.SpanF1()],
    )
    history = rdrop.fit(
        x_train, y_train, batch_size=32, epochs=epochs, verbose=0
    )
    divergence = history.history["rdrop_divergence"]
    print(
        f"pair divergence: first epoch {divergence[0]:.3f}, "
        f"last epoch {divergence[-1]:.3f}"
    )
    # The wrapped model is the trained model: inference is a single pass.
    f1 = span_f1(model, x_test, y_test)
    summary(
        f"GlobalPointer + R-Drop (alpha={args.alpha})",
        f1,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    main()
