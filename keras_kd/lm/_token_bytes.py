"""The bytes of text each vocabulary id of a keras-hub tokenizer stands
for, computed once per tokenizer, and the ids two vocabularies share.

Every id gets a piece and a flag:

- `NORMAL`: `piece` is the token's bytes (GPT-2's byte-to-unicode map
  undone, SentencePiece's `▁` a space and `<0xNN>` one byte, WordPiece's
  `##` continuation mark dropped, a byte's or a code point's UTF-8);
- `SPECIAL`: a control token (`<s>`, `<|endoftext|>`, `[CLS]`, ...) that
  stands for no text; `piece` is its token string in UTF-8, which a text
  may still spell out literally;
- `UNKNOWN`: an unknown token (`<unk>`, `[UNK]`): it stands for text, but
  not for any bytes known in advance.

Tokenizers that change the text before splitting it (lowercasing, accent
stripping, Unicode normalization) also get `normalize`, the same change
as a function of a string, applied to the text before its tokens are
matched (`keras_kd.lm._byte_spans`).
"""

import functools
import unicodedata
import weakref

import numpy as np

from keras_kd import _checks

NORMAL, SPECIAL, UNKNOWN = 0, 1, 2
_MAX_CODE_POINT = 0x110000


class TokenBytes:
    """`pieces[id]` and `flags[id]` for every id of one tokenizer (see the
    module's docstring); `size` ids; `normalize` (or `None`)."""

    def __init__(self, pieces, flags, normalize=None):
        self.pieces, self.flags = pieces, flags
        self.size = len(pieces)
        self.normalize = normalize
        self.matches = weakref.WeakKeyDictionary()
        self.flag_array = np.frombuffer(bytes(flags), np.uint8)

    def same_content(self, other):
        return self is other or (
            self.size == other.size
            and self.flags == other.flags
            and self.pieces == other.pieces
        )


class _CodePoints:
    """The UTF-8 of every code point, computed on demand (a code point
    tokenizer without a `vocabulary_size` has 1,114,112 ids)."""

    def __init__(self, size):
        self.size, self.cache = size, {}

    def __len__(self):
        return self.size

    def __eq__(self, other):
        return isinstance(other, _CodePoints) and self.size == other.size

    def __getitem__(self, i):
        piece = self.cache.get(i)
        if piece is None:
            valid = 0 <= i < _MAX_CODE_POINT and not 0xD800 <= i <= 0xDFFF
            piece = chr(i if valid else 0xFFFD).encode()
            self.cache[i] = piece
        return piece


# -------------------------------------------------------------- public


def tokenizer_of(obj, name="tokenizer"):
    """The keras-hub tokenizer of `obj`: `obj` itself, or the `tokenizer`
    of a keras-hub preprocessor; a `ValueError` naming `name` otherwise."""
    try:
        from keras_hub.tokenizers import Tokenizer
    except ImportError as error:  # pragma: no cover - keras-hub is optional
        raise ImportError(
            "Aligning tokenizations needs keras-hub: pip install keras-hub"
        ) from error
    if isinstance(obj, Tokenizer):
        return obj
    inner = getattr(obj, "tokenizer", None)
    if isinstance(inner, Tokenizer):
        return inner
    raise _checks.invalid(
        name,
        "a keras-hub tokenizer (e.g. `keras_hub.tokenizers."
        "BytePairTokenizer`) or a keras-hub preprocessor with one (e.g. "
        "`keras_hub.models.GPT2CausalLMPreprocessor`)",
        obj,
    )


_CACHE = weakref.WeakKeyDictionary()


def token_bytes(tokenizer, name="tokenizer"):
    """The `TokenBytes` of a keras-hub tokenizer (or preprocessor), built
    once per tokenizer object and rebuilt if its vocabulary is replaced."""
    tokenizer = tokenizer_of(tokenizer, name)
    handle = _handle(tokenizer)
    cached = _CACHE.get(tokenizer)
    if cached is not None and cached[0] == handle:
        return cached[1]
    found = _build(tokenizer, name)
    _CACHE[tokenizer] = (handle, found)
    return found


def vocabulary_match(student_tokenizer, teacher_tokenizer):
    """`(student_ids, teacher_ids)`, two int32 arrays of equal length: the
    pairs of ids that stand for the same text.

    Ordinary tokens match when their bytes are equal (GPT-2's `Ġhello`
    and SentencePiece's `▁hello` are both `b" hello"`); special and
    unknown tokens when their token strings are identical. Each id appears
    at most once (of several ids with the same bytes, the smallest wins),
    and the pairs are sorted by student id. Tokenizers with the same
    content (one tokenizer on both sides) match every id to itself.
    Cached per pair of tokenizers.
    """
    student = token_bytes(student_tokenizer, "student_tokenizer")
    teacher = token_bytes(teacher_tokenizer, "teacher_tokenizer")
    found = student.matches.get(teacher)
    if found is None:
        found = _match(student, teacher)
        for array in found:
            array.flags.writeable = False
        student.matches[teacher] = found
    return found


