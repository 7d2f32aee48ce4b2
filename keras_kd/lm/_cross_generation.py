"""On-policy distillation from a teacher with another tokenizer.

The teacher cannot read the student's sampled token ids, so the samples
are decoded to text and both tokenizations are aligned on the host
(`keras_kd.align_tokens`), outside the compiled training step. That is
done once per epoch, at its start, with the student's weights of that
moment: a seeded draw picks `on_policy_fraction` of the rows, the student
writes their responses (keras-hub's `generate_step`, the compiled
sampler of `CausalLMDistiller.compile`), and the epoch trains on the
aligned batches of the rewritten rows and of the others (the dataset's
responses). The student's cross-entropy never applies to its own samples.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_kd import _checks
from keras_kd.lm import _keras_hub as hub
from keras_kd.lm.alignment import align_tokens


def _text_pairs(x, name):
    """`(prompts, responses)` lists of raw text `x`."""
    if hub.is_text(x):
        texts = hub.strings(x)
        return [""] * len(texts), texts
    if "responses" not in x:
        raise _checks.invalid(
            name,
            '`{"prompts", "responses"}`: the rows the student does not '
            "rewrite train on the dataset's responses",
            x,
        )
    return hub.strings(x["prompts"]), hub.strings(x["responses"])


def _decoded(tokenizer, ids):
    text = tokenizer.detokenize(np.asarray(ids, "int32"))
    text = ops.convert_to_numpy(text) if ops.is_tensor(text) else text
    if isinstance(text, np.ndarray):
        text = text.item()
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else text


class EpochResponses(keras.utils.PyDataset):
    """The aligned batches of one epoch: `refresh(epoch)` lets the student
    rewrite a seeded share of the responses, then re-aligns the rows."""

    def __init__(self, distiller, x, batch_size, shuffle, name):
        super().__init__()
        self.distiller = distiller
        self.prompts, self.responses = _text_pairs(x, name)
        self.batch_size = 32 if batch_size is None else int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = distiller.seed
        if self.seed is None:
            self.seed = int(np.random.default_rng().integers(2**31))
        self.generated_rows = 0
        self.refresh(0)

    def __len__(self):
        return math.ceil(len(self.prompts) / self.batch_size)

    def __getitem__(self, index):
        rows = self.order[
            index * self.batch_size : (index + 1) * self.batch_size
        ]
        return {k: v[rows] for k, v in self.arrays.items()}

    def refresh(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.prompts)
        fraction = self.distiller._responses.on_policy_fraction
        chosen = np.flatnonzero(rng.random(count) < fraction)
        responses, ended = list(self.responses), np.ones(count, bool)
        written = np.zeros(count, "float32")
        for start in range(0, len(chosen), self.batch_size):
            rows = chosen[start : start + self.batch_size]
            for row, (text, stop) in zip(rows, self._generate(rows, rng)):
                # An empty sample has no text to align: the row keeps the
                # dataset's response this epoch.
                if text:
                    responses[row], ended[row], written[row] = text, stop, 1
        self.generated_rows = int(written.sum())
        self.arrays = self._aligned(responses, ended)
        self.arrays["student_written"] = written
        self.order = (
            rng.permutation(count) if self.shuffle else np.arange(count)
        )

    def _generate(self, rows, rng):
        """`(text, stopped)` of the student's response to each row's
        prompt; `stopped` when it ended with a stop token."""
        distiller = self.distiller
        plan = distiller._responses
        x = hub.prompts(
            distiller.student.preprocessor, [self.prompts[r] for r in rows]
        )
        x = {k: ops.convert_to_tensor(v) for k, v in x.items()}
        seed = rng.integers(0, 2**31 - 1, size=2)
        _, labels, weights, _ = plan.responses(
            distiller, "student", x, None, seed
        )
        labels = ops.convert_to_numpy(labels)
        weights = ops.convert_to_numpy(weights) > 0
        stops = set(plan.stop_token_ids or ())
        tokenizer = distiller.student.preprocessor.tokenizer
        found = []
        for ids in (labels[i][weights[i]] for i in range(len(rows))):
            stopped = len(ids) > 0 and int(ids[-1]) in stops
            ids = ids[:-1] if stopped else ids
            found.append(
                (_decoded(tokenizer, ids) if len(ids) else "", stopped)
            )
        return found

    def _aligned(self, responses, ended):
        """`align_tokens` of every row, the end token added only to the
        responses that ended with one."""
        distiller, out = self.distiller, None
        for flag in (True, False):
            rows = np.flatnonzero(ended == flag)
            if not len(rows):
                continue
            part = align_tokens(
                distiller.student.preprocessor,
                distiller.teacher.preprocessor,
                {
                    "prompts": [self.prompts[r] for r in rows],
                    "responses": [responses[r] for r in rows],
                },
                alignment=distiller.alignment,
                add_end_token=flag,
            )
            if out is None:
                out = {
                    k: np.zeros((len(ended),) + v.shape[1:], v.dtype)
                    for k, v in part.items()
                }
            for k, v in part.items():
                out[k][rows] = v
        return out


class RefreshResponses(keras.callbacks.Callback):
    """Lets the student rewrite its share of the responses at the start of
    every epoch after the first (the first epoch's were written when
    `fit` began)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0:
            self.data.refresh(epoch)


def epoch_data(distiller, x, fit_kwargs, name):
    """`(dataset, fit_kwargs)` for `fit` on raw text `x` with on-policy
    generation across tokenizers."""
    kwargs = dict(fit_kwargs)
    data = EpochResponses(
        distiller,
        x,
        kwargs.pop("batch_size", None),
        kwargs.pop("shuffle", True),
        name,
    )
    callbacks = list(kwargs.get("callbacks") or [])
    kwargs["callbacks"] = callbacks + [RefreshResponses(data)]
    return data, kwargs
