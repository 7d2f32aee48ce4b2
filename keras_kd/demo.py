"""The main job: distill a small student on the digits data.

Run with `make demo` or `python -m keras_kd.demo --help`. It trains a teacher,
the same small student twice (from scratch, and distilled from the teacher),
prints a comparison table and writes a plot of the learning curves under
`runs/`. Everything it needs ships with scikit-learn; nothing is downloaded.
"""

import argparse
import os
import sys
import time

BACKENDS = ("tensorflow", "torch", "jax")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_kd.demo",
        description=(
            "Distill a small MLP student from a larger teacher on the "
            "scikit-learn digits data and compare it with the same student "
            "trained from scratch."
        ),
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else Keras' default).",
    )
    parser.add_argument(
        "--temperature", type=float, default=4.0, help="softening T (4.0)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.1,
        help="weight of the hard-label loss; 1 - alpha goes to the "
        "distillation loss (0.1)",
    )
    parser.add_argument(
        "--epochs", type=int, default=60, help="student epochs (60)"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=40, help="teacher epochs (40)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument(
        "--train-fraction",
        type=float,
        default=0.55,
        help="fraction of the 1797 digits the teacher learns from (0.55); "
        "the rest is held out for the reported accuracy",
    )
    parser.add_argument(
        "--student-examples",
        type=int,
        default=200,
        help="labelled examples both students get, a subset of the "
        "teacher's (200): the usual setting where the teacher was trained "
        "on more data than the student has labels for",
    )
    parser.add_argument(
        "--output-dir", default="runs", help="where the plot goes (runs/)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.epochs < 1 or args.teacher_epochs < 1:
        parser.error("--epochs and --teacher-epochs must be >= 1")
    if not 0.05 <= args.train_fraction <= 0.95:
        parser.error("--train-fraction must be in [0.05, 0.95]")
    if args.student_examples < 10:
        parser.error("--student-examples must be >= 10")
    return args


def _switch_backend(backend):
    """Re-executes this command with KERAS_BACKEND set.

    The backend is fixed when Keras is first imported, and importing
    `keras_kd` (to reach this module) has already done that.
    """
    if backend is None or os.environ.get("KERAS_BACKEND") == backend:
        import keras

        if backend is None or keras.backend.backend() == backend:
            return
    env = dict(os.environ, KERAS_BACKEND=backend)
    os.execve(
        sys.executable,
        [sys.executable, "-m", "keras_kd.demo"] + sys.argv[1:],
        env,
    )


def load_digits_split(train_fraction, seed):
    """Digits scaled to [0, 1], split stratified into train and test."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=train_fraction, stratify=y, random_state=seed
    )
    return (np.asarray(x_train), np.asarray(y_train)), (x_test, y_test)


def build_mlp(hidden, dropout, name):
    import keras

    layers = [keras.Input((64,))]
    for width in hidden:
        layers.append(keras.layers.Dense(width, activation="relu"))
        if dropout:
            layers.append(keras.layers.Dropout(dropout))
    layers.append(keras.layers.Dense(10))  # logits
    return keras.Sequential(layers, name=name)


def _accuracy(model, x, y):
    import numpy as np

    logits = model.predict(x, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _train(model, x, y, validation, epochs, verbose, batch_size=32):
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        validation_data=validation,
        epochs=epochs,
        batch_size=batch_size,
        verbose=verbose,
    )
    return history.history, time.perf_counter() - start


def run(args):
    import keras

    import keras_kd

    keras.utils.set_random_seed(args.seed)
    train, test = load_digits_split(args.train_fraction, args.seed)
    # The split is stratified and shuffled, so its head is a fair subset.
    few = (train[0][: args.student_examples], train[1][: args.student_examples])
    # Progress bars on a terminal, one line per epoch in a log file.
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metric = "sparse_categorical_accuracy"
    results = {}

    print(
        f"keras-kd demo on the {keras.backend.backend()} backend: the "
        f"teacher learns from {len(train[0])} digits, the students from "
        f"{len(few[0])} of them; {len(test[0])} digits are held out\n"
    )

    print("[1/3] Teacher: MLP 64-256-256-10 with dropout")
    teacher = build_mlp((256, 256), 0.3, "teacher")
    teacher.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=[metric]
    )
    history, seconds = _train(
        teacher, *train, test, args.teacher_epochs, verbose
    )
    results["teacher"] = (teacher, history, seconds, len(train[0]))

    print("\n[2/3] Student from scratch: MLP 64-16-10")
    keras.utils.set_random_seed(args.seed + 1)
    scratch = build_mlp((16,), 0.0, "student_scratch")
    scratch.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=[metric]
    )
    history, seconds = _train(scratch, *few, test, args.epochs, verbose)
    results["student (scratch)"] = (scratch, history, seconds, len(few[0]))

    print(
        f"\n[3/3] Student distilled from the teacher (T={args.temperature}"
        f", alpha={args.alpha})"
    )
    keras.utils.set_random_seed(args.seed + 1)  # same initial weights
    student = build_mlp((16,), 0.0, "student_distilled")
    distiller = keras_kd.Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=loss,
        distillation_loss=keras_kd.losses.KLDivergence(
            temperature=args.temperature
        ),
        alpha=args.alpha,
        metrics=[metric],
    )
    history, seconds = _train(distiller, *few, test, args.epochs, verbose)
    results["student (distilled)"] = (
        distiller.student,
        history,
        seconds,
        len(few[0]),
    )

    print()
    print(_table(results, test))
    path = _plot(results, args)
    if path:
        print(f"\nLearning curves: {path}")


def _table(results, test):
    rows = [
        ("model", "labels", "held-out accuracy", "parameters", "training time")
    ]
    for name, (model, _, seconds, examples) in results.items():
        rows.append(
            (
                name,
                str(examples),
                f"{_accuracy(model, *test):.4f}",
                f"{model.count_params():,}",
                f"{seconds:.1f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:])
        ]
        lines.append(" | ".join(cells))
        if index == 0:
            lines.append("-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def _plot(results, args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return None
    import keras

    os.makedirs(args.output_dir, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, history, _, _) in results.items():
        key = "val_sparse_categorical_accuracy"
        epochs = range(1, len(history[key]) + 1)
        left.plot(epochs, history[key], label=name)
        # The distiller's "loss" is the weighted total; compare the
        # hard-label loss, which every model has.
        loss_key = "student_loss" if "student_loss" in history else "loss"
        right.plot(epochs, history[loss_key], label=name)
    left.set(title="held-out accuracy", xlabel="epoch", ylabel="accuracy")
    left.set_ylim(0.8, 1.0)
    right.set(
        title="training cross-entropy",
        xlabel="epoch",
        ylabel="loss",
        yscale="log",
    )
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    backend = keras.backend.backend()
    figure.suptitle(
        f"keras-kd demo: digits, {backend} backend, "
        f"T={args.temperature}, alpha={args.alpha}"
    )
    figure.tight_layout()
    path = os.path.join(args.output_dir, f"demo_{backend}.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None):
    args = parse_args(argv)
    _switch_backend(args.backend)
    run(args)


if __name__ == "__main__":
    main()
