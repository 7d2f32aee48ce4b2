"""`keras_kd.align_tokens`: byte spans, groups and packed rows of two
tokenizations of the same texts, with small keras-hub tokenizers built in
memory (byte-level BPE, SentencePiece, WordPiece, bytes, code points)."""

import functools
import io

import numpy as np
import pytest

import keras_kd
from keras_kd.lm._token_bytes import (
    NORMAL,
    token_bytes,
    tokenizer_of,
    vocabulary_match,
)

keras_hub = pytest.importorskip("keras_hub")

MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "l d", "Ġ c", "a t"]
SPM_CORPUS = [
    "Hello world, this is a test.",
    "café crème brûlée",
    "机器 is machine learning",
    "The quick brown fox jumps over the lazy dog.",
    "the cat sat on the mat",
]
WORD_PIECE = ["[UNK]", "[CLS]", "[SEP]", "the", "##s", "cafe", "!", "cat"]


def _byte_vocabulary(extra=()):
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    _, characters = bytes_to_unicode()
    vocabulary = {c: i for i, c in enumerate(characters)}
    for merge in MERGES:
        vocabulary.setdefault(merge.replace(" ", ""), len(vocabulary))
    for token in extra:
        vocabulary.setdefault(token, len(vocabulary))
    return vocabulary


@functools.lru_cache(None)
def gpt2():
    """Byte-level BPE with `<|endoftext|>` as start, end (and pad 0)."""
    vocabulary = _byte_vocabulary(["<|endoftext|>"])
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=MERGES)


@functools.lru_cache(None)
def plain_bpe():
    """The same merges, no start or end token, ids in reverse order."""
    vocabulary = _byte_vocabulary(["<|endoftext|>"])
    top = len(vocabulary) - 1
    vocabulary = {token: top - i for token, i in vocabulary.items()}
    return keras_hub.tokenizers.BytePairTokenizer(
        vocabulary=vocabulary,
        merges=MERGES,
        unsplittable_tokens=["<|endoftext|>"],
    )


@functools.lru_cache(None)
def codepoints():
    return keras_hub.tokenizers.UnicodeCodepointTokenizer(lowercase=False)


@functools.lru_cache(None)
def byte_tokenizer():
    return keras_hub.tokenizers.ByteTokenizer(lowercase=False)


@functools.lru_cache(None)
def word_piece():
    return keras_hub.tokenizers.WordPieceTokenizer(
        vocabulary=WORD_PIECE, lowercase=True, strip_accents=True
    )


@functools.lru_cache(None)
def spm_proto():
    spm = pytest.importorskip(
        "sentencepiece", reason="training a SentencePiece model needs it"
    )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10),
        model_writer=model,
        vocab_size=330,
        byte_fallback=True,
        model_type="bpe",
        character_coverage=0.99,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentence_piece(**kwargs):
    return keras_hub.tokenizers.SentencePieceTokenizer(
        proto=spm_proto(), **kwargs
    )


@functools.lru_cache(None)
def llama():
    """SentencePiece with `<s>` / `</s>` as start and end tokens."""
    return keras_hub.models.LlamaTokenizer(proto=spm_proto())


