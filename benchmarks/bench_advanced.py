"""Step time of feature (hint) and offline distillation against their floors.

Feature distillation (`keras_kd.FeatureDistiller`) runs the student once
per step and the teacher once, so its step should cost what a plain
student training step plus a teacher inference step cost. Offline
distillation (`keras_kd.OfflineDistiller`) reads cached teacher logits, so
its step should cost what a plain student training step costs.

What is timed, on the backend named by `KERAS_BACKEND`: one sample is one
`fit` epoch of `N` batches (`shuffle=False`, `verbose=0`) divided by `N`,
the way training runs, data pipeline included; implementations are
interleaved in shuffled order (see `benchmarks.common`) and the tables give
medians (interquartile range) in ms per step; ratios divide medians of the
same run.

Feature distillation, per model:

- `student`: the plain student (hard-label loss);
- `teacher`: the teacher's inference, the compiled forward pass alone
  (`benchmarks.common.teacher_inference`), on the same batches already in
  memory as tensors;
- `keras_kd Distiller`: logits distillation only (no features);
- `keras_kd FeatureDistiller`: logits + one feature pair;
- `keras Distiller`: Keras' own `keras.distillation.Distiller` with
  `LogitsDistillation` + `FeatureDistillation` on the same pair and loss.

`/ floor` divides by `student + teacher` (target <= 1.05), `/ Distiller`
by the logits-only keras-kd step. BatchNorm moving-statistics updates per
step are read from the moving mean after one `train_on_batch` from zero
statistics: one update gives `(1 - m) mu` and `k` updates on the same batch
`(1 - m**k) mu` (momentum `m`, batch mean `mu` taken from a plain step), so
`k` is solved per channel and the median reported.

Offline distillation: `student`, `keras_kd OfflineDistiller` with the full
cached logits (in memory) and with a top-k cache, and the online
`keras_kd Distiller`; `/ student` is the target ratio (<= 1.05). What an
offline step still pays over the plain student is the distillation loss
itself (the KL and its gradient, O(batch x classes)) and reading the cached
logits with the batch.

Run `python -m benchmarks.bench_advanced [--quick]`.
"""

import numpy as np

from benchmarks import common

NAME = "advanced"
TEMPERATURE = 4.0
ALPHA = 0.1


def mlp(name, features, widths, feature_width, classes, dropout=0.1):
    """Dense blocks (the first with BatchNorm), then a named feature layer
    `<name>_feature` of `feature_width`, then the logits."""
    import keras

    layers = keras.layers
    inputs = keras.Input((features,))
    x = inputs
    for i, width in enumerate(widths):
        x = layers.Dense(width, activation="relu")(x)
        if i == 0:
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Dense(feature_width, activation="relu", name=f"{name}_feature")(
        x
    )
    return keras.Model(inputs, layers.Dense(classes)(x), name=name)


def convnet(name, channels, classes):
    """Two conv blocks (BatchNorm after the first conv); the second block's
    output `<name>_feature` is the attention-transfer feature map."""
    import keras

    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(channels[0], 3, padding="same", activation="relu")(inputs)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(channels[1], 3, padding="same", activation="relu")(x)
    x = layers.Activation("linear", name=f"{name}_feature")(x)
    x = layers.GlobalAveragePooling2D()(layers.MaxPooling2D()(x))
    return keras.Model(inputs, layers.Dense(classes)(x), name=name)


def feature_cases(quick):
    """name -> (teacher factory, student factory, loss name, x shape,
    classes, batch, batches per timed epoch)."""
    if quick:
        features, classes = 64, 10
        t_mlp, s_mlp, feature = (256, 256), (64,), 64
        t_conv, s_conv = (16, 32), (8, 16)
    else:
        features, classes = 512, 100
        t_mlp, s_mlp, feature = (1024, 1024), (256,), 256
        t_conv, s_conv = (32, 64), (16, 32)
    return {
        f"MLP {features}-{'-'.join(map(str, t_mlp))}-{feature}-{classes} -> "
        f"{features}-{'-'.join(map(str, s_mlp))}-{feature}-{classes}, "
        "feature MSE": (
            lambda: mlp("teacher", features, t_mlp, feature, classes),
            lambda: mlp("student", features, s_mlp, feature, classes),
            "mse",
            (features,),
            classes,
            64 if quick else 256,
            8 if quick else 32,
        ),
        f"CNN 32x32x3 conv {t_conv} -> conv {s_conv}, attention transfer": (
            lambda: convnet("teacher", t_conv, classes),
            lambda: convnet("student", s_conv, classes),
            "attention",
            (32, 32, 3),
            classes,
            16 if quick else 32,
            4 if quick else 8,
        ),
    }


def _data(shape, classes, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch,) + shape).astype("float32")
    return x * 2.0 + 0.5, rng.integers(0, classes, size=batch)


