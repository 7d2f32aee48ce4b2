"""Byte spans `[start, end)` of a tokenizer's tokens in the UTF-8 text
they came from.

The tokens are walked left to right, each matched by its bytes
(`keras_kd.lm._token_bytes`) at the current offset:

- a token that matches exactly takes its bytes;
- whitespace that no token covers is skipped (WordPiece drops it, and
  SentencePiece collapses runs of it); a token whose bytes begin with
  spaces may match after them (SentencePiece's dummy-prefix space, or
  `▁` for a newline): it then takes the whitespace before it, if any;
- a special token takes the text that spells it out, if the text does at
  that offset, else an empty span;
- an unknown token, or one whose bytes do not match (normalization the
  text's mapping does not reproduce), takes the bytes up to where one of
  the next tokens matches (several such tokens in a row: the last takes
  them, the others get empty spans), at least one character.

Texts a tokenizer normalizes (lowercasing, accent stripping, NFKC) are
normalized here the same way first, one grapheme cluster at a time, and
the spans are mapped back to the original bytes (byte for byte where a
cluster keeps its length, else to the cluster's start). Spans never
overlap and never go back; the last non-empty token of a text is extended
to its end.
"""

import re

import numpy as np

from keras_kd import _checks
from keras_kd.lm._token_bytes import NORMAL, SPECIAL

_WHITESPACE = re.compile(rb"[ \t\n\r\f\v]*")
# How many of the next tokens an unmatched token looks at to resume.
_LOOKAHEAD = 8
# Strings per tokenizer call: bounds the call's temporaries.
_BLOCK = 1024


def text_spans(ids, text, data, tb):
    """`(starts, ends)` lists: the span in `data` (the UTF-8 of `text`) of
    each of the token ids `ids`."""
    if tb.normalize is None:
        return _walk(ids, data, tb.pieces, tb.flags)
    normalized, offsets = _normalized(text, data, tb.normalize)
    starts, ends = _walk(ids, normalized, tb.pieces, tb.flags)
    if offsets is not None:
        starts = [offsets[i] for i in starts]
        ends = [offsets[i] for i in ends]
        if ends and ends[-1] < len(data):
            _extend(starts, ends, len(data))
    return starts, ends