def check_layout(out, n, ls, lt):
    """Shapes, dtypes, and the invariants every result satisfies."""
    g = min(ls, lt)
    shapes = {
        "token_ids": ((n, ls), np.int32),
        "padding_mask": ((n, ls), np.bool_),
        "teacher_token_ids": ((n, lt), np.int32),
        "teacher_padding_mask": ((n, lt), np.bool_),
        "response_mask": ((n, ls), np.bool_),
        "student_groups": ((n, ls), np.int32),
        "teacher_groups": ((n, lt), np.int32),
        "student_group_starts": ((n, g), np.int32),
        "teacher_group_starts": ((n, g), np.int32),
        "group_mask": ((n, g), np.float32),
        "one_to_one": ((n, g), np.bool_),
    }
    assert sorted(out) == sorted(shapes)
    for key, (shape, dtype) in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == dtype, key
    assert not out["response_mask"][:, 0].any()
    assert not (out["response_mask"] & ~out["padding_mask"]).any()
    for i in range(n):
        used = int(out["group_mask"][i].sum())
        np.testing.assert_array_equal(out["group_mask"][i, :used], 1.0)
        np.testing.assert_array_equal(out["group_mask"][i, used:], 0.0)
        sizes = []
        for side in ("student", "teacher"):
            groups = out[f"{side}_groups"][i]
            starts = out[f"{side}_group_starts"][i]
            assert (starts >= 1).all()
            np.testing.assert_array_equal(starts[used:], 1)
            assert set(groups[groups >= 0]) == set(range(used))
            count = np.bincount(groups[groups >= 0], minlength=used)
            sizes.append(count)
            for k in range(used):
                where = np.flatnonzero(groups == k)
                # Contiguous, in text order, starting at the recorded start.
                assert where[0] == starts[k]
                np.testing.assert_array_equal(
                    where, np.arange(where[0], where[-1] + 1)
                )
            grouped = np.flatnonzero(groups >= 0)
            assert (np.diff(groups[grouped]) >= 0).all()
        np.testing.assert_array_equal(
            out["one_to_one"][i, :used], (sizes[0] == 1) & (sizes[1] == 1)
        )
        assert not out["one_to_one"][i, used:].any()
        student = out["student_groups"][i]
        assert out["response_mask"][i][student >= 0].all()


def ids(tokenizer, tokens):
    return [tokenizer.token_to_id(t) for t in tokens]


# ---------------------------------------------------------- hand-made


def test_bpe_against_bytes_groups_merges():
    out = keras_kd.align_tokens(gpt2(), byte_tokenizer(), ["the world"])
    check_layout(out, 1, 7, 9)
    eot = gpt2().end_token_id
    np.testing.assert_array_equal(
        out["token_ids"][0],
        [eot] + ids(gpt2(), ["t", "he", "Ġw", "or", "ld"]) + [eot],
    )
    np.testing.assert_array_equal(
        out["teacher_token_ids"][0], list(b"the world")
    )
    assert out["padding_mask"].all() and out["teacher_padding_mask"].all()
    np.testing.assert_array_equal(
        out["response_mask"][0], [0, 1, 1, 1, 1, 1, 1]
    )
    # "t" is the teacher's first token (position 0): nothing predicts it.
    # The end token has no partner: it is trained by cross-entropy only.
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, 0, 1, 2, 3, -1]
    )
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, 0, 0, 1, 1, 2, 2, 3, 3]
    )
    np.testing.assert_array_equal(
        out["student_group_starts"][0], [2, 3, 4, 5, 1, 1, 1]
    )
    np.testing.assert_array_equal(
        out["teacher_group_starts"][0], [1, 3, 5, 7, 1, 1, 1]
    )
    np.testing.assert_array_equal(out["group_mask"][0], [1, 1, 1, 1, 0, 0, 0])
    assert not out["one_to_one"].any()


def test_same_tokenizer_gives_one_to_one_groups():
    texts = ["the world", "café 🙂 机器", "the cat"]
    out = keras_kd.align_tokens(gpt2(), gpt2(), texts)
    n, length = out["token_ids"].shape
    check_layout(out, n, length, length)
    np.testing.assert_array_equal(out["token_ids"], out["teacher_token_ids"])
    np.testing.assert_array_equal(out["student_groups"], out["teacher_groups"])
    for i in range(n):
        real = int(out["padding_mask"][i].sum())
        # Every token but the start token, the end token included.
        expected = np.full(length, -1)
        expected[1:real] = np.arange(real - 1)
        np.testing.assert_array_equal(out["student_groups"][i], expected)
        assert out["one_to_one"][i, : real - 1].all()
        np.testing.assert_array_equal(
            out["student_group_starts"][i, : real - 1], np.arange(1, real)
        )
    student, teacher = vocabulary_match(gpt2(), gpt2())
    size = gpt2().vocabulary_size()
    np.testing.assert_array_equal(student, np.arange(size))
    np.testing.assert_array_equal(teacher, np.arange(size))
    assert student.dtype == teacher.dtype == np.int32


