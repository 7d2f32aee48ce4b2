"""The main job: distill a small student on the digits data.

Run with `make demo` or `python -m keras_kd.demo --help`. It trains a teacher,
the same small student twice (from scratch, and distilled from the teacher),
prints a comparison table and writes a plot of the learning curves under
`runs/`. Everything it needs ships with scikit-learn; nothing is downloaded.
"""

import argparse
import logging
import os
import sys
import time
import warnings

# Before the backend is imported (it is already when this runs as
# `python -m keras_kd.demo`, whose package imports Keras; then these quiet
# what TensorFlow logs later, and a process re-executed for `--backend`).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines: only the table and the plot's path",
    )
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


def _import_tensorflow_quietly():
    """Imports TensorFlow, if installed, with the process's stderr closed.

    `keras.utils.set_random_seed` seeds TensorFlow too whenever it is
    installed, so it is imported on every backend, and its C++ start-up
    lines reach stderr before `TF_CPP_MIN_LOG_LEVEL` applies. (On the
    TensorFlow backend it was imported with Keras, before this module ran.)
    """
    import importlib.util

    if "tensorflow" in sys.modules or not importlib.util.find_spec(
        "tensorflow"
    ):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_logs():
    """Keeps library log records and warnings off the screen."""
    _import_tensorflow_quietly()
    for name in ("tensorflow", "absl", "jax", "jax._src.xla_bridge", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass


class _Progress:
    """One line per model: "Training X ... done (12.3 s, ...)".

    On a terminal the line counts the epochs while the model trains; in a
    log file it is written once, when the model is done.
    """

    def __init__(self, label, epochs, enabled):
        self.label, self.epochs, self.enabled = label, epochs, enabled
        self.live = enabled and sys.stdout.isatty()
        self.start = time.perf_counter()

    def callbacks(self):
        if not self.live:
            return []
        import keras

        progress = self

        class EpochCounter(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                progress._show(f"epoch {epoch + 1}/{progress.epochs}")

        self._show("")
        return [EpochCounter()]

    def _show(self, tail):
        sys.stdout.write(f"\r\033[KTraining {self.label} ... {tail}")
        sys.stdout.flush()

    def done(self, accuracy):
        seconds = time.perf_counter() - self.start
        if self.enabled:
            line = (
                f"Training {self.label} ... done ({seconds:.1f} s, "
                f"held-out accuracy {accuracy:.4f})"
            )
            print(f"\r\033[K{line}" if self.live else line, flush=True)
        return seconds


def _fit(model, label, data, test, epochs, show, batch_size=32):
    """Trains silently; returns the history, seconds and test accuracy."""
    progress = _Progress(label, epochs, show)
    history = model.fit(
        *data,
        validation_data=test,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=progress.callbacks(),
    )
    trained = getattr(model, "student", model)
    accuracy = _accuracy(trained, *test)
    seconds = progress.done(accuracy)
    return trained, history.history, seconds, accuracy


def run(args):
    import keras

    import keras_kd

    _quiet_logs()
    keras.utils.set_random_seed(args.seed)
    train, test = load_digits_split(args.train_fraction, args.seed)
    # The split is stratified and shuffled, so its head is a fair subset.
    few = (train[0][: args.student_examples], train[1][: args.student_examples])
    show = not args.quiet
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metric = "sparse_categorical_accuracy"
    results = {}

    if show:
        print(
            f"keras-kd demo ({keras.backend.backend()} backend): digits; the "
            f"teacher learns from {len(train[0])} of them, the students from "
            f"{len(few[0])}; {len(test[0])} are held out for testing.",
            flush=True,
        )

    teacher = build_mlp((256, 256), 0.3, "teacher")
    teacher.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=[metric]
    )
    label = f"teacher, MLP 64-256-256-10 ({args.teacher_epochs} epochs)"
    found = _fit(teacher, label, train, test, args.teacher_epochs, show)
    results["teacher"] = (*found, len(train[0]))

    keras.utils.set_random_seed(args.seed + 1)
    scratch = build_mlp((16,), 0.0, "student_scratch")
    scratch.compile(
        optimizer=keras.optimizers.Adam(1e-2), loss=loss, metrics=[metric]
    )
    label = f"student from scratch, MLP 64-16-10 ({args.epochs} epochs)"
    found = _fit(scratch, label, few, test, args.epochs, show)
    results["student (scratch)"] = (*found, len(few[0]))

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
    label = (
        f"student distilled from the teacher, T={args.temperature:g}, "
        f"alpha={args.alpha:g} ({args.epochs} epochs)"
    )
    found = _fit(distiller, label, few, test, args.epochs, show)
    results["student (distilled)"] = (*found, len(few[0]))

    print()
    print(_table(results))
    distilled = results["student (distilled)"][3]
    scratch = results["student (scratch)"][3]
    print(
        f"\nThe distilled student scores {distilled:.4f} on the held-out "
        f"digits, the same student from scratch {scratch:.4f} "
        f"({(distilled - scratch) * 100:+.1f} points)."
    )
    path = _plot(results, args)
    if path:
        print(f"Learning curves: {path}")


def _table(results):
    rows = [
        ("model", "labels", "held-out accuracy", "parameters", "training time")
    ]
    for name, (model, _, seconds, accuracy, examples) in results.items():
        rows.append(
            (
                name,
                str(examples),
                f"{accuracy:.4f}",
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
    for name, (_, history, *_) in results.items():
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