# ------------------------------------------------------------ matching


def _key(tb, i):
    piece = tb.pieces[i]
    return piece if tb.flags[i] == NORMAL else (piece,)


def _match(student, teacher):
    if student.same_content(teacher):
        ids = np.arange(student.size, dtype=np.int32)
        return ids, ids.copy()
    # Walk the finite side, looking ids up on the other.
    swap = isinstance(student.pieces, _CodePoints)
    outer, inner = (teacher, student) if swap else (student, teacher)
    if isinstance(inner.pieces, _CodePoints):

        def find(i):
            return _code_point_id(outer, i, inner.size)
    else:
        index = {}
        for i in range(inner.size):
            index.setdefault(_key(inner, i), i)

        def find(i):
            return index.get(_key(outer, i))

    pairs, taken = [], set()
    for i in range(outer.size):
        j = find(i)
        if j is not None and j not in taken:
            taken.add(j)
            pairs.append((j, i) if swap else (i, j))
    found = np.asarray(sorted(pairs), np.int32).reshape(-1, 2)
    return np.ascontiguousarray(found[:, 0]), np.ascontiguousarray(found[:, 1])


def _code_point_id(tb, i, size):
    """The code point id whose UTF-8 is id `i`'s piece, if any."""
    if tb.flags[i] != NORMAL:
        return None
    try:
        text = tb.pieces[i].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) != 1 or ord(text) >= size:
        return None
    return ord(text)


# ------------------------------------------------------------ building


def _char_norm(tokenizer):
    return _steps(
        tokenizer.lowercase and _casefold,
        _form(tokenizer.normalization_form),
    )


def _handle(tokenizer):
    """What `token_bytes` depends on besides the tokenizer's class: the
    vocabulary objects (by identity) and the normalization options."""
    parts = []
    for attr in ("vocabulary", "merges", "proto", "_vocabulary"):
        value = getattr(tokenizer, attr, None)
        parts.append(id(value) if value is not None else None)
    for attr in (
        "lowercase",
        "strip_accents",
        "normalization_form",
        "suffix_indicator",
        "oov_token",
        "_vocabulary_size",
        "unsplittable_tokens",
    ):
        value = getattr(tokenizer, attr, None)
        parts.append(tuple(value) if isinstance(value, list) else value)
    parts.append(tuple(sorted(map(str, _special_strings(tokenizer)))))
    return tuple(parts)


def _special_strings(tokenizer):
    try:
        tokens = list(tokenizer.special_tokens)
    except (AttributeError, ValueError):
        tokens = []
    return [t for t in tokens if isinstance(t, str)]


def _build(tokenizer, name):
    from keras_hub import tokenizers as kt

    cls = type(tokenizer).__name__
    if getattr(tokenizer, "compute_dtype", "int32") in ("string", "str"):
        raise _checks.invalid(
            name, "a tokenizer that outputs integer ids", tokenizer
        )
    if isinstance(tokenizer, kt.BytePairTokenizer):
        pieces, flags = _byte_pair(tokenizer)
        return TokenBytes(pieces, flags)
    if isinstance(tokenizer, kt.SentencePieceTokenizer):
        pieces, flags = _sentence_piece(tokenizer)
        return TokenBytes(pieces, flags, _sentence_piece_norm(tokenizer))
    if isinstance(tokenizer, kt.WordPieceTokenizer):
        pieces, flags = _word_piece(tokenizer)
        normalize = _steps(
            tokenizer.strip_accents and _strip_accents,
            tokenizer.lowercase and _casefold,
        )
        return TokenBytes(pieces, flags, normalize)
    if isinstance(tokenizer, kt.ByteTokenizer):
        pieces = [bytes([i]) for i in range(256)]
        return TokenBytes(pieces, bytes(256), _char_norm(tokenizer))
    if isinstance(tokenizer, kt.UnicodeCodepointTokenizer):
        size = tokenizer.vocabulary_size() or _MAX_CODE_POINT
        flags = bytes(size)  # all NORMAL
        return TokenBytes(_CodePoints(size), flags, _char_norm(tokenizer))
    raise _checks.invalid(
        name,
        "a keras-hub BytePairTokenizer, SentencePieceTokenizer, "
        "WordPieceTokenizer, ByteTokenizer or UnicodeCodepointTokenizer (or "
        f"a subclass), not a {cls}, whose tokens' bytes are unknown",
        tokenizer,
    )