def test_start_and_end_token_on_one_side_only():
    out = keras_kd.align_tokens(plain_bpe(), gpt2(), ["the world"])
    check_layout(out, 1, 5, 7)
    np.testing.assert_array_equal(out["student_groups"][0], [-1, 0, 1, 2, 3])
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, -1, 0, 1, 2, 3, -1]
    )
    np.testing.assert_array_equal(
        out["student_group_starts"][0], [1, 2, 3, 4, 1]
    )
    np.testing.assert_array_equal(
        out["teacher_group_starts"][0], [2, 3, 4, 5, 1]
    )
    assert out["one_to_one"][0, :4].all()
    np.testing.assert_array_equal(out["response_mask"][0], [0, 1, 1, 1, 1])


def test_end_token_on_one_side_only():
    out = keras_kd.align_tokens(
        gpt2(), plain_bpe(), ["the world"], add_start_token=False
    )
    check_layout(out, 1, 6, 5)
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, 0, 1, 2, 3, -1]
    )
    np.testing.assert_array_equal(out["teacher_groups"][0], [-1, 0, 1, 2, 3])
    np.testing.assert_array_equal(out["response_mask"][0], [0, 1, 1, 1, 1, 1])
    assert out["token_ids"][0, -1] == gpt2().end_token_id


def test_accents_split_across_byte_tokens():
    out = keras_kd.align_tokens(gpt2(), codepoints(), ["café crème"])
    check_layout(out, 1, 13, 10)
    # Student: start, c a f é(2 bytes) Ġc r è(2 bytes) m e, end.
    np.testing.assert_array_equal(
        out["student_groups"][0],
        [-1, -1, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7, -1],
    )
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, 0, 1, 2, 3, 3, 4, 5, 6, 7]
    )
    np.testing.assert_array_equal(
        out["one_to_one"][0, :9], [1, 1, 0, 0, 1, 0, 1, 1, 0]
    )
    np.testing.assert_array_equal(
        out["teacher_token_ids"][0], [ord(c) for c in "café crème"]
    )


def test_cjk_and_emoji_split_across_byte_tokens():
    out = keras_kd.align_tokens(gpt2(), codepoints(), ["机器学习", "🙂👍🏽"])
    check_layout(out, 2, 14, 4)
    np.testing.assert_array_equal(
        out["student_groups"][0],
        [-1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2, -1],
    )
    np.testing.assert_array_equal(out["teacher_groups"][0], [-1, 0, 1, 2])
    np.testing.assert_array_equal(
        out["student_groups"][1],
        [-1, -1, -1, -1, -1, 0, 0, 0, 0, 1, 1, 1, 1, -1],
    )
    np.testing.assert_array_equal(out["teacher_groups"][1], [-1, 0, 1, -1])
    np.testing.assert_array_equal(
        out["student_group_starts"], [[4, 7, 10, 1], [5, 9, 1, 1]]
    )


def test_word_piece_lowercases_strips_accents_and_skips_spaces():
    out = keras_kd.align_tokens(gpt2(), word_piece(), ["The Cafés!"])
    check_layout(out, 1, 12, 4)
    np.testing.assert_array_equal(
        out["teacher_token_ids"][0],
        ids(word_piece(), ["the", "cafe", "##s", "!"]),
    )
    # Student: start, T he Ġ C a f é é s !, end. "The" / "the" is the
    # teacher's first token; " Café" / "cafe" (the space no WordPiece
    # token covers), "s" / "##s", "!" / "!".
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, -1, 0, 0, 0, 0, 0, 0, 1, 2, -1]
    )
    np.testing.assert_array_equal(out["teacher_groups"][0], [-1, 0, 1, 2])
    np.testing.assert_array_equal(out["one_to_one"][0, :3], [False, True, True])


