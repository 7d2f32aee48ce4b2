"""Distill a language model into a student with another tokenizer.

The teacher is a keras-hub `GPT2CausalLM` (built from its constructor) over
a byte-level BPE vocabulary learned with Hugging Face `tokenizers` from
English prose that scikit-learn ships (the descriptions of its data sets),
cut into windows of about 120 characters. The students are smaller GPT-2
models over single bytes: every character of ASCII text is one token, and
a student id means nothing in the teacher's vocabulary.
`keras_kd.CausalLMDistiller` trains them on the raw text: each window is
tokenized by both models' preprocessors and the two tokenizations are
aligned into groups of tokens that cover the same bytes
(`keras_kd.align_tokens`), on which the distances across vocabularies are
taken. Trained for the same number of steps:

- a character student from scratch (cross-entropy only);
- a character student distilled with `UniversalLogitDistance` (ULD: the
  L1 distance of the sorted probabilities);
- a character student distilled with `HybridLogitDistance` (the JSD on
  the tokens both vocabularies share, ULD on the rest);
- for reference, a BPE student of the same depth and width distilled with
  `KLDivergence` (one vocabulary: the ordinary path).

The character students start from the same weights. The distilled ones
are trained on `alpha * CE + (1 - alpha) * distance` with `alpha = 0.4`,
the 1 : 1.5 weighting of the ULD paper (Boizard et al., 2024).

Perplexities over two vocabularies cannot be compared, so the script
prints held-out bits per character: the negative log-likelihood, in bits,
of every token of the held-out windows (the start token predicts the
first; the end token is not scored), summed and divided by the number of
characters of those windows (Unicode characters; the text is ASCII but
for one symbol), and each distilled student's distillation loss at its
first and last epoch. The time column is each `fit`'s wall time, tracing
and the alignment of the text included.

    KERAS_BACKEND=jax python examples/cross_tokenizer_distill.py
    python examples/cross_tokenizer_distill.py --quick   # a minute or two

`--quick` stands for `--epochs 2 --teacher-epochs 4`.
"""

import argparse
import json
import math
import time

import keras
import keras_hub
import numpy as np
from causal_lm_distill import shipped_text

import keras_kd

END = "<|endoftext|>"


def windows(text, width):
    """The text cut at spaces into strings of at most `width` characters
    (a longer word is cut where it must be)."""
    out, line = [], ""
    for word in text.split():
        while len(word) > width:
            if line:
                out.append(line)
                line = ""
            out.append(word[:width])
            word = word[width:]
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = ""
        line = f"{line} {word}" if line else word
    if line:
        out.append(line)
    return out


def learn_bpe(texts, vocabulary_size):
    """A byte-level BPE learned from `texts`: its vocabulary and merges in
    the form keras-hub's `GPT2Tokenizer` takes, and the Hugging Face
    tokenizer itself."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # GPT-2's pre-tokenization: words split off by its regex, then bytes
    # written as printable characters (a space as "Ġ").
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary_size,
        # Every byte is in the vocabulary: no text is out of it.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    vocabulary = tokenizer.get_vocab(with_added_tokens=True)
    # The merges in rank order as "left right" strings (saved as pairs or
    # as strings, depending on the version of `tokenizers`).
    saved = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved]
    return vocabulary, merges, tokenizer


def byte_vocabulary():
    """The end token and the 256 characters that stand for bytes in
    byte-level BPE: without merges, one token per byte."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {END: 0, **{c: i + 1 for i, c in enumerate(alphabet)}}


def token_lists(tokenizer, texts):
    """The token ids of each text, as lists of ints."""
    out = []
    for ids in tokenizer(texts):
        out.append([int(i) for i in keras.ops.convert_to_numpy(ids)])
    return out


def gpt2(tokenizer, length, layers, width, heads, seed):
    """A GPT-2 causal LM with its preprocessor (`length` tokens a row)."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=layers,
        num_heads=heads,
        hidden_dim=width,
        intermediate_dim=4 * width,
        dropout=0.0,
        max_sequence_length=length,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def arrays(model, texts):
    """`(x, y, sample_weight)` NumPy arrays of the model's preprocessor."""
    x, y, w = model.preprocessor(texts)
    x = {k: keras.ops.convert_to_numpy(v) for k, v in x.items()}
    return x, keras.ops.convert_to_numpy(y), keras.ops.convert_to_numpy(w)