def _compiled(model, **kwargs):
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return model


def _feature_models(make_teacher, make_student, loss_name):
    """The five step functions' models, students with equal weights."""
    import keras

    import keras_kd

    keras.utils.set_random_seed(0)
    teacher = make_teacher()
    students = [make_student() for _ in range(4)]
    for s in students[1:]:
        s.set_weights(students[0].get_weights())
    pair = [("student_feature", "teacher_feature")]
    kd_loss = keras_kd.losses.KLDivergence(temperature=TEMPERATURE)
    ours = keras_kd.FeatureDistiller(
        students[1], teacher, features=pair, feature_loss=loss_name
    )
    logits_only = keras_kd.Distiller(students[2], teacher)
    for distiller in (ours, logits_only):
        _compiled(distiller, distillation_loss=kd_loss, alpha=ALPHA)
    theirs_loss = (
        "mse" if loss_name == "mse" else keras_kd.losses.AttentionTransfer()
    )
    theirs = keras.distillation.Distiller(
        teacher=teacher,
        student=students[3],
        distillation_losses=[
            keras.distillation.LogitsDistillation(temperature=TEMPERATURE),
            keras.distillation.FeatureDistillation(
                loss=theirs_loss,
                teacher_layer_name="teacher_feature",
                student_layer_name="student_feature",
            ),
        ],
        student_loss_weight=ALPHA,
    )
    _compiled(theirs)
    return {
        "student": _compiled(students[0]),
        "teacher": teacher,
        "distiller": logits_only,
        "ours": ours,
        "keras": theirs,
    }


def batch_norm_updates(models, x, y):
    """BatchNorm updates per step for each trained model (see module doc).

    Every model gets a fresh copy of the student's initial weights and zero
    moving statistics, then one `train_on_batch`.
    """
    from keras import ops

    student = models["student"]
    start = student.get_weights()

    def moving_mean(trained_student):
        bn = trained_student.get_layer("student_bn")
        return ops.convert_to_numpy(bn.moving_mean).astype("float64"), bn

    found = {}
    for key in ("student", "ours", "keras"):
        model = models[key]
        trained = model if key == "student" else model.student
        trained.set_weights(start)
        bn = trained.get_layer("student_bn")
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, "float32"))
        model.train_on_batch(x, y)
        found[key], bn = moving_mean(trained)
    momentum = bn.momentum
    mu = found["student"] / (1.0 - momentum)
    counts = {}
    for key in ("ours", "keras"):
        usable = np.abs(mu) > 1e-3 * np.abs(mu).max()
        fraction = np.clip(found[key][usable] / mu[usable], 1e-12, 1 - 1e-12)
        counts[key] = float(np.median(np.log1p(-fraction) / np.log(momentum)))
    return counts


def _epoch(model, x, y, batch):
    def run():
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)

    return run


def time_epochs(runs, repeats, steps):
    """Interleaved epochs (`common.time_interleaved`, one per round): wall
    and CPU seconds per step, per run. On a shared machine other
    processes stretch the wall time of whatever runs at that moment, while
    the CPU time this process spends is the work itself (all its
    threads), so its ratios are the steadier estimate of the cost."""
    wall, cpu = common.time_interleaved(
        runs, repeats, warmup=2, min_sample_s=0, cpu=True
    )

    def per_step(samples):
        return {k: [x / steps for x in v] for k, v in samples.items()}

    return per_step(wall), per_step(cpu)


def measure_features(case, repeats):
    from keras import ops

    make_teacher, make_student, loss_name, shape, classes, batch, n = case
    models = _feature_models(make_teacher, make_student, loss_name)
    x, y = _data(shape, classes, batch)
    bn = batch_norm_updates(models, x, y)
    x, y = _data(shape, classes, batch * n, seed=1)
    runs = {
        key: _epoch(model, x, y, batch)
        for key, model in models.items()
        if key != "teacher"
    }
    infer = common.teacher_inference(models["teacher"])
    batches = [
        ops.convert_to_tensor(x[i : i + batch]) for i in range(0, len(x), batch)
    ]
    runs["teacher"] = lambda: [infer(b) for b in batches]
    return time_epochs(runs, repeats, n), bn


def _ratio(timings, numerator, denominator, bold=False):
    """`wall ratio (CPU ratio)` of summed medians, e.g. ours / floor."""
    parts = []
    for samples in timings:
        med = {k: common.summary(v)[0] for k, v in samples.items()}
        parts.append(
            sum(med[k] for k in numerator) / sum(med[k] for k in denominator)
        )
    wall = common.fmt(parts[0])
    return f"{f'**{wall}**' if bold else wall} ({common.fmt(parts[1])})"