def test_unknown_word_piece_token_takes_its_word():
    out = keras_kd.align_tokens(gpt2(), word_piece(), ["the zzz"])
    assert out["teacher_token_ids"][0, 1] == word_piece().token_to_id("[UNK]")
    # Student: start, t he Ġ z z z, end: " zzz" is the [UNK] token's group.
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, -1, 0, 0, 0, 0, -1]
    )
    np.testing.assert_array_equal(out["teacher_groups"][0], [-1, 0])


def test_prompts_and_responses():
    texts = {"prompts": ["the", "a "], "responses": [" world", "cat"]}
    out = keras_kd.align_tokens(gpt2(), byte_tokenizer(), texts)
    check_layout(out, 2, 7, 9)
    np.testing.assert_array_equal(
        out["response_mask"],
        [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0]],
    )
    # Row 0: start, t he | Ġw or ld, end; row 1: start, a Ġ | c at, end.
    np.testing.assert_array_equal(
        out["student_groups"],
        [[-1, -1, -1, 0, 1, 2, -1], [-1, -1, -1, 0, 1, -1, -1]],
    )
    np.testing.assert_array_equal(
        out["teacher_groups"],
        [[-1, -1, -1, 0, 0, 1, 1, 2, 2], [-1, -1, 0, 1, 1, -1, -1, -1, -1]],
    )
    np.testing.assert_array_equal(out["group_mask"].sum(1), [3, 2])
    np.testing.assert_array_equal(
        out["token_ids"][1, :6],
        [gpt2().start_token_id]
        + ids(gpt2(), ["a", "Ġ", "c", "at"])
        + [gpt2().end_token_id],
    )


def test_texts_as_tuple_array_or_bytes_and_empty_prompts():
    expected = keras_kd.align_tokens(gpt2(), codepoints(), ["the", "café"])
    for texts in (
        ("the", "café"),
        np.array(["the", "café"]),
        ["the", "café".encode()],
    ):
        out = keras_kd.align_tokens(gpt2(), codepoints(), texts)
        for key in expected:
            np.testing.assert_array_equal(out[key], expected[key], key)
    pairs = {"prompts": ["", ""], "responses": ["the", "café"]}
    out = keras_kd.align_tokens(gpt2(), codepoints(), pairs)
    for key in expected:
        np.testing.assert_array_equal(out[key], expected[key], key)


def test_truncation_drops_groups_cut_on_either_side():
    out = keras_kd.align_tokens(
        gpt2(), byte_tokenizer(), ["the world"], teacher_sequence_length=6
    )
    check_layout(out, 1, 7, 6)
    np.testing.assert_array_equal(out["teacher_token_ids"][0], list(b"the wo"))
    # "or" / "o r" lost its "r": dropped, as is everything after it.
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, 0, 1, -1, -1, -1]
    )
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, 0, 0, 1, 1, -1]
    )
    np.testing.assert_array_equal(out["group_mask"][0], [1, 1, 0, 0, 0, 0])
    # The student keeps its whole row, end token included.
    assert out["response_mask"][0, 1:].all()


def test_truncation_of_the_student_loses_its_end_token():
    out = keras_kd.align_tokens(
        gpt2(), gpt2(), ["the world"], sequence_length=4
    )
    check_layout(out, 1, 4, 4)
    eot = gpt2().end_token_id
    assert eot not in out["token_ids"][0, 1:]
    np.testing.assert_array_equal(out["student_groups"][0], [-1, 0, 1, 2])
    np.testing.assert_array_equal(out["teacher_groups"][0], [-1, 0, 1, 2])


