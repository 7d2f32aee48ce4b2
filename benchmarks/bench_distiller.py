"""Distiller step time against its floor, and distilled-student quality.

Step time, on the backend named by `KERAS_BACKEND`, all in one process with
interleaved samples (see `benchmarks.common.time_interleaved`):

- `student`: `student.train_on_batch(x, y)`, a plain training step;
- `teacher`: one teacher inference on the same batch, run the way a
  distiller runs it inside its step: `training=False`, compiled like the
  train function (`jax.jit` of `stateless_call`, a `tf.function`, or eager
  under `torch.no_grad()`), without `predict_on_batch`'s per-call overhead,
  so the floor is as low as it honestly can be;
- `keras_kd`: `keras_kd.Distiller.train_on_batch(x, y)` with
  `KLDivergence(temperature=4)` and `alpha=0.1`;
- `unfused`: the same Distiller with its fused path for Hinton's loss
  turned off (a subclass overriding `compute_student_loss`), so the two
  terms are two losses: what `keras_kd` gains from computing them together;
- `keras`: `keras.distillation.Distiller` with
  `LogitsDistillation(temperature=4)` and `student_loss_weight=0.1`. Its
  default loss is the string `"kl_divergence"`, which Keras 3.15 turns into
  the function `keras.losses.kl_divergence` and applies to the scaled
  logits themselves (clipped into `[1e-7, 1]`, no softmax): cheaper than a
  KL of softmax distributions, and not one (the quality table below);
- `keras_softmax`: the same with `loss=keras.losses.KLDivergence()`, an
  instance, for which Keras takes both softmaxes first: the built-in
  distiller computing the KL of Hinton's loss.

Two shapes: MLPs with 10 classes (the logits are tiny: the step is the
models and Keras' per-step work), and a wide head (32,000 classes,
hidden widths 64 and 256), where the loss terms over the logits are a
large part of the step, as in a language model.

The floor is `student + teacher`; the table reports each distiller's median
step divided by the floor's (target for keras-kd: <= 1.05, and never worse
than Keras' built-in).

Quality: on the digits data of `keras_kd.demo` (the teacher learns from the
training split, the students from 200 of its examples), the held-out
accuracy of the student trained from scratch, distilled with keras-kd
(`KLDivergence(temperature=4)`, `alpha=0.1`) and distilled with Keras'
built-in distiller as a user writes it (`LogitsDistillation(temperature=4)`
with its default loss, `student_loss_weight=0.1`), over several seeds.

Run `python -m benchmarks.bench_distiller [--quick]`.
"""

import statistics
import time

import numpy as np

from benchmarks import common

NAME = "distiller"
T = 4.0
ALPHA = 0.1
BATCH = 256
FEATURES, CLASSES = 128, 10
TEACHER_HIDDEN = (1024, 1024, 1024)
STUDENT_HIDDEN = (256,)
QUICK_TEACHER_HIDDEN = (256, 256)
QUICK_STUDENT_HIDDEN = (64,)
WIDE_CLASSES, QUICK_WIDE_CLASSES = 32000, 4000
WIDE_TEACHER_HIDDEN, WIDE_STUDENT_HIDDEN = (256,), (64,)
SEEDS = 5
LABELS = {
    "student": "student train step",
    "teacher": "teacher inference",
    "keras_kd": "keras_kd.Distiller step",
    "unfused": "keras_kd.Distiller step, two losses (fused path off)",
    "keras": "keras.distillation.Distiller step (default loss)",
    "keras_softmax": "keras.distillation.Distiller step, "
    "loss=keras.losses.KLDivergence()",
}


def add_arguments(parser):
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the step-time part (default 1: "
        "on the loaded 2-core machine measured, 2 threads made every "
        "step over 10x slower); the quality part always uses 1 thread",
    )
    parser.add_argument(
        "--skip-quality", action="store_true", help="step time only"
    )


def mlp(features, hidden, name, classes=CLASSES):
    import keras

    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(w, activation="relu") for w in hidden]
    layers.append(keras.layers.Dense(classes))
    return keras.Sequential(layers, name=name)


def ours(student, teacher, lr=1e-3, fused=True):
    import keras

    import keras_kd

    class Unfused(keras_kd.Distiller):
        def compute_student_loss(self, *args, **kwargs):
            return super().compute_student_loss(*args, **kwargs)

    cls = keras_kd.Distiller if fused else Unfused
    distiller = cls(student=student, teacher=teacher)
    distiller.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=T),
        alpha=ALPHA,
    )
    return distiller


def builtin(student, teacher, lr=1e-3, softmax=False):
    import keras

    kwargs = {"loss": keras.losses.KLDivergence()} if softmax else {}
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=T, **kwargs
        ),
        student_loss_weight=ALPHA,
    )
    distiller.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return distiller


