"""A seeded synthetic span-extraction task for the GlobalPointer examples.

Sentences are token ids; four entity types are defined by rules that need
context on both sides of a span, and entities may nest:

- PER (0): a maximal run of proper nouns right after a title word
  ("dr smith jones" -> "smith jones").
- LOC (1): a maximal run of proper nouns right after "in", "at" or "of",
  optionally with "the" in between (not part of the span).
- ORG (2): "university of" followed by a run of proper nouns; the run
  inside is a LOC too (nested spans).
- QTY (3): a maximal run of digits followed by a unit word, unit included.
  Digits without a unit are not QTY.

Sentences are built from entity templates, distractors (names without a
title, places without a trigger, digits without a unit, triggers followed
by other words) and filler words; the labels are then computed from the
final token sequence by the rules above, so they are always consistent.

`build_model` gives the encoder + GlobalPointer used by all examples; the
padding mask is computed from the token ids and passed to the head
explicitly, because the convolutions do not propagate Keras masks.
"""

import argparse

import numpy as np

PAD = 0
TITLES = (1, 2)
TRIGGERS = (3, 4)  # "in", "at"
OF = 5
UNIVERSITY = 6
UNITS = (7, 8)
THE = 9
DIGITS = tuple(range(10, 20))
NOUNS = tuple(range(20, 80))
FILLER = tuple(range(80, 200))
VOCAB = 200
TYPES = ("PER", "LOC", "ORG", "QTY")
LENGTH = 32


def _run(tokens, start, words):
    """End (exclusive) of the maximal run of `words` from `start`."""
    end = start
    while end < len(tokens) and tokens[end] in words:
        end += 1
    return end


def label_spans(tokens):
    """The set of `(type, start, end)` spans (end inclusive) of a sentence."""
    spans = set()
    for i, token in enumerate(tokens):
        if token in TITLES:
            end = _run(tokens, i + 1, NOUNS)
            if end > i + 1:
                spans.add((0, i + 1, end - 1))
        if token in TRIGGERS or token == OF:
            first = i + 1
            if first < len(tokens) and tokens[first] == THE:
                first += 1
            end = _run(tokens, first, NOUNS)
            if end > first:
                spans.add((1, first, end - 1))
                if token == OF and i > 0 and tokens[i - 1] == UNIVERSITY:
                    spans.add((2, i - 1, end - 1))
        if token in DIGITS and (i == 0 or tokens[i - 1] not in DIGITS):
            end = _run(tokens, i, DIGITS)
            if end < len(tokens) and tokens[end] in UNITS:
                spans.add((3, i, end))
    return spans


def _chunk(rng):
    """One randomly chosen template, distractor or filler chunk."""
    k = int(rng.integers(1, 4))
    pick = rng.random()
    the = [THE] if rng.random() < 0.4 else []
    if pick < 0.12:
        return [int(rng.choice(TITLES))] + list(rng.choice(NOUNS, k))
    if pick < 0.22:
        trigger = [int(rng.choice(TRIGGERS))]
        return trigger + the + list(rng.choice(NOUNS, k))
    if pick < 0.29:
        return [UNIVERSITY, OF] + the + list(rng.choice(NOUNS, k))
    if pick < 0.38:
        return list(rng.choice(DIGITS, k)) + [int(rng.choice(UNITS))]
    if pick < 0.50:
        return the + list(rng.choice(NOUNS, k))
    if pick < 0.56:
        return list(rng.choice(DIGITS, k))
    if pick < 0.62:
        return [int(rng.choice(TITLES + TRIGGERS + (OF, UNIVERSITY)))]
    return list(rng.choice(FILLER, k))


def make_data(count, seed, length=LENGTH):
    """Token ids `[count, length]` (0-padded) and their span sets."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((count, length), "int32")
    spans = []
    for row in range(count):
        size = int(rng.integers(length // 3, length + 1))
        sentence = []
        while len(sentence) < size:
            sentence += _chunk(rng)
        sentence = [int(t) for t in sentence[:size]]
        tokens[row, :size] = sentence
        spans.append(label_spans(sentence))
    return tokens, spans


def dense_labels(spans, length=LENGTH):
    """0/1 labels `[count, types, length, length]` for span sets."""
    labels = np.zeros((len(spans), len(TYPES), length, length), "float32")
    for row, row_spans in enumerate(spans):
        for kind, start, end in row_spans:
            labels[row, kind, start, end] = 1.0
    return labels


def build_model(width, head_size, layers_count=2, dropout=0.1, seed=0):
    """Embedding, `layers_count` residual convolutions, GlobalPointer."""
    import keras

    import keras_kd

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    padding = keras.ops.not_equal(tokens, PAD)
    x = keras.layers.Embedding(VOCAB, width)(tokens)
    for _ in range(layers_count):
        h = keras.layers.Conv1D(width, 5, padding="same", activation="gelu")(x)
        h = keras.layers.Dropout(dropout)(h)
        x = keras.layers.LayerNormalization()(x + h)
    logits = keras_kd.layers.GlobalPointer(len(TYPES), head_size)(
        x, mask=padding
    )
    return keras.Model(tokens, logits)


def span_f1(model, tokens, labels, batch_size=256):
    """Span F1 of `model` on held-out data, with the library's metric."""
    import keras

    import keras_kd

    metric = keras_kd.metrics.SpanF1()
    for start in range(0, len(tokens), batch_size):
        stop = start + batch_size
        logits = model.predict_on_batch(tokens[start:stop])
        metric.update_state(labels[start:stop], logits)
    return float(keras.ops.convert_to_numpy(metric.result()))


def parse_args(description, alpha=None, argv=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a few steps on a little data: a smoke run, not a result",
    )
    parser.add_argument("--epochs", type=int, default=None)
    if alpha is not None:
        parser.add_argument("--alpha", type=float, default=alpha)
    return parser.parse_args(argv)


def sizes(tiny):
    """(train, test, epochs) for a full or a tiny run.

    150 labeled sentences are few enough that a model fits them perfectly
    and generalizes imperfectly: the regime where regularization and a
    teacher can help.
    """
    return (16, 16, 1) if tiny else (150, 1000, 60)


def summary(name, f1, seconds):
    print(f"{name}: held-out span F1 = {f1:.4f} ({seconds:.0f} s)")