def test_padding_uses_the_pad_token():
    out = keras_kd.align_tokens(
        gpt2(), plain_bpe(), ["the world", "a"], sequence_length=8
    )
    check_layout(out, 2, 8, 8)
    np.testing.assert_array_equal(
        out["padding_mask"][1], [1, 1, 1, 0, 0, 0, 0, 0]
    )
    np.testing.assert_array_equal(out["token_ids"][1, 3:], gpt2().pad_token_id)
    # The plain tokenizer has no pad token: 0.
    np.testing.assert_array_equal(out["teacher_token_ids"][1, 1:], 0)


def test_no_truncation_raises_naming_the_text():
    with pytest.raises(
        ValueError, match=r"teacher_sequence_length.*9.*texts\[1\]"
    ):
        keras_kd.align_tokens(
            gpt2(),
            byte_tokenizer(),
            ["a", "the world"],
            teacher_sequence_length=6,
            truncate=False,
        )
    with pytest.raises(ValueError, match=r"`sequence_length`.*7.*texts\[0\]"):
        keras_kd.align_tokens(
            gpt2(), gpt2(), ["the world"], sequence_length=5, truncate=False
        )


def test_positional_alignment():
    out = keras_kd.align_tokens(
        gpt2(), byte_tokenizer(), ["the world"], alignment="positional"
    )
    check_layout(out, 1, 7, 9)
    # The i-th response token of each side, end token included; the pair
    # at the teacher's position 0 is dropped.
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, 0, 1, 2, 3, 4]
    )
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, 0, 1, 2, 3, 4, -1, -1, -1]
    )
    assert out["one_to_one"][0, :5].all()


def test_preprocessor_gives_the_tokenizer_and_length():
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        gpt2(), sequence_length=10
    )
    assert tokenizer_of(preprocessor) is gpt2()
    out = keras_kd.align_tokens(preprocessor, byte_tokenizer(), ["the world"])
    check_layout(out, 1, 10, 10)
    out = keras_kd.align_tokens(
        preprocessor,
        byte_tokenizer(),
        ["the world"],
        sequence_length=8,
        teacher_sequence_length=12,
    )
    check_layout(out, 1, 8, 12)


def test_tokenizer_sequence_length_does_not_truncate():
    vocabulary = _byte_vocabulary(["<|endoftext|>"])
    short = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=MERGES, sequence_length=3
    )
    out = keras_kd.align_tokens(short, gpt2(), ["the world"])
    np.testing.assert_array_equal(out["token_ids"], out["teacher_token_ids"])
    assert short.sequence_length == 3


def test_lowercasing_byte_tokenizer_maps_back_to_the_original_bytes():
    lower = keras_hub.tokenizers.ByteTokenizer(lowercase=True)
    out = keras_kd.align_tokens(gpt2(), lower, ["The CAFÉ"])
    check_layout(out, 1, 10, 9)
    np.testing.assert_array_equal(
        out["teacher_token_ids"][0], list("the café".encode())
    )
    # Student: start, T he Ġ C A F É(2 bytes), end; "É" and "é" have the
    # same length: byte for byte.
    np.testing.assert_array_equal(
        out["student_groups"][0], [-1, -1, 0, 1, 2, 3, 4, 5, 6, -1]
    )
    np.testing.assert_array_equal(
        out["teacher_groups"][0], [-1, 0, 0, 1, 2, 3, 4, 5, 6]
    )


def test_spans_of_one_tokenization():
    from keras_kd.lm._byte_spans import text_spans

    def spans(tokenizer, text):
        ids = list(tokenizer.tokenize([text])[0])
        starts, ends = text_spans(
            ids, text, text.encode(), token_bytes(tokenizer)
        )
        return list(zip(starts, ends))

    # Byte-level BPE: "é" is two tokens of one byte each.
    assert spans(gpt2(), "the café") == [
        (0, 1),
        (1, 3),
        (3, 5),
        (5, 6),
        (6, 7),
        (7, 8),
        (8, 9),
    ]
    # WordPiece: the space is no token's; "Cafés" is lowercased and
    # stripped of its accent ("cafe" + "##s"), spans in the original bytes.
    assert spans(word_piece(), "The  Cafés!") == [
        (0, 3),
        (5, 10),
        (10, 11),
        (11, 12),
    ]
    # An unknown word takes its bytes, not the space before it.
    assert spans(word_piece(), "the zzz cat") == [(0, 3), (4, 7), (8, 11)]