def measure_steps(repeats, t_hidden, s_hidden, classes):
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    y = rng.integers(0, classes, size=BATCH).astype("int32")

    def fresh(hidden, name, weights=None):
        model = mlp(FEATURES, hidden, name, classes)
        if weights is not None:
            model.set_weights(weights)
        return model

    teacher = fresh(t_hidden, "teacher")
    student = fresh(s_hidden, "student")
    student.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # Each distiller gets its own copies: Keras' built-in one sets
    # `teacher.trainable = False`, and the students must not share state.
    t_weights, s_weights = teacher.get_weights(), student.get_weights()
    ours_model = ours(
        fresh(s_hidden, "s1", s_weights), fresh(t_hidden, "t1", t_weights)
    )
    unfused_model = ours(
        fresh(s_hidden, "s4", s_weights),
        fresh(t_hidden, "t4", t_weights),
        fused=False,
    )
    keras_model = builtin(
        fresh(s_hidden, "s2", s_weights), fresh(t_hidden, "t2", t_weights)
    )
    softmax_model = builtin(
        fresh(s_hidden, "s5", s_weights),
        fresh(t_hidden, "t5", t_weights),
        softmax=True,
    )
    infer = common.teacher_inference(fresh(t_hidden, "t3", t_weights))
    x_backend = keras.ops.convert_to_tensor(x)
    samples = common.time_interleaved(
        {
            "student": lambda: student.train_on_batch(x, y),
            "teacher": lambda: infer(x_backend),
            "keras_kd": lambda: ours_model.train_on_batch(x, y),
            "unfused": lambda: unfused_model.train_on_batch(x, y),
            "keras": lambda: keras_model.train_on_batch(x, y),
            "keras_softmax": lambda: softmax_model.train_on_batch(x, y),
        },
        repeats=repeats,
        warmup=5,
    )
    shape = (
        f"teacher MLP {FEATURES}-{'-'.join(map(str, t_hidden))}-"
        f"{classes}, student MLP {FEATURES}-"
        f"{'-'.join(map(str, s_hidden))}-{classes}, batch {BATCH}"
    )
    return samples, shape


def step_section(samples, shape, repeats, threads_note):
    med = {k: common.summary(v)[0] for k, v in samples.items()}
    floor = med["student"] + med["teacher"]
    rows = [
        [LABELS[k], common.format_ms(samples[k]), len(samples[k])]
        for k in ("student", "teacher")
    ]
    rows.append(["floor = student + teacher", common.fmt(floor * 1e3), ""])
    for k in ("keras_kd", "unfused", "keras", "keras_softmax"):
        rows.append(
            [
                LABELS[k],
                common.format_ms(samples[k]),
                len(samples[k]),
            ]
        )
    table = common.markdown_table(["step", "median ms (IQR)", "samples"], rows)
    ratio_ours = med["keras_kd"] / floor
    ratio_keras = med["keras"] / floor
    ratios = common.markdown_table(
        ["ratio", "value", "target"],
        [
            ["keras_kd / floor", f"**{common.fmt(ratio_ours)}**", "<= 1.05"],
            [
                "keras built-in (default loss) / floor",
                common.fmt(ratio_keras),
                "",
            ],
            [
                "keras built-in (KLDivergence()) / floor",
                common.fmt(med["keras_softmax"] / floor),
                "",
            ],
            [
                "keras_kd / two losses",
                common.fmt(med["keras_kd"] / med["unfused"]),
                "",
            ],
            [
                "keras_kd / keras built-in (default loss)",
                common.fmt(med["keras_kd"] / med["keras"]),
                "<= 1",
            ],
            [
                "keras_kd / keras built-in (KLDivergence())",
                common.fmt(med["keras_kd"] / med["keras_softmax"]),
                "<= 1",
            ],
        ],
    )
    print(
        f"keras_kd/floor {ratio_ours:.3f}, keras/floor {ratio_keras:.3f}, "
        f"keras softmax/floor {med['keras_softmax'] / floor:.3f}",
        flush=True,
    )
    return (
        f"{shape}; {repeats} interleaved rounds, medians over single "
        f"steps after warm-up; {threads_note}. Steps are "
        "`train_on_batch` on one fixed batch (Keras' per-call overhead "
        "included in the student and every distiller alike); the teacher "
        "inference is the compiled forward pass alone.\n\n"
        + table
        + "\n\n"
        + ratios
        + "\n"
    )


# ------------------------------------------------------------- quality


