"""GlobalPointer span extraction trained plainly (the baseline).

    python examples/globalpointer_plain.py [--tiny]

Trains a small convolutional encoder with a GlobalPointer head on the
synthetic task of `globalpointer_task.py` with the multi-label categorical
crossentropy, and prints the span F1 on held-out sentences.
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
    args = parse_args(__doc__.splitlines()[0])
    train_count, test_count, epochs = sizes(args.tiny)
    epochs = args.epochs or epochs
    x_train, spans = make_data(train_count, seed=1)
    x_test, test_spans = make_data(test_count, seed=2)
    y_train, y_test = dense_labels(spans), dense_labels(test_spans)

    start = time.perf_counter()
    model = build_model(width=64, head_size=32, dropout=0.3)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras_kd.losses.MultilabelCategoricalCrossentropy(),
        metrics=[keras_kd.metrics.SpanF1()],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    f1 = span_f1(model, x_test, y_test)
    summary("plain GlobalPointer", f1, time.perf_counter() - start)


if __name__ == "__main__":
    main()