@functools.lru_cache(None)
def spm_without_byte_fallback():
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 10),
        model_writer=model,
        vocab_size=100,
        model_type="bpe",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return keras_hub.tokenizers.SentencePieceTokenizer(proto=model.getvalue())


def test_sentence_piece_unknown_token_takes_the_unknown_text():
    tokenizer = spm_without_byte_fallback()
    text = "the ℵ€ cat"
    out = keras_kd.align_tokens(tokenizer, byte_tokenizer(), [text])
    tokens = [tokenizer.id_to_token(int(i)) for i in out["token_ids"][0]]
    assert "<unk>" in tokens
    unknown = tokens.index("<unk>")
    group = out["student_groups"][0, unknown]
    assert group >= 0
    bytes_of_group = bytes(
        out["teacher_token_ids"][0][out["teacher_groups"][0] == group].tolist()
    )
    assert bytes_of_group.strip() == "ℵ€".encode()


# -------------------------------------------------------- SentencePiece


def test_sentence_piece_byte_fallback_and_dummy_prefix():
    text = "机器学习 🙂 the cat"
    out = keras_kd.align_tokens(llama(), byte_tokenizer(), [text])
    n, ls = out["token_ids"].shape
    check_layout(out, 1, ls, len(text.encode()))
    tokens = [llama().id_to_token(int(i)) for i in out["token_ids"][0]]
    assert tokens[0] == "<s>" and tokens[-1] == "</s>"
    assert any(t.startswith("<0x") for t in tokens)
    teacher = out["teacher_token_ids"][0]
    groups, starts = out["student_groups"][0], out["student_group_starts"][0]
    for k in range(int(out["group_mask"][0].sum())):
        piece = tokens[starts[k]]
        if piece.startswith("<0x") and (groups == k).sum() == 1:
            # A byte-fallback piece is exactly its byte.
            assert out["one_to_one"][0, k]
            byte = teacher[out["teacher_group_starts"][0, k]]
            assert byte == int(piece[3:5], 16)
    # The first piece is SentencePiece's dummy-prefix "▁" (a space the
    # text does not have): an empty span; the spans are monotone and cover
    # the text.
    from keras_kd.lm._byte_spans import text_spans

    pieces = list(llama().tokenize([text])[0])
    starts, ends = text_spans(pieces, text, text.encode(), token_bytes(llama()))
    assert llama().id_to_token(pieces[0]) == "▁"
    assert (starts[0], ends[0]) == (0, 0)
    assert all(s <= e for s, e in zip(starts, ends))
    assert all(e <= s for e, s in zip(ends[:-1], starts[1:]))
    assert ends[-1] == len(text.encode())


def test_sentence_piece_tokenizer_added_bos_is_not_doubled():
    text = ["the cat sat"]
    plain = keras_kd.align_tokens(sentence_piece(), gpt2(), text)
    added = keras_kd.align_tokens(
        sentence_piece(add_bos=True, add_eos=True), gpt2(), text
    )
    for key in plain:
        np.testing.assert_array_equal(plain[key], added[key], err_msg=key)


def test_sentence_piece_against_bpe_with_prompts():
    texts = {
        "prompts": ["Hello world,", "机器"],
        "responses": [" this is a test.", " is machine learning 🙂"],
    }
    out = keras_kd.align_tokens(llama(), gpt2(), texts)
    n, ls = out["token_ids"].shape
    check_layout(out, 2, ls, out["teacher_token_ids"].shape[1])
    assert out["group_mask"].sum() > 8
    _check_group_bytes(out, llama(), gpt2(), texts, strip_spaces=True)


