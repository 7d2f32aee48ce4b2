"""CausalLMDistiller.fit and evaluate on raw text, through the student's
keras-hub preprocessor (a GPT-2 byte-pair tokenizer built in memory)."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import losses

keras_hub = pytest.importorskip("keras_hub")

TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "the dog sat",
    "cats and dogs",
    "on the mat the cat sat",
    "a cat",
]
LENGTH = 12


def tokenizer():
    letters = sorted(set("".join(TEXTS).replace(" ", "")))
    vocabulary = {"<|endoftext|>": 0, "Ġ": 1}
    for token in letters + ["Ġ" + c for c in letters] + ["th", "Ġth"]:
        vocabulary.setdefault(token, len(vocabulary))
    return keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["t h", "Ġ th"]
    )


def gpt2(layers, width, preprocessor=None, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer().vocabulary_size(),
        num_layers=layers,
        num_heads=2,
        hidden_dim=width,
        intermediate_dim=2 * width,
        max_sequence_length=32,
        dropout=0.0,  # the comparisons need deterministic steps
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def preprocessor():
    return keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer(), sequence_length=LENGTH
    )


def distiller(student, teacher):
    model = keras_kd.CausalLMDistiller(student, teacher)
    model.compile(
        keras.optimizers.SGD(0.0),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.5,
    )
    return model


def test_fit_and_evaluate_on_raw_text_equal_the_preprocessed_arrays():
    student = gpt2(1, 16, preprocessor(), seed=1)
    model = distiller(student, gpt2(2, 32))
    x, y, w = student.preprocessor(TEXTS)
    x = {k: keras.ops.convert_to_numpy(v) for k, v in x.items()}
    y, w = (keras.ops.convert_to_numpy(a) for a in (y, w))
    assert w.sum() < w.size  # padding is there, and masked
    common = dict(batch_size=3, epochs=2, shuffle=False, verbose=0)
    text_logs = model.fit(TEXTS, validation_data=TEXTS, **common).history
    array_logs = model.fit(
        x,
        y,
        sample_weight=w.astype("float32"),
        validation_data=(x, y, w),
        **common,
    ).history
    assert set(text_logs) == set(array_logs)
    assert {"loss", "student_loss", "distillation_loss"} <= set(text_logs)
    for key in text_logs:
        np.testing.assert_allclose(text_logs[key], array_logs[key], rtol=1e-6)
    on_text = model.evaluate(TEXTS, batch_size=3, verbose=0, return_dict=True)
    on_arrays = model.evaluate(
        x, y, sample_weight=w, batch_size=3, verbose=0, return_dict=True
    )
    for key in on_text:
        np.testing.assert_allclose(on_text[key], on_arrays[key], rtol=1e-6)


def test_raw_text_trains_the_student():
    student = gpt2(1, 16, preprocessor(), seed=1)
    model = keras_kd.CausalLMDistiller(student, gpt2(2, 32))
    model.compile(keras.optimizers.Adam(1e-2), alpha=0.5)
    before = [np.array(v) for v in student.get_weights()]
    history = model.fit(TEXTS, batch_size=3, epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    moved = [
        not np.array_equal(a, b) for a, b in zip(before, student.get_weights())
    ]
    assert any(moved)


def test_raw_text_errors_name_the_argument():
    teacher = gpt2(2, 32)
    bare = distiller(gpt2(1, 16, seed=1), teacher)
    with pytest.raises(ValueError, match="`x` holds raw text.*no preprocessor"):
        bare.fit(TEXTS, verbose=0)
    with pytest.raises(
        ValueError, match="`validation_data` holds raw text.*no preprocessor"
    ):
        bare.fit(
            {
                "token_ids": np.ones((2, LENGTH), "int32"),
                "padding_mask": np.ones((2, LENGTH), "int32"),
            },
            np.ones((2, LENGTH), "int32"),
            validation_data=TEXTS,
            verbose=0,
        )
    model = distiller(gpt2(1, 16, preprocessor(), seed=1), teacher)
    with pytest.raises(
        ValueError, match="pass neither `y` nor `sample_weight`"
    ):
        model.fit(TEXTS, np.ones((6, LENGTH), "int32"), verbose=0)
    with pytest.raises(
        ValueError, match="pass neither `y` nor `sample_weight`"
    ):
        model.evaluate(TEXTS, sample_weight=np.ones((6, LENGTH)), verbose=0)
    offline = keras_kd.CausalLMDistiller(gpt2(1, 16, preprocessor(), seed=1))
    offline.compile(keras.optimizers.SGD(0.0), alpha=0.5)
    with pytest.raises(ValueError, match="offline distillation reads"):
        offline.fit(TEXTS, verbose=0)


PROMPTS = ["the cat", "a dog", "cats and", "on the"]
RESPONSES = ["sat on the mat", "ran", "dogs", "mat the cat sat"]


def test_prompt_response_pairs_weigh_the_response_and_its_end_token():
    student = gpt2(1, 16, preprocessor(), seed=1)
    model = distiller(student, gpt2(2, 32))
    tokenizer = student.preprocessor.tokenizer
    x, y, w = keras_kd.lm._keras_hub.preprocess_pairs(
        student.preprocessor, PROMPTS, RESPONSES, "x"
    )
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        p = list(tokenizer([prompt])[0])
        r = list(tokenizer([response])[0])
        row = ([0] + p + r + [0])[: LENGTH + 1]  # start and end id 0
        np.testing.assert_array_equal(
            x["token_ids"][i, : len(row) - 1], row[:-1]
        )
        np.testing.assert_array_equal(y[i, : len(row) - 1], row[1:])
        expected = np.zeros(LENGTH)
        expected[len(p) : len(row) - 1] = 1.0  # labels r..., end
        np.testing.assert_array_equal(w[i], expected)
    common = dict(batch_size=2, shuffle=False, verbose=0)
    pairs = {"prompts": PROMPTS, "responses": RESPONSES}
    text_logs = model.fit(pairs, validation_data=pairs, **common).history
    array_logs = model.fit(
        x, y, sample_weight=w, validation_data=(x, y, w), **common
    ).history
    for key in text_logs:
        np.testing.assert_allclose(text_logs[key], array_logs[key], rtol=1e-6)


def test_on_policy_from_prompts_alone_stops_at_the_end_token():
    student = gpt2(1, 16, preprocessor(), seed=1)
    model = keras_kd.CausalLMDistiller(student, gpt2(2, 32), seed=0)
    model.compile(
        keras.optimizers.SGD(0.1),
        distillation_loss=losses.ReverseKLDivergence(),
        on_policy_fraction=1.0,
    )
    logs = model.fit({"prompts": PROMPTS}, batch_size=4, verbose=0).history
    assert logs["generated_length"][0] > 0
    x, _, w = model.generate_responses(PROMPTS)
    end = student.preprocessor.tokenizer.end_token_id
    for row, weights in zip(x["token_ids"], w):
        last = np.flatnonzero(weights)[-1] + 1  # the last trained token
        generated = row[np.flatnonzero(weights) + 1]
        # Only the last trained token may be the end token ("auto").
        assert end not in generated[:-1]
        assert last == LENGTH - 1 or row[last] == end
