"""Distill a small Llama-style language model from a larger one.

A character-level teacher (keras-hub `LlamaCausalLM`, built from its
constructor) is trained on English prose that scikit-learn ships (the
descriptions of its data sets), then two copies of a smaller student are
trained on the same text: one from scratch on the next characters, one with
`keras_kd.CausalLMDistiller`, which adds the teacher's distribution and
never builds either model's logits. The script prints the held-out
perplexity of each.

    KERAS_BACKEND=jax python examples/causal_lm_distill.py
    python examples/causal_lm_distill.py --epochs 1 --length 32   # quick

With published weights the models come from presets instead, e.g.
`keras_hub.models.Llama3CausalLM.from_preset("llama3.2_1b")` (downloads
are not available on the machines the tests run on).
"""

import argparse
import math
import pathlib
import time

import keras
import keras_hub
import numpy as np

import keras_kd


def shipped_text():
    """English prose from scikit-learn's data set descriptions."""
    import sklearn.datasets

    folder = pathlib.Path(sklearn.datasets.__file__).parent / "descr"
    text = " ".join(p.read_text("utf-8") for p in sorted(folder.glob("*.rst")))
    return " ".join(text.split())


def encode(text, length, stride):
    """Character ids (0 is padding) in windows of `length + 1`."""
    chars = sorted(set(text))
    ids = np.array([chars.index(c) + 1 for c in text], "int32")
    starts = range(0, len(ids) - length - 1, stride)
    windows = np.stack([ids[s : s + length + 1] for s in starts])
    x = {
        "token_ids": windows[:, :-1],
        "padding_mask": np.ones_like(windows[:, :-1]),
    }
    return x, windows[:, 1:], len(chars) + 1


def split(x, y, fraction):
    rows = len(y)
    cut = int(rows * (1 - fraction))
    first = ({k: v[:cut] for k, v in x.items()}, y[:cut])
    second = ({k: v[cut:] for k, v in x.items()}, y[cut:])
    return first, second


def llama(vocab, layers, hidden, seed):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


def perplexity(model, x, y):
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    logs = model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)
    return math.exp(logs["loss"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    text = shipped_text()
    x, y, vocab = encode(text, args.length, stride=args.length // 2)
    (x_train, y_train), (x_test, y_test) = split(x, y, 0.1)
    print(
        f"{len(text):,} characters, vocabulary {vocab}, "
        f"{len(y_train)} training and {len(y_test)} held-out windows of "
        f"{args.length}, backend {keras.backend.backend()}"
    )

    def fit(model, epochs):
        start = time.perf_counter()
        model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
        return time.perf_counter() - start

    teacher = llama(vocab, 2, 96, args.seed)
    teacher.compile(keras.optimizers.Adam(3e-3))
    rows = [
        (
            "teacher",
            teacher,
            fit(teacher, args.teacher_epochs or 3 * args.epochs),
        )
    ]

    scratch = llama(vocab, 1, 48, args.seed + 1)
    scratch.compile(keras.optimizers.Adam(3e-3))
    rows.append(("student (scratch)", scratch, fit(scratch, args.epochs)))

    student = llama(vocab, 1, 48, args.seed + 1)
    distiller = keras_kd.CausalLMDistiller(student, teacher)
    distiller.compile(
        keras.optimizers.Adam(3e-3),
        distillation_loss=keras_kd.losses.KLDivergence(
            temperature=args.temperature
        ),
        alpha=args.alpha,
    )
    rows.append(("student (distilled)", student, fit(distiller, args.epochs)))

    print()
    print("model               | parameters | held-out perplexity | time")
    print("--------------------+------------+---------------------+-------")
    results = {}
    for name, model, seconds in rows:
        value = perplexity(model, x_test, y_test)
        results[name] = value
        print(
            f"{name:<19} | {model.count_params():>10,} | {value:>19.3f} | "
            f"{seconds:5.1f} s"
        )
    return results


if __name__ == "__main__":
    main()
