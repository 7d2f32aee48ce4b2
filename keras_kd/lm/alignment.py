"""Aligning two tokenizations of the same texts, on the host, for
distillation between models with different tokenizers."""

import numpy as np

from keras_kd import _checks
from keras_kd.lm._byte_spans import flat_tokens, text_pairs
from keras_kd.lm._token_bytes import (
    token_bytes,
    tokenizer_of,
    vocabulary_match,
)

ALIGNMENTS = ("bytes", "positional")


def align_tokens(
    student_tokenizer,
    teacher_tokenizer,
    texts,
    *,
    sequence_length=None,
    teacher_sequence_length=None,
    alignment="bytes",
    add_start_token=True,
    add_end_token=True,
    truncate=True,
):
    """Tokenizes `texts` with both tokenizers and aligns the two token
    sequences, for distillation across tokenizers.

    Each side's row is its start token (if the tokenizer has one and
    `add_start_token`), the prompt's tokens, the response's tokens and its
    end token (if it has one and `add_end_token`); prompt and response are
    tokenized separately, so their joint is a token boundary on both
    sides. Only response tokens (every token of a plain text, and the end
    token) are trained on.

    With `alignment="bytes"` every token gets its byte span in the UTF-8
    text, and the response is cut into groups at the byte offsets where
    both sides end a token: a group is the tokens of each side between
    two such common boundaries (one token each wherever the tokenizations
    agree). Zero-byte special tokens at the same offset pair up as groups
    of their own (the end token with the other side's end token).
    `alignment="positional"` (ULD) pairs the i-th response token of each
    side instead, up to the shorter side's count.

    A group is kept only if all its tokens are response tokens, none is at
    position 0 (nothing predicts it) and none was cut off by the length.

    Args:
        student_tokenizer: a keras-hub tokenizer (`BytePairTokenizer`,
            `SentencePieceTokenizer`, `WordPieceTokenizer`,
            `ByteTokenizer`, `UnicodeCodepointTokenizer` or a model's
            subclass), or a keras-hub preprocessor holding one (its
            `sequence_length` is then the default length).
        teacher_tokenizer: the same for the teacher.
        texts: a list, tuple or 1-D NumPy array of non-empty strings, or
            `{"prompts": [...], "responses": [...]}` of equal lengths
            (non-empty responses).
        sequence_length: the student's row length (the tokens the model
            reads; the label of position `i` is token `i + 1`), at
            least 2. `None`: the student preprocessor's, else the longest
            row.
        teacher_sequence_length: the teacher's; `None`: the teacher
            preprocessor's, else `sequence_length`, else the longest row.
        alignment: `"bytes"` or `"positional"`.
        add_start_token: whether rows begin with the tokenizer's
            `start_token_id` (where it has one).
        add_end_token: whether responses end with its `end_token_id`.
        truncate: whether rows longer than their length are cut at the
            end (else a `ValueError`).

    Returns:
        A dict of NumPy arrays, for `n` texts, lengths `Ls` and `Lt` and
        `G = min(Ls, Lt)` group slots: `token_ids` int32 `[n, Ls]`,
        `padding_mask` bool `[n, Ls]`, `teacher_token_ids` int32
        `[n, Lt]`, `teacher_padding_mask` bool `[n, Lt]`, `response_mask`
        bool `[n, Ls]` (the student tokens its cross-entropy is trained
        on; never position 0), `student_groups` int32 `[n, Ls]` and
        `teacher_groups` int32 `[n, Lt]` (each token's group in
        `[0, G)`, numbered in text order, or -1), `student_group_starts`
        and `teacher_group_starts` int32 `[n, G]` (each group's first
        position, 1 for unused slots), `group_mask` float32 `[n, G]` and
        `one_to_one` bool `[n, G]` (one token on each side).
    """
    _checks.choice("alignment", alignment, ALIGNMENTS)
    for name, value in (
        ("add_start_token", add_start_token),
        ("add_end_token", add_end_token),
        ("truncate", truncate),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise _checks.invalid(name, "a bool", value)
    prompts, responses = text_pairs(texts)
    sides = [
        _Side(obj, name, add_start_token, add_end_token)
        for obj, name in (
            (student_tokenizer, "student_tokenizer"),
            (teacher_tokenizer, "teacher_tokenizer"),
        )
    ]
    lengths = _lengths(sequence_length, teacher_sequence_length, sides)
    prompt_bytes = [p.encode() for p in prompts] if prompts else None
    response_bytes = [r.encode() for r in responses]
    sizes = np.array([len(r) for r in response_bytes], np.int64)
    if prompt_bytes is not None:
        sizes += np.array([len(p) for p in prompt_bytes], np.int64)
    bases = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    tokens = [
        flat_tokens(
            side.tokenizer,
            side.bytes,
            (side.start, side.end),
            (prompts, responses, prompt_bytes, response_bytes, bases),
            spans=alignment == "bytes",
        )
        for side in sides
    ]
    final = []
    for i, (side, flat, length) in enumerate(zip(sides, tokens, lengths)):
        rows = flat["row_length"]
        if length is None:
            length = int(rows.max())
        elif not truncate and rows.max() > length:
            row = int(np.argmax(rows > length))
            name = ("sequence_length", "teacher_sequence_length")[i]
            raise _checks.invalid(
                name,
                f"at least {int(rows[row])}, the {side.role} token count of "
                f"texts[{row}] (or truncate=True to cut longer rows)",
                length,
            )
        final.append(length)
    if alignment == "bytes":
        keys = _byte_keys(*tokens)
    else:
        keys = _positional_keys(*tokens, len(response_bytes))
    return _pack(sides, tokens, keys, final, len(response_bytes))


class _Side:
    """One tokenizer with what packing its rows needs."""

    def __init__(self, obj, name, add_start, add_end):
        self.tokenizer = tokenizer_of(obj, name)
        self.role = name.split("_")[0]
        self.bytes = token_bytes(self.tokenizer, name)
        self.length = None
        if obj is not self.tokenizer:
            length = getattr(obj, "sequence_length", None)
            self.length = int(length) if length is not None else None
        self.start = _token_id(self.tokenizer, "start") if add_start else None
        self.end = _token_id(self.tokenizer, "end") if add_end else None
        pad = getattr(self.tokenizer, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else 0


def match_vocabularies(student_tokenizer, teacher_tokenizer):
    """The pairs of ids of two vocabularies that stand for the same text:
    the `matched_ids` of `keras_kd.ops.hybrid_logit_distance` and
    `fused_linear_logit_distance`.

    Ordinary tokens match when their bytes are equal (GPT-2's `Ġhello` and
    SentencePiece's `▁hello` both stand for `b" hello"`), special tokens
    when their strings are. Each id appears at most once; one tokenizer on
    both sides matches every id to itself. Cached per pair.

    Args:
        student_tokenizer: a keras-hub tokenizer, or a preprocessor
            holding one.
        teacher_tokenizer: the same for the teacher.

    Returns:
        `(student_ids, teacher_ids)`, two int32 NumPy arrays of equal
        length, sorted by student id.
    """
    return vocabulary_match(
        tokenizer_of(student_tokenizer, "student_tokenizer"),
        tokenizer_of(teacher_tokenizer, "teacher_tokenizer"),
    )


def _token_id(tokenizer, which):
    value = getattr(tokenizer, f"{which}_token_id", None)
    return int(value) if value is not None else None


# -------------------------------------------------------------- groups


def _byte_keys(student, teacher):
    """The group key of every token of each side (-1: none): the common
    boundary closing its group, times `scale`; `+ 1 + k` for the k-th empty
    special token at an offset."""
    common = np.intersect1d(
        student["end"][student["kind"] == 0],
        teacher["end"][teacher["kind"] == 0],
    )
    ranks = [_special_ranks(side) for side in (student, teacher)]
    scale = 2 + max([int(r.max()) for r in ranks if r.size] or [0])
    keys = []
    for side, rank in zip((student, teacher), ranks):
        kind = side["kind"]
        key = np.full(kind.shape, -1, np.int64)
        covered = np.flatnonzero(kind == 0)
        if common.size:
            end = side["end"][covered]
            index = np.minimum(np.searchsorted(common, end), common.size - 1)
            boundary = common[index]
            found = (boundary >= end) & (boundary <= side["stop"][covered])
            key[covered] = np.where(found, boundary * scale, -1)
        special = kind == 1
        key[special] = side["start"][special] * scale + 1 + rank
        # An empty ordinary token (a lone SentencePiece dummy-prefix "▁")
        # joins the group of the covering token right after it.
        empty = np.flatnonzero(kind == 2)
        if empty.size:
            n = kind.size
            after = np.where(kind != 2, np.arange(n), n)
            after = np.minimum.accumulate(after[::-1])[::-1][empty]
            valid = after < n
            nxt = np.where(valid, after, 0)
            valid &= kind[nxt] == 0
            valid &= side["stop"][nxt] == side["stop"][empty]
            key[empty] = np.where(valid, key[nxt], -1)
        keys.append(key)
    return keys


def _special_ranks(side):
    """For each empty special token, how many come before it at its
    offset."""
    offset = side["start"][side["kind"] == 1]
    if not offset.size:
        return offset
    index = np.arange(offset.size)
    new = np.concatenate([[True], offset[1:] != offset[:-1]])
    return index - np.maximum.accumulate(np.where(new, index, 0))


def _positional_keys(student, teacher, n):
    ranks, counts = [], []
    for side in (student, teacher):
        rows = side["row"][side["response"]]
        ranks.append(np.arange(rows.size) - np.searchsorted(rows, rows))
        counts.append(np.bincount(rows, minlength=n))
    shorter = np.minimum(*counts)
    scale = int(max(c.max() for c in counts)) + 1
    keys = []
    for side, rank in zip((student, teacher), ranks):
        key = np.full(side["row"].shape, -1, np.int64)
        rows = side["row"][side["response"]]
        key[side["response"]] = np.where(
            rank < shorter[rows], rows * scale + rank, -1
        )
        keys.append(key)
    return keys


def _pack(sides, flats, keys, lengths, n):
    groups = min(lengths)
    present = [k >= 0 for k in keys]
    all_keys = np.concatenate([k[p] for k, p in zip(keys, present)])
    unique, first, inverse = np.unique(
        all_keys, return_index=True, return_inverse=True
    )
    split = int(present[0].sum())
    bad = []
    for flat, p, length in zip(flats, present, lengths):
        position = flat["position"][p]
        bad.append(
            ~flat["response"][p] | (position == 0) | (position >= length)
        )
    m = unique.size
    keep = np.bincount(inverse, np.concatenate(bad), minlength=m) == 0
    keep &= np.bincount(inverse[:split], minlength=m) > 0
    keep &= np.bincount(inverse[split:], minlength=m) > 0
    rows = np.concatenate([f["row"][p] for f, p in zip(flats, present)])
    kept = np.flatnonzero(keep)
    kept_rows = rows[first[kept]]
    group_of = np.full(m, -1, np.int64)
    group_of[kept] = np.arange(kept.size) - np.searchsorted(
        kept_rows, kept_rows
    )
    group_mask = np.zeros((n, groups), np.float32)
    group_mask[kept_rows, group_of[kept]] = 1.0
    out = {"group_mask": group_mask}
    single = np.ones((n, groups), bool)
    names = (("", "student_"), ("teacher_", "teacher_"))
    parts = (inverse[:split], inverse[split:])
    for side, flat, p, part, length, (ids, prefix) in zip(
        sides, flats, present, parts, lengths, names
    ):
        row, position = flat["row"], flat["position"]
        inside = position < length
        token_ids = np.full((n, length), side.pad, np.int32)
        token_ids[row[inside], position[inside]] = flat["ids"][inside]
        mask = np.zeros((n, length), bool)
        mask[row[inside], position[inside]] = True
        group = np.full(row.shape, -1, np.int64)
        group[p] = group_of[part]
        grouped = np.flatnonzero(group >= 0)
        assigned = np.full((n, length), -1, np.int32)
        assigned[row[grouped], position[grouped]] = group[grouped]
        slot = row[grouped] * groups + group[grouped]
        starts = np.full(n * groups, np.iinfo(np.int32).max, np.int64)
        np.minimum.at(starts, slot, position[grouped])
        starts[starts == np.iinfo(np.int32).max] = 1
        single &= (np.bincount(slot, minlength=n * groups) == 1).reshape(
            n, groups
        )
        out[f"{ids}token_ids"] = token_ids
        out[f"{ids}padding_mask"] = mask
        out[f"{prefix}groups"] = assigned
        out[f"{prefix}group_starts"] = starts.reshape(n, groups).astype(
            np.int32
        )
        if side is sides[0]:
            response = np.zeros((n, length), bool)
            chosen = inside & flat["response"] & (position > 0)
            response[row[chosen], position[chosen]] = True
            out["response_mask"] = response
    out["one_to_one"] = single & (group_mask > 0)
    return out


# -------------------------------------------------------------- inputs


def _lengths(sequence_length, teacher_sequence_length, sides):
    if sequence_length is not None:
        sequence_length = _checks.integer("sequence_length", sequence_length, 2)
    if teacher_sequence_length is not None:
        teacher_sequence_length = _checks.integer(
            "teacher_sequence_length", teacher_sequence_length, 2
        )
    student = (
        sequence_length if sequence_length is not None else sides[0].length
    )
    teacher = teacher_sequence_length
    if teacher is None:
        teacher = sides[1].length if sides[1].length is not None else student
    return student, teacher