def flat_tokens(tokenizer, tb, packing, texts, spans=True):
    """Every token of every row, tokenized by `tokenizer` (whose
    `TokenBytes` is `tb`), in order, as flat NumPy arrays.

    A row is the start token, the prompt's tokens, the response's and the
    end token (`packing = (start id or None, end id or None)`); `texts` is
    `(prompts or None, responses, their UTF-8s, each row's byte base)`:
    spans are offsets from a row's base, distinct for every row. Without
    `spans` (positional alignment) every span is empty.
    """
    start_id, end_id = packing
    prompts, responses, prompt_bytes, response_bytes, bases = texts
    prompt_ids = tokenize(tokenizer, prompts) if prompts else None
    response_ids = tokenize(tokenizer, responses)

    def add(run, text, data):
        ids.extend(run)
        if spans and data:
            s, e = text_spans(run, text, data, tb)
        else:
            s = e = [0] * len(run)
        starts.extend(s)
        ends.extend(e)

    ids, starts, ends = [], [], []
    # Per run of tokens: count, byte base, end of its text, response?,
    # added by packing?
    runs = []
    for r, base in enumerate(bases.tolist()):
        offset = base
        if start_id is not None:
            add([start_id], "", b"")
            runs.append((1, base, base, False, True))
        if prompt_ids is not None:
            add(prompt_ids[r], prompts[r], prompt_bytes[r])
            offset = base + len(prompt_bytes[r])
            runs.append((len(prompt_ids[r]), base, offset, False, False))
        add(response_ids[r], responses[r], response_bytes[r])
        stop = offset + len(response_bytes[r])
        runs.append((len(response_ids[r]), offset, stop, True, False))
        if end_id is not None:
            add([end_id], "", b"")
            runs.append((1, stop, stop, True, True))
    count, base, stop, response, packed = (np.array(c) for c in zip(*runs))
    row_of_run = np.repeat(np.arange(len(bases)), len(runs) // len(bases))
    row_length = np.bincount(row_of_run, count, len(bases)).astype(np.int64)
    ids = np.array(ids, np.int64)
    row = np.repeat(row_of_run, count)
    first = np.concatenate([[0], np.cumsum(row_length)[:-1]])
    base = np.repeat(base, count)
    start = np.array(starts, np.int64) + base
    end = np.array(ends, np.int64) + base
    special = np.repeat(packed, count).astype(bool)
    special |= tb.flag_array[ids] == SPECIAL
    empty = end == start
    return {
        "ids": ids,
        "row": row,
        "position": np.arange(len(ids)) - first[row],
        "start": start,
        "end": end,
        "stop": np.repeat(stop, count),
        "response": np.repeat(response, count).astype(bool),
        # 0: covers bytes; 1: an empty special; 2: another empty token.
        "kind": np.where(empty, np.where(special, 1, 2), 0),
        "row_length": row_length,
    }


def tokenize(tokenizer, texts):
    """Token id lists of `texts`, without padding or truncation, and
    without the start and end tokens a SentencePiece tokenizer may add."""
    saved = getattr(tokenizer, "sequence_length", None)
    if saved:
        tokenizer.sequence_length = None
    try:
        rows = []
        for start in range(0, len(texts), _BLOCK):
            rows.extend(
                _lists(tokenizer.tokenize(texts[start : start + _BLOCK]))
            )
    finally:
        if saved:
            tokenizer.sequence_length = saved
    processor = getattr(tokenizer, "_sentence_piece_spm", None)
    if processor is not None and getattr(tokenizer, "add_bos", False):
        bos = processor.bos_id()
        rows = [r[1:] if r and r[0] == bos else r for r in rows]
    if processor is not None and getattr(tokenizer, "add_eos", False):
        eos = processor.eos_id()
        rows = [r[:-1] if r and r[-1] == eos else r for r in rows]
    return rows


def _lists(ids):
    if hasattr(ids, "to_list"):  # a tf.RaggedTensor
        ids = ids.to_list()
    elif not isinstance(ids, (list, tuple, np.ndarray)):
        from keras import ops

        ids = ops.convert_to_numpy(ids)
    if isinstance(ids, np.ndarray) and ids.dtype != object:
        return ids.tolist()
    return [
        row.tolist() if isinstance(row, np.ndarray) else list(row)
        for row in ids
    ]


def _normalized(text, data, normalize):
    """`(bytes, offsets)`: the normalized text's UTF-8, and the original
    byte offset of each of its byte offsets (`None`: the same)."""
    result = normalize(text)
    if result == text:
        return data, None
    if text.isascii() and len(result) == len(text) and result.isascii():
        return result.encode(), None
    memo = {}
    out, offsets = [], []
    position = 0
    for cluster in _clusters(text):
        found = memo.get(cluster)
        if found is None:
            original = cluster.encode()
            found = (original, normalize(cluster).encode())
            memo[cluster] = found
        original, result = found
        size = len(original)
        if len(result) == size:  # unchanged, or changed byte for byte
            offsets.extend(range(position, position + size))
        else:
            offsets.extend([position] * len(result))
        out.append(result)
        position += size
    offsets.append(position)
    return b"".join(out), offsets


def _clusters(text):
    try:
        import regex
    except ImportError:  # pragma: no cover - keras-hub requires regex
        return list(text)
    return regex.findall(r"\X", text)


def _walk(ids, data, pieces, flags):
    size = len(data)
    count = len(ids)
    starts, ends = [0] * count, [0] * count
    pos = 0
    i = 0
    while i < count:
        token = ids[i]
        flag = flags[token]
        piece = pieces[token]
        if flag == NORMAL:
            if data.startswith(piece, pos):
                starts[i] = pos
                pos += len(piece)
                ends[i] = pos
                i += 1
                continue
            skip = _WHITESPACE.match(data, pos).end()
            if skip > pos and data.startswith(piece, skip):
                starts[i] = skip
                pos = skip + len(piece)
                ends[i] = pos
                i += 1
                continue
            bare = piece.lstrip(b" ")
            if len(bare) < len(piece):
                if not bare or data.startswith(bare, skip):
                    starts[i] = pos
                    pos = skip + len(bare)
                    ends[i] = pos
                    i += 1
                    continue
        elif flag == SPECIAL:
            starts[i] = pos
            if piece and data.startswith(piece, pos):
                pos += len(piece)
            ends[i] = pos
            i += 1
            continue
        pos, i = _resume(ids, i, pos, data, pieces, flags, starts, ends)
    if pos < size and count:
        _extend(starts, ends, size)
    return starts, ends


def _resume(ids, i, pos, data, pieces, flags, starts, ends):
    """Spans for the unmatched token `i` and the tokens after it up to the
    next one that matches; returns the new offset and the next token."""
    size, count = len(data), len(ids)
    skip = _WHITESPACE.match(data, pos).end()
    if skip < size:
        pos = skip
    stop, end = None, None
    anchors = False
    for j in range(i + 1, min(count, i + 1 + _LOOKAHEAD)):
        token = ids[j]
        if flags[token] != NORMAL:
            continue
        anchors = True
        piece = pieces[token]
        found = data.find(piece, pos + 1)
        bare = piece.lstrip(b" ")
        if found < 0 and bare and len(bare) < len(piece):
            found = data.find(bare, pos + 1)
        if found >= 0:
            stop, end = j, found
            break
    if stop is None:
        if anchors or any(flags[t] == NORMAL for t in ids[i + 1 :]):
            stop, end = i + 1, _next_character(data, pos)
        else:
            stop, end = count, size
    # Whitespace before the next token is not the unmatched token's.
    trimmed = pos + len(data[pos:end].rstrip())
    end = trimmed if trimmed > pos else end
    last = max(j for j in range(i, stop) if flags[ids[j]] != SPECIAL)
    for j in range(i, stop):
        starts[j] = pos if j <= last else end
        ends[j] = pos if j < last else end
    return end, stop


def _next_character(data, pos):
    end = min(pos + 1, len(data))
    while end < len(data) and data[end] & 0xC0 == 0x80:
        end += 1
    return end


def _extend(starts, ends, size):
    """Extends the last non-empty span (and any empty ones after it) to
    `size`."""
    for k in range(len(ends) - 1, -1, -1):
        if ends[k] > starts[k]:
            ends[k] = size
            for j in range(k + 1, len(ends)):
                starts[j] = ends[j] = size
            return


class _Short:
    """A value whose repr is cut to a readable length."""

    def __init__(self, value, limit=120):
        self.text = repr(value)
        if len(self.text) > limit:
            self.text = self.text[: limit - 3] + "..."

    def __repr__(self):
        return self.text


def text_pairs(texts):
    """`(prompts or None, responses)`: lists of strings."""
    if isinstance(texts, dict):
        if set(texts) != {"prompts", "responses"}:
            raise _checks.invalid(
                "texts",
                "a list of strings or a dict with exactly the keys "
                "'prompts' and 'responses'",
                _Short(texts),
            )
        prompts = _strings(texts["prompts"], "texts['prompts']", True)
        responses = _strings(texts["responses"], "texts['responses']")
        if len(prompts) != len(responses):
            raise _checks.invalid(
                "texts",
                "one response per prompt, not "
                f"{len(prompts)} prompts and {len(responses)} responses",
                _Short(texts),
            )
        return prompts, responses
    return None, _strings(texts, "texts")


def _strings(values, name, allow_empty=False):
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise _checks.invalid(
            name,
            "a list, tuple or 1-D NumPy array of strings",
            _Short(values),
        )
    if not values:
        raise _checks.invalid(name, "at least one string", _Short(values))
    out = []
    for i, value in enumerate(values):
        if isinstance(value, (bytes, np.bytes_)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                pass
        if not isinstance(value, str):
            raise _checks.invalid(f"{name}[{i}]", "a string", _Short(value))
        if not value and not allow_empty:
            raise _checks.invalid(f"{name}[{i}]", "a non-empty string", value)
        out.append(str(value))
    return out