def quality(seeds, epochs, teacher_epochs):
    import keras

    from keras_kd.demo import build_mlp, load_digits_split

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    scores = {"teacher": [], "scratch": [], "keras_kd": [], "keras": []}

    def accuracy(model, x, y):
        logits = model.predict(x, batch_size=len(x), verbose=0)
        return float(np.mean(np.argmax(logits, axis=-1) == y))

    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        train, test = load_digits_split(0.55, seed)
        few = (train[0][:200], train[1][:200])
        teacher = build_mlp((256, 256), 0.3, "teacher")
        teacher.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        teacher.fit(*train, epochs=teacher_epochs, batch_size=32, verbose=0)
        scores["teacher"].append(accuracy(teacher, *test))

        def student():
            keras.utils.set_random_seed(seed + 1)  # same initial weights
            return build_mlp((16,), 0.0, "student")

        scratch = student()
        scratch.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
        scratch.fit(*few, epochs=epochs, batch_size=32, verbose=0)
        scores["scratch"].append(accuracy(scratch, *test))

        distiller = ours(student(), teacher, lr=1e-2)
        distiller.fit(*few, epochs=epochs, batch_size=32, verbose=0)
        scores["keras_kd"].append(accuracy(distiller.student, *test))

        # Keras' distiller sets `teacher.trainable = False`; the teacher is
        # no longer trained here, so that changes nothing.
        theirs = builtin(student(), teacher, lr=1e-2)
        theirs.fit(*few, epochs=epochs, batch_size=32, verbose=0)
        scores["keras"].append(accuracy(theirs.student, *test))
        print(
            f"seed {seed}: "
            + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()),
            flush=True,
        )
    return scores


def quality_section(scores, seeds, epochs, teacher_epochs, seconds):
    labels = {
        "teacher": "teacher MLP 64-256-256-10, dropout 0.3 (all ~988 "
        "training digits)",
        "scratch": "student 64-16-10 from scratch (200 labels)",
        "keras_kd": f"student distilled, keras_kd KLDivergence(T={T:g}), "
        f"alpha={ALPHA}",
        "keras": f"student distilled, keras.distillation "
        f"LogitsDistillation(temperature={T:g}), default loss, "
        f"student_loss_weight={ALPHA}",
    }
    rows = []
    for key, values in scores.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(
            [
                labels[key],
                f"{statistics.mean(values):.4f}",
                f"{std:.4f}",
                f"{min(values):.4f}-{max(values):.4f}",
            ]
        )
    table = common.markdown_table(
        ["model", "mean accuracy", "std", "min-max"], rows
    )
    return (
        f"Digits held-out accuracy (809 digits), {seeds} seeds (seed sets "
        f"the split, the initial weights and the data order); teacher "
        f"{teacher_epochs} epochs, students {epochs} epochs, Adam 1e-2, "
        f"batch 32; the three students of one seed start from the same "
        f"weights. Took {seconds:.0f} s.\n\n" + table + "\n"
    )


def set_torch_threads(threads):
    import keras

    if keras.backend.backend() != "torch":
        return None
    import torch

    torch.set_num_threads(threads)
    return threads


def run_benchmark(args):
    import keras

    repeats = 5 if args.quick else 41
    threads = args.torch_threads or 1
    note = "default threads"
    if set_torch_threads(threads) is not None:
        note = f"torch.set_num_threads({threads})"
    quick = args.quick
    shapes = [
        (
            "10 classes",
            QUICK_TEACHER_HIDDEN if quick else TEACHER_HIDDEN,
            QUICK_STUDENT_HIDDEN if quick else STUDENT_HIDDEN,
            CLASSES,
        ),
        (
            "a wide head",
            WIDE_TEACHER_HIDDEN,
            WIDE_STUDENT_HIDDEN,
            QUICK_WIDE_CLASSES if quick else WIDE_CLASSES,
        ),
    ]
    text = common.fragment_heading("Distiller step time and quality")
    for title, t_hidden, s_hidden, classes in shapes:
        wide = classes > CLASSES
        rounds = max(repeats // 2, 5) if wide else repeats
        samples, shape = measure_steps(rounds, t_hidden, s_hidden, classes)
        text += (
            f"\n#### Step time against the floor: {title}\n\n"
            + step_section(samples, shape, rounds, note)
        )
        keras.backend.clear_session()
    if not args.skip_quality:
        keras.backend.clear_session()
        set_torch_threads(1)
        seeds, epochs, teacher_epochs = (
            (2, 5, 5) if args.quick else (SEEDS, 60, 40)
        )
        start = time.perf_counter()
        scores = quality(seeds, epochs, teacher_epochs)
        seconds = time.perf_counter() - start
        text += "\n#### Quality on digits\n\n" + quality_section(
            scores, seeds, epochs, teacher_epochs, seconds
        )
    common.write_fragment(NAME, text, args.results_dir)
    print(text)


def main(argv=None):
    args = common.parse_args(
        __doc__.splitlines()[0], argv, add_arguments=add_arguments
    )
    run_benchmark(args)


if __name__ == "__main__":
    main()