def feature_table(results):
    header = [
        "model (batch)",
        "student ms",
        "teacher ms",
        "keras_kd Distiller ms",
        "keras_kd FeatureDistiller ms",
        "keras Distiller ms",
        "FeatureDistiller / floor",
        "keras / floor",
        "FeatureDistiller / Distiller",
        "keras / Distiller",
        "BN updates per step: ours / keras",
    ]
    floor = ("student", "teacher")
    rows = []
    for name, batch, timings, bn in results:
        wall = timings[0]
        rows.append(
            [
                f"{name} ({batch})",
                common.format_ms(wall["student"]),
                common.format_ms(wall["teacher"]),
                common.format_ms(wall["distiller"]),
                common.format_ms(wall["ours"]),
                common.format_ms(wall["keras"]),
                _ratio(timings, ("ours",), floor, bold=True),
                _ratio(timings, ("keras",), floor),
                _ratio(timings, ("ours",), ("distiller",)),
                _ratio(timings, ("keras",), ("distiller",)),
                f"{common.fmt(bn['ours'], 2)} / {common.fmt(bn['keras'], 2)}",
            ]
        )
    return common.markdown_table(header, rows)


def measure_offline(case, repeats, top_k):
    import keras

    import keras_kd

    make_teacher, make_student, _, shape, classes, batch, n = case
    keras.utils.set_random_seed(0)
    teacher = make_teacher()
    students = [make_student() for _ in range(4)]
    x, y = _data(shape, classes, batch * n, seed=1)
    dense = {"inputs": x, **keras_kd.cache_teacher_outputs(teacher, x)}
    cached = keras_kd.cache_teacher_outputs(teacher, x, top_k=top_k)
    top = {"inputs": x, **cached}
    kd_loss = keras_kd.losses.KLDivergence(temperature=TEMPERATURE)
    settings = dict(distillation_loss=kd_loss, alpha=ALPHA)
    offline = _compiled(keras_kd.OfflineDistiller(students[1]), **settings)
    offline_top = _compiled(keras_kd.OfflineDistiller(students[2]), **settings)
    online = _compiled(keras_kd.Distiller(students[3], teacher), **settings)
    runs = {
        "student": _epoch(_compiled(students[0]), x, y, batch),
        "offline": _epoch(offline, dense, y, batch),
        "top_k": _epoch(offline_top, top, y, batch),
        "online": _epoch(online, x, y, batch),
    }
    return time_epochs(runs, repeats, n)


def offline_table(results, top_k):
    header = [
        "model (batch)",
        "student ms",
        "OfflineDistiller ms",
        f"OfflineDistiller top-{top_k} ms",
        "online Distiller ms",
        "offline / student",
        f"top-{top_k} / student",
        "online / student",
        "offline - student, ms",
    ]
    rows = []
    for name, batch, timings in results:
        wall = timings[0]
        extra = common.summary(wall["offline"])[0]
        extra -= common.summary(wall["student"])[0]
        rows.append(
            [
                f"{name} ({batch})",
                common.format_ms(wall["student"]),
                common.format_ms(wall["offline"]),
                common.format_ms(wall["top_k"]),
                common.format_ms(wall["online"]),
                _ratio(timings, ("offline",), ("student",), bold=True),
                _ratio(timings, ("top_k",), ("student",)),
                _ratio(timings, ("online",), ("student",)),
                common.fmt(extra * 1e3),
            ]
        )
    return common.markdown_table(header, rows)


def run_benchmark(args):
    repeats = 5 if args.quick else 21
    top_k = 5 if args.quick else 10
    cases = feature_cases(args.quick)
    features, offline = [], []
    for name, case in cases.items():
        print(f"[{common.backend()}] feature: {name}", flush=True)
        samples, bn = measure_features(case, repeats)
        features.append((name, case[5], samples, bn))
        print(f"[{common.backend()}] offline: {name}", flush=True)
        samples = measure_offline(case, repeats, top_k)
        offline.append((name, case[5], samples))
    text = "\n".join(
        [
            common.fragment_heading("Feature and offline distillation"),
            f"Wall-clock ms per step, median over {repeats} interleaved "
            "`fit` epochs (interquartile range). Ratios: wall-clock "
            "medians, with the CPU-time ratio in parentheses. Floor = "
            "student training step + teacher inference step. Targets: "
            "FeatureDistiller / floor <= 1.05, offline / student <= 1.05.\n",
            "**Feature distillation** (`alpha = 0.1`, KL at `T = 4` plus "
            "one feature pair of weight 1):\n",
            feature_table(features) + "\n",
            "**Offline distillation** (cached teacher logits in memory):\n",
            offline_table(offline, top_k) + "\n",
        ]
    )
    common.write_fragment(NAME, text, args.results_dir)
    print(text)


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv)
    run_benchmark(args)


if __name__ == "__main__":
    main()