def _byte_pair(tokenizer):
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    byte_list, unicode_list = bytes_to_unicode()
    decoder = {c: b[0] for b, c in zip(byte_list, unicode_list)}
    vocabulary = tokenizer.vocabulary
    size = max(vocabulary.values()) + 1 if vocabulary else 0
    pieces, flags = [b""] * size, [SPECIAL] * size
    specials = set(_special_strings(tokenizer))
    specials.update(tokenizer.unsplittable_tokens or ())
    for token, i in vocabulary.items():
        raw = [decoder.get(c) for c in token]
        if token in specials or None in raw or not raw:
            pieces[i], flags[i] = token.encode(), SPECIAL
        else:
            pieces[i], flags[i] = bytes(raw), NORMAL
    return pieces, flags


def _sentence_piece(tokenizer):
    tokenizer._maybe_initialized_spm()
    processor = tokenizer._sentence_piece_spm
    vocabulary = tokenizer.get_vocabulary()
    pieces, flags = [], []
    for i, token in enumerate(vocabulary):
        if processor.IsUnknown(i):
            pieces.append(token.encode())
            flags.append(UNKNOWN)
        elif processor.IsControl(i) or processor.IsUnused(i):
            pieces.append(token.encode())
            flags.append(SPECIAL)
        elif processor.IsByte(i):
            pieces.append(bytes([int(token[3:-1], 16)]))
            flags.append(NORMAL)
        else:
            pieces.append(token.replace("\u2581", " ").encode())
            flags.append(NORMAL)
    return pieces, flags


def _word_piece(tokenizer):
    suffix = tokenizer.suffix_indicator
    specials = set(_special_strings(tokenizer))
    specials.update(getattr(tokenizer, "_init_special_tokens", None) or ())
    pieces, flags = [], []
    for token in tokenizer.get_vocabulary():
        bracketed = (
            len(token) > 2
            and token[0] + token[-1] in ("[]", "<>")
            and token[1:-1].replace("_", "").replace("-", "").isalnum()
        )
        if token == tokenizer.oov_token:
            pieces.append(token.encode())
            flags.append(UNKNOWN)
        elif token in specials or bracketed:
            pieces.append(token.encode())
            flags.append(SPECIAL)
        elif suffix and token.startswith(suffix) and len(token) > len(suffix):
            pieces.append(token[len(suffix) :].encode())
            flags.append(NORMAL)
        else:
            pieces.append(token.encode())
            flags.append(NORMAL)
    return pieces, flags


# -------------------------------------------------------- normalization


def _casefold(text):
    from keras_hub.src.utils.tensor_utils import casefold_utf8

    return casefold_utf8(text)


def _strip_accents(text):
    text = unicodedata.normalize("NFD", text)
    return "".join(c for c in text if unicodedata.category(c) != "Mn")


def _form(name):
    return (lambda text: unicodedata.normalize(name, text)) if name else None


def _steps(*steps):
    """The composition of the steps that are not `None` (or `None`)."""
    steps = [step for step in steps if step]
    if not steps:
        return None
    return lambda text: functools.reduce(lambda t, f: f(t), steps, text)


def _sentence_piece_norm(tokenizer):
    # `normalizer_spec` (field 3 of the `ModelProto`), its `name` (field 1).
    name = _field(_field(tokenizer.proto, 3) or b"", 1)
    if name in (b"nmt_nfkc", b"nfkc"):
        return _form("NFKC")
    if name in (b"nmt_nfkc_cf", b"nfkc_cf"):
        return _steps(_form("NFKC"), str.casefold)
    return None


def _field(data, number):
    """The last length-delimited field `number` of a serialized protobuf
    message, or `None`."""
    found, pos = None, 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            if tag & 7 == 0:
                pos = _varint(data, pos)[1]
            elif tag & 7 in (1, 5):
                pos += 8 if tag & 7 == 1 else 4
            elif tag & 7 == 2:
                length, pos = _varint(data, pos)
                if tag >> 3 == number:
                    found = bytes(data[pos : pos + length])
                pos += length
            else:
                return found
    except IndexError:
        return None
    return found


def _varint(data, pos):
    value, shift = 0, 0
    while data[pos] >= 0x80:
        value |= (data[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
    return value | data[pos] << shift, pos + 1