def test_vocabulary_match_compares_bytes_and_special_strings():
    student, teacher = vocabulary_match(gpt2(), plain_bpe())
    # The same tokens under reversed ids: every token matches.
    size = gpt2().vocabulary_size()
    np.testing.assert_array_equal(student, np.arange(size))
    np.testing.assert_array_equal(teacher, size - 1 - np.arange(size))
    student, teacher = vocabulary_match(llama(), gpt2())
    assert student.dtype == teacher.dtype == np.int32
    assert (np.diff(student) > 0).all()
    assert len(set(teacher.tolist())) == len(teacher)
    s_bytes, g_bytes = token_bytes(llama()), token_bytes(gpt2())
    for s, t in zip(student.tolist(), teacher.tolist()):
        assert s_bytes.pieces[s] == g_bytes.pieces[t]
        assert (s_bytes.flags[s] == NORMAL) == (g_bytes.flags[t] == NORMAL)
    # "▁the" and "Ġthe" are both " the".
    assert llama().token_to_id("▁the") in student
    pair = dict(zip(student.tolist(), teacher.tolist()))
    assert pair[llama().token_to_id("▁the")] == gpt2().token_to_id("Ġthe")
    # Byte-fallback pieces are bytes; "<s>" is no byte.
    assert token_bytes(llama()).pieces[llama().token_to_id("<0xE6>")] == b"\xe6"
    assert llama().start_token_id not in student
    # Code points: single characters.
    student, teacher = vocabulary_match(codepoints(), word_piece())
    np.testing.assert_array_equal(student, sorted(ord(c) for c in ["s", "!"]))
    assert (
        vocabulary_match(gpt2(), plain_bpe())[0]
        is vocabulary_match(gpt2(), plain_bpe())[0]
    )


# ------------------------------------------------------------ property


def _group_bytes(out, tokenizer, prefix, row, k):
    tb = token_bytes(tokenizer)
    groups = out[f"{prefix}groups"][row]
    key = "token_ids" if prefix == "student_" else "teacher_token_ids"
    chosen = out[key][row][groups == k]
    # Special tokens stand for no bytes.
    return b"".join(
        tb.pieces[int(i)] for i in chosen if tb.flags[int(i)] == NORMAL
    )


def _check_group_bytes(out, student, teacher, texts, strip_spaces=False):
    """Each group's tokens stand for the same bytes on both sides (with
    `strip_spaces`, up to whitespace: SentencePiece normalizes it)."""
    for row in range(out["token_ids"].shape[0]):
        for k in range(int(out["group_mask"][row].sum())):
            a = _group_bytes(out, student, "student_", row, k)
            b = _group_bytes(out, teacher, "teacher_", row, k)
            if strip_spaces:
                a, b = b"".join(a.split()), b"".join(b.split())
            assert a == b, (row, k, a, b)


ALPHABET = list("abcdefghijklmnopqrstuvwxyz THE  \néèü机器学🙂,.") + ["👍🏽"]


def random_texts(seed, count=12):
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        size = int(rng.integers(1, 30))
        text = "".join(rng.choice(ALPHABET, size))
        texts.append(text if text.strip() else "x" + text)
    return texts


