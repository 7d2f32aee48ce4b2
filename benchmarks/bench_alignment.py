"""Host-side token alignment throughput: `keras_kd.align_tokens` between
two tokenizers trained in memory on the same synthetic corpus.

The corpus is reproducible and self-contained (nothing is downloaded):
sentences of Zipf-distributed pseudo-words made of random syllables, with
capitals, punctuation, newlines and a share of accented, CJK and emoji
words. On it are trained a GPT-2 style byte-level BPE (Hugging Face
`tokenizers`, loaded into `keras_hub.models.GPT2Tokenizer`) and a
SentencePiece BPE with byte fallback (`keras_hub.models.LlamaTokenizer`);
`keras_hub.tokenizers.ByteTokenizer` needs no training.

Per pair of tokenizers and batch of texts it measures, interleaved:

- `tokenize`: both keras-hub tokenizers on the texts (what
  `align_tokens` calls first; keras-hub's cost, not keras-kd's);
- `align_tokens`: the whole call (tokenization included).

`alignment = align_tokens - tokenize` (medians) is keras-kd's own work:
the byte spans, the groups and the packed arrays. Throughput counts the
tokens of both sides (student + teacher), and the student's alone.

Run `python -m benchmarks.bench_alignment [--quick]`. The backend does not
matter (NumPy and Python on the host).
"""

import numpy as np

from benchmarks import common

NAME = "alignment"

SYLLABLES = (
    "ka ri to na me lo sa vu pe di an er in on th st re ch ou ly ing ed "
    "tion mo ba ze qu ix gr pl br sh wa yo"
).split()
FOREIGN = [
    "café",
    "crème",
    "naïve",
    "Übermaß",
    "señor",
    "机器学习",
    "数据",
    "東京",
    "🙂",
    "👍🏽",
    "🚀",
    "Ελλάδα",
    "привет",
]


def add_arguments(parser):
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument(
        "--words", type=int, default=120, help="mean words per text"
    )
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=7)


def corpus(count, words, seed):
    """`count` texts of about `words` pseudo-words each."""
    rng = np.random.default_rng(seed)
    lexicon = sorted(
        {
            "".join(rng.choice(SYLLABLES, int(rng.integers(1, 4))))
            for _ in range(6000)
        }
    )
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    texts = []
    for _ in range(count):
        size = max(1, int(rng.poisson(words)))
        chosen = rng.choice(len(lexicon), size, p=weights)
        parts = []
        for i, index in enumerate(chosen):
            word = lexicon[index]
            if rng.random() < 0.05:
                word = FOREIGN[int(rng.integers(len(FOREIGN)))]
            if i == 0 or parts[-1].endswith("."):
                word = word.capitalize()
            if rng.random() < 0.08:
                word += "," if rng.random() < 0.6 else "."
            parts.append(word)
        text = " ".join(parts)
        if rng.random() < 0.3:
            text = text.replace(". ", ".\n", 1)
        texts.append(text)
    return texts


def train_bpe(texts, vocab):
    import json

    import keras_hub
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=model["vocab"], merges=merges
    )


def train_sentence_piece(texts, vocab):
    import io

    import keras_hub
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return keras_hub.models.LlamaTokenizer(proto=model.getvalue())


def measure(args):
    import keras_hub

    import keras_kd

    training = corpus(2000 if not args.quick else 300, args.words, seed=0)
    bpe = train_bpe(training, args.vocab)
    spm = train_sentence_piece(training, args.vocab)
    byte = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    texts = corpus(args.texts, args.words, seed=1)
    pairs = [
        ("BPE -> SentencePiece", bpe, spm, "bytes"),
        ("BPE -> SentencePiece", bpe, spm, "positional"),
        ("SentencePiece -> bytes", spm, byte, "bytes"),
        ("BPE -> same BPE", bpe, bpe, "bytes"),
    ]
    rows = []
    for label, student, teacher, alignment in pairs:
        # Warm the per-tokenizer caches (each id's bytes): built once.
        out = keras_kd.align_tokens(
            student, teacher, texts, alignment=alignment
        )
        tokens_s = int(out["padding_mask"].sum())
        tokens_t = int(out["teacher_padding_mask"].sum())
        groups = int(out["group_mask"].sum())

        def tokenize(student=student, teacher=teacher):
            student.tokenize(texts)
            teacher.tokenize(texts)

        def align(student=student, teacher=teacher, alignment=alignment):
            keras_kd.align_tokens(student, teacher, texts, alignment=alignment)

        samples = common.time_interleaved(
            {"tokenize": tokenize, "align_tokens": align},
            repeats=args.repeats,
            warmup=1,
        )
        total = common.median(samples["align_tokens"])
        tok = common.median(samples["tokenize"])
        own = max(total - tok, 1e-9)
        rows.append(
            [
                label,
                alignment,
                f"{tokens_s} / {tokens_t}",
                groups,
                common.format_ms(samples["tokenize"]),
                common.format_ms(samples["align_tokens"]),
                common.fmt(own * 1e3),
                common.fmt((tokens_s + tokens_t) / own / 1e3),
                common.fmt(tokens_s / own / 1e3),
                common.fmt((tokens_s + tokens_t) / total / 1e3),
            ]
        )
    return rows


def section(rows, args):
    header = [
        "student -> teacher",
        "alignment",
        "tokens (student / teacher)",
        "groups",
        "tokenize ms (IQR)",
        "align_tokens ms (IQR)",
        "alignment ms",
        "alignment k tokens/s (both sides)",
        "alignment k student tokens/s",
        "end to end k tokens/s (both sides)",
    ]
    return "\n".join(
        [
            common.fragment_heading("Token alignment on the host"),
            f"{args.texts} synthetic texts of ~{args.words} words (5% "
            f"accented, CJK or emoji), tokenizers of {args.vocab} ids "
            "trained in memory on the same kind of text; one process, "
            f"{args.repeats} interleaved rounds. `alignment` = "
            "`align_tokens` - `tokenize` (medians).",
            "",
            common.markdown_table(header, rows),
            "",
        ]
    )


def main(argv=None):
    args = common.parse_args(__doc__.splitlines()[0], argv, add_arguments)
    if args.quick:
        args.texts, args.words, args.vocab, args.repeats = 64, 40, 1000, 3
    text = section(measure(args), args)
    print(text)
    common.write_fragment(NAME, text, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