def bits_per_character(model, texts):
    """The summed negative log-likelihood in bits of every token of
    `texts` (the end token left out), per character of `texts`."""
    x, y, w = arrays(model, texts)
    ends = (y == model.preprocessor.tokenizer.end_token_id) & (w > 0)
    # Every row still ends in its end token: no text token was cut off.
    assert ends.sum() == len(texts), "the sequence length is too short"
    w = w * ~ends
    total = 0.0
    for s in range(0, len(texts), 64):
        rows = {k: v[s : s + 64] for k, v in x.items()}
        logits = keras.ops.convert_to_numpy(model(rows)).astype("float64")
        logits -= logits.max(axis=-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_p, y[s : s + 64, :, None], -1)
        total -= (picked[..., 0] * w[s : s + 64]).sum()
    return total / math.log(2) / sum(len(t) for t in texts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--window", type=int, default=120)
    parser.add_argument("--bpe-vocabulary", type=int, default=640)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--student-width", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.teacher_epochs = 2, 4

    texts = windows(shipped_text(), args.window)
    # Every tenth window is held out: the same mix of prose, tables and
    # references as the training windows.
    test = texts[9::10]
    train = [t for i, t in enumerate(texts) if i % 10 != 9]

    vocabulary, merges, learned = learn_bpe(train, args.bpe_vocabulary)
    bpe = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    chars = keras_hub.models.GPT2Tokenizer(
        vocabulary=byte_vocabulary(), merges=[]
    )
    # keras-hub does not split the text into words exactly as `tokenizers`
    # does before applying the merges. The models only ever see
    # keras-hub's tokens; count the windows where both agree.
    tokens = token_lists(bpe, texts)
    same = sum(a == b.ids for a, b in zip(tokens, learned.encode_batch(texts)))
    # A row holds the start token, the text and the end token.
    bpe_length = -(-(max(map(len, tokens)) + 2) // 8) * 8
    char_length = -(-(max(len(t.encode()) for t in texts) + 2) // 8) * 8
    print(
        f"{len(train)} training and {len(test)} held-out windows of up to "
        f"{args.window} characters, backend {keras.backend.backend()}\n"
        f"BPE of {bpe.vocabulary_size()} tokens: "
        f"{sum(map(len, texts)) / sum(map(len, tokens)):.2f} characters a "
        f"token\nkeras-hub and `tokenizers` give the same BPE tokens in "
        f"{same} of {len(texts)} windows"
    )

    def fit(model, epochs, x, y=None, w=None):
        # Every model sees the batches in the same order.
        keras.utils.set_random_seed(args.seed + 2)
        start = time.perf_counter()
        history = model.fit(
            x,
            y,
            sample_weight=w,
            batch_size=args.batch_size,
            epochs=epochs,
            verbose=0,
        )
        return time.perf_counter() - start, history.history

    def fit_on_arrays(model, epochs):
        # keras-hub's own `fit` sends even arrays through tf.data, which
        # ignores `shuffle` (and tokenizing there needs tensorflow-text):
        # a plain Keras model over the same layers trains on the arrays.
        plain = keras.Model(model.inputs, model.outputs)
        plain.compile(
            keras.optimizers.Adam(3e-3),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return fit(plain, epochs, *arrays(model, train))[0]

    teacher = gpt2(bpe, bpe_length, 2, args.width, 4, args.seed)
    rows = [
        ("teacher", "BPE", teacher, fit_on_arrays(teacher, args.teacher_epochs))
    ]

    def student(tokenizer, length):
        # One seed for all students: the character students start alike.
        return gpt2(tokenizer, length, 1, args.student_width, 2, args.seed + 1)

    scratch = student(chars, char_length)
    rows.append(
        ("scratch", "bytes", scratch, fit_on_arrays(scratch, args.epochs))
    )

    losses = keras_kd.losses
    t = args.temperature
    distilled = [
        ("ULD", chars, losses.UniversalLogitDistance(t)),
        ("hybrid", chars, losses.HybridLogitDistance(args.beta, t)),
        ("KL (one vocab.)", bpe, losses.KLDivergence(t)),
    ]
    summaries = []
    for name, tokenizer, loss in distilled:
        length = char_length if tokenizer is chars else bpe_length
        model = student(tokenizer, length)
        distiller = keras_kd.CausalLMDistiller(model, teacher)
        distiller.compile(
            keras.optimizers.Adam(3e-3),
            distillation_loss=loss,
            alpha=args.alpha,
        )
        # Raw text: the distiller tokenizes it with both preprocessors
        # (and aligns the two tokenizations when they differ).
        seconds, history = fit(distiller, args.epochs, train)
        kind = "bytes" if tokenizer is chars else "BPE"
        rows.append((name, kind, model, seconds))
        values = history["distillation_loss"]
        summaries.append(
            f"{name}: distillation loss {values[0]:.4f} at epoch 1, "
            f"{values[-1]:.4f} at epoch {len(values)}"
        )

    print()
    print("model           | tokens | parameters | held-out bits/char | time")
    print("----------------+--------+------------+--------------------+------")
    results = {}
    for name, kind, model, seconds in rows:
        value = bits_per_character(model, test)
        results[name] = value
        print(
            f"{name:<15} | {kind:<6} | {model.count_params():>10,} | "
            f"{value:>18.3f} | {seconds:3.0f} s"
        )
    print()
    for line in summaries:
        print(line)
    return results


if __name__ == "__main__":
    main()