EXACT = [gpt2, plain_bpe, byte_tokenizer, codepoints]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("student", EXACT, ids=lambda f: f.__name__)
@pytest.mark.parametrize("teacher", EXACT, ids=lambda f: f.__name__)
def test_groups_stand_for_the_same_bytes(seed, student, teacher):
    texts = random_texts(seed)
    out = keras_kd.align_tokens(student(), teacher(), texts)
    n, ls = out["token_ids"].shape
    check_layout(out, n, ls, out["teacher_token_ids"].shape[1])
    _check_group_bytes(out, student(), teacher(), texts)
    # Without special tokens on either side, the groups cover the response
    # but for its first group (whose first token is at position 0).
    if student is not gpt2 and teacher is not gpt2:
        for row in range(n):
            grouped = out["student_groups"][row] >= 0
            missing = np.flatnonzero(out["response_mask"][row] & ~grouped)
            if grouped.any():
                assert (missing < np.flatnonzero(grouped)[0]).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_sentence_piece_groups_stand_for_the_same_bytes(seed):
    texts = random_texts(seed)
    texts = [" ".join(t.split()) or "x" for t in texts]
    prompts = {
        "prompts": [t[: len(t) // 2] for t in texts],
        "responses": [t[len(t) // 2 :] or "x" for t in texts],
    }
    for data in (texts, prompts):
        out = keras_kd.align_tokens(llama(), gpt2(), data)
        n, ls = out["token_ids"].shape
        check_layout(out, n, ls, out["teacher_token_ids"].shape[1])
        _check_group_bytes(out, llama(), gpt2(), data, strip_spaces=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_word_piece_layout_on_random_texts(seed):
    texts = random_texts(seed)
    out = keras_kd.align_tokens(word_piece(), gpt2(), texts)
    n, ls = out["token_ids"].shape
    check_layout(out, n, ls, out["teacher_token_ids"].shape[1])


# -------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "texts, match",
    [
        ([], r"`texts`.*at least one"),
        ("the world", r"`texts`.*list"),
        (["a", ""], r"`texts\[1\]`.*non-empty"),
        (["a", 3], r"`texts\[1\]`.*a string"),
        (["a", None], r"`texts\[1\]`"),
        ({"prompts": ["a"], "responses": ["b", "c"]}, r"1 prompts and 2"),
        ({"prompts": ["a"], "responses": [""]}, r"`texts\['responses'\]\[0\]`"),
        ({"prompts": ["a"]}, r"`texts`.*'responses'"),
        ({"prompts": [], "responses": []}, r"at least one"),
    ],
)
def test_invalid_texts(texts, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.align_tokens(gpt2(), byte_tokenizer(), texts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alignment": "chars"}, r"`alignment`.*'bytes'"),
        ({"sequence_length": 1}, r"`sequence_length`.*>= 2"),
        ({"sequence_length": 4.0}, r"`sequence_length`"),
        ({"teacher_sequence_length": 0}, r"`teacher_sequence_length`"),
        ({"add_start_token": "yes"}, r"`add_start_token`"),
        ({"truncate": None}, r"`truncate`"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.align_tokens(gpt2(), byte_tokenizer(), ["a b"], **kwargs)


def test_invalid_tokenizers():
    with pytest.raises(ValueError, match=r"`student_tokenizer`.*keras-hub"):
        keras_kd.align_tokens(object(), gpt2(), ["a"])
    with pytest.raises(ValueError, match=r"`teacher_tokenizer`.*keras-hub"):
        keras_kd.align_tokens(gpt2(), "gpt2", ["a"])
    with pytest.raises(ValueError, match=r"`tokenizer`"):
        tokenizer_of(3)

    class Custom(keras_hub.tokenizers.Tokenizer):
        def tokenize(self, inputs):
            return [[1] for _ in inputs]

    with pytest.raises(ValueError, match=r"`teacher_tokenizer`.*Custom"):
        keras_kd.align_tokens(gpt2(), Custom(), ["a"])


def test_token_bytes_are_cached_per_tokenizer():
    assert token_bytes(gpt2()) is token_bytes(gpt2())
    other = keras_hub.models.GPT2Tokenizer(
        vocabulary=_byte_vocabulary(["<|endoftext|>"]), merges=MERGES
    )
    assert token_bytes(other) is not token_bytes(gpt2())
    tb = token_bytes(gpt2())
    assert tb.pieces[gpt2().token_to_id("Ġthe")] == b" the"
    assert tb.flags[gpt2().end_token_id] != NORMAL
