"""A small GlobalPointer student distilled from a larger GlobalPointer
teacher with `GlobalPointerKLDivergence`.

    python examples/globalpointer_distill.py [--tiny]

1. The teacher (3 convolutions, 96 wide) is trained on the labeled
   sentences.
2. The student (1 convolution, 16 wide) is trained on the same labels: the
   baseline.
3. That student is then distilled through `keras_kd.Distiller` on the
   labeled sentences plus unlabeled ones, matching the teacher's span
   logits with the sigmoid "KL" of GlobalPointer outputs (`loss=None`: no
   labels needed).

Start the student from hard-label training as here. Each span entry is a
separate two-class problem to the sigmoid divergence and negatives
outnumber positives by hundreds to one, so a student distilled from random
weights first pushes every logit down and, in our runs, stayed there
(span F1 0), with or without a hard-label term.
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


def trained(model, x, y, epochs):
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras_kd.losses.MultilabelCategoricalCrossentropy(),
    )
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return model


def main():
    args = parse_args(__doc__.splitlines()[0])
    train_count, test_count, epochs = sizes(args.tiny)
    epochs = args.epochs or epochs
    x_train, spans = make_data(train_count, seed=1)
    x_test, test_spans = make_data(test_count, seed=2)
    unlabeled, _ = make_data(8 * train_count, seed=3)
    y_train, y_test = dense_labels(spans), dense_labels(test_spans)

    start = time.perf_counter()
    teacher = build_model(width=96, head_size=32, layers_count=3, dropout=0.3)
    teacher = trained(teacher, x_train, y_train, epochs)
    f1 = span_f1(teacher, x_test, y_test)
    summary("teacher, 3 x 96, labels", f1, time.perf_counter() - start)

    start = time.perf_counter()
    student = build_model(width=16, head_size=8, layers_count=1, seed=1)
    student = trained(student, x_train, y_train, epochs)
    f1 = span_f1(student, x_test, y_test)
    summary("student, 1 x 16, labels", f1, time.perf_counter() - start)

    start = time.perf_counter()
    distiller = keras_kd.Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=None,
        distillation_loss=keras_kd.losses.GlobalPointerKLDivergence(),
    )
    transfer = keras.ops.convert_to_numpy(
        keras.ops.concatenate([x_train, unlabeled], axis=0)
    )
    distiller.fit(
        transfer, batch_size=32, epochs=max(1, epochs // 8), verbose=0
    )
    f1 = span_f1(distiller.student, x_test, y_test)
    summary("student, then distilled", f1, time.perf_counter() - start)


if __name__ == "__main__":
    main()
