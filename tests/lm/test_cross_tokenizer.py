"""CausalLMDistiller with a teacher of another tokenizer: ULD and the
hybrid distance over aligned token groups, against a dense float64
reference built from both models' logits; the same-tokenizer identity
with the JSD; raw text; errors."""

import keras
import numpy as np
import pytest
from _cases import log_softmax64

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
LENGTH = 16
LETTERS = sorted(set("".join(TEXTS).replace(" ", "")))


def tokenizer(merges=True):
    """GPT-2 byte-level BPE; without merges every character is a token."""
    vocabulary = {"Ġ": 0}
    extra = ["th", "Ġth", "at", "Ġthe"] if merges else []
    # The end token is not GPT-2's pad id 0: generation would read the
    # padding after a prompt as a stop.
    for token in LETTERS + ["Ġ" + c for c in LETTERS] + extra:
        vocabulary.setdefault(token, len(vocabulary))
    vocabulary["<|endoftext|>"] = len(vocabulary)
    rules = ["t h", "Ġ th", "a t", "Ġth e"] if merges else []
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=rules)


def gpt2(tok, layers, width, seed, with_preprocessor=True, length=LENGTH):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tok.vocabulary_size(),
        num_layers=layers,
        num_heads=2,
        hidden_dim=width,
        intermediate_dim=2 * width,
        max_sequence_length=32,
        dropout=0.0,
    )
    pre = keras_hub.models.GPT2CausalLMPreprocessor(tok, sequence_length=length)
    return keras_hub.models.GPT2CausalLM(
        backbone, preprocessor=pre if with_preprocessor else None
    )


def char_student(seed=1):
    return gpt2(tokenizer(merges=False), 1, 16, seed)


def bpe_teacher(seed=0):
    return gpt2(tokenizer(), 2, 32, seed)


def compiled(student, teacher, loss, alpha=0.4, optimizer=None, **kwargs):
    model = keras_kd.CausalLMDistiller(student, teacher, **kwargs)
    model.compile(
        optimizer or keras.optimizers.SGD(0.0),
        distillation_loss=loss,
        alpha=alpha,
    )
    return model


def aligned(student, teacher, texts=TEXTS, **kwargs):
    return keras_kd.align_tokens(
        student.preprocessor, teacher.preprocessor, texts, **kwargs
    )


# ------------------------------------------------------- dense reference


def logits64(model, ids, mask):
    out = model({"token_ids": ids, "padding_mask": mask})
    return keras.ops.convert_to_numpy(out).astype("float64")


def sorted_l1(a, b):
    width = max(len(a), len(b))
    a = np.pad(-np.sort(-a), (0, width - len(a)))
    b = np.pad(-np.sort(-b), (0, width - len(b)))
    return np.abs(a - b).sum()


def hybrid(a, b, ids, beta):
    q, p = a[ids[0]], b[ids[1]]
    if beta == 0.0:
        exact = p * np.log(p / q) - p + q
    elif beta == 1.0:
        exact = q * np.log(q / p) - q + p
    else:
        m = beta * p + (1 - beta) * q
        exact = beta * p * np.log(p / m) + (1 - beta) * q * np.log(q / m)
    rest_a = np.delete(a, ids[0])
    rest_b = np.delete(b, ids[1])
    return exact.sum() + sorted_l1(rest_a, rest_b)


def group_distribution(log_p, zs, groups, start, g, t, ids):
    """The model's distribution before the group's first token, times its
    probability of the group's later tokens."""
    later = [k for k in np.flatnonzero(groups == g) if k != start]
    scale = sum(log_p[k - 1, ids[k]] for k in later)
    return np.exp(scale) * np.exp(log_softmax64(zs[start - 1] / t))


def reference(student, teacher, x, kind, beta, alpha, t, matched=None):
    zs = logits64(student, x["token_ids"], x["padding_mask"])
    zt = logits64(teacher, x["teacher_token_ids"], x["teacher_padding_mask"])
    ls, lt = log_softmax64(zs), log_softmax64(zt)
    distances, ce = [], []
    for r in range(len(zs)):
        ids_s, ids_t = x["token_ids"][r], x["teacher_token_ids"][r]
        for k in np.flatnonzero(x["response_mask"][r]):
            ce.append(-ls[r, k - 1, ids_s[k]])
        for g in np.flatnonzero(x["group_mask"][r]):
            a = group_distribution(
                ls[r],
                zs[r],
                x["student_groups"][r],
                x["student_group_starts"][r, g],
                g,
                t,
                ids_s,
            )
            b = group_distribution(
                lt[r],
                zt[r],
                x["teacher_groups"][r],
                x["teacher_group_starts"][r, g],
                g,
                t,
                ids_t,
            )
            d = (
                sorted_l1(a, b)
                if kind == "universal"
                else hybrid(a, b, matched, beta)
            )
            distances.append(t * t * d)
    ce, dist = np.mean(ce), np.mean(distances)
    return alpha * ce + (1 - alpha) * dist, ce, dist


@pytest.mark.parametrize(
    "loss",
    [
        losses.UniversalLogitDistance(temperature=2.0),
        losses.HybridLogitDistance(beta=0.3, temperature=2.0),
        losses.HybridLogitDistance(beta=1.0, temperature=1.0),
    ],
    ids=["uld", "hybrid", "hybrid-reverse"],
)
def test_loss_equals_the_dense_group_reference(loss):
    student, teacher = char_student(), bpe_teacher()
    model = compiled(student, teacher, loss, alpha=0.4)
    x = aligned(student, teacher)
    # Some groups are several student tokens: the scale matters.
    assert not x["one_to_one"][x["group_mask"] > 0].all()
    got = model.evaluate(x, batch_size=len(TEXTS), return_dict=True, verbose=0)
    matched = None
    if loss.distance == "hybrid":
        matched = model._cross.matched_ids
        assert 0 < len(matched[0]) < teacher.backbone.vocabulary_size
    want = reference(
        student,
        teacher,
        x,
        loss.distance,
        getattr(loss, "beta", 0.5),
        0.4,
        loss.temperature,
        matched,
    )
    np.testing.assert_allclose(
        [got["loss"], got["student_loss"], got["distillation_loss"]],
        want,
        rtol=2e-5,
    )


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_one_shared_tokenizer_gives_the_jsd_distiller(beta):
    """The hybrid over one tokenizer is the JSD, in value and in the update
    one step makes. (The rows are long enough for no truncation: the
    preprocessor packs one token more than `align_tokens`.)"""
    results = []
    for cross in (True, False):
        student = gpt2(tokenizer(), 1, 16, 1, length=24)
        teacher = gpt2(tokenizer(), 2, 32, 0, length=24)
        loss = (
            losses.HybridLogitDistance(beta, temperature=2.0)
            if cross
            else losses.JensenShannonDivergence(beta, temperature=2.0)
        )
        model = compiled(
            student,
            teacher,
            loss,
            alpha=0.3,
            optimizer=keras.optimizers.SGD(0.5),
        )
        if cross:
            x = aligned(student, teacher)
            assert x["one_to_one"][x["group_mask"] > 0].all()
            args = (x,)
        else:
            x, y, w = student.preprocessor(TEXTS)
            args = (x, y)
            kwargs = {"sample_weight": w}
        kwargs = {} if cross else kwargs
        before = model.evaluate(
            *args, batch_size=len(TEXTS), return_dict=True, verbose=0, **kwargs
        )
        model.fit(
            *args,
            batch_size=len(TEXTS),
            epochs=1,
            shuffle=False,
            verbose=0,
            **kwargs,
        )
        weights = [
            keras.ops.convert_to_numpy(w) for w in student.trainable_weights
        ]
        results.append((before, weights))
    (cross_logs, cross_w), (jsd_logs, jsd_w) = results
    for key in ("loss", "student_loss", "distillation_loss"):
        np.testing.assert_allclose(
            cross_logs[key], jsd_logs[key], rtol=1e-5, atol=1e-7
        )
    for a, b in zip(cross_w, jsd_w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alignment", ["bytes", "positional"])
def test_fit_on_raw_text_trains_a_character_student(alignment):
    student, teacher = char_student(), bpe_teacher()
    model = compiled(
        student,
        teacher,
        losses.UniversalLogitDistance(),
        optimizer=keras.optimizers.Adam(1e-2),
        alignment=alignment,
    )
    before = [keras.ops.convert_to_numpy(w) for w in student.trainable_weights]
    logs = model.fit(
        TEXTS, validation_data=TEXTS[:2], epochs=3, batch_size=3, verbose=0
    ).history
    assert {"loss", "student_loss", "distillation_loss", "val_loss"} <= set(
        logs
    )
    assert all(np.isfinite(v).all() for v in logs.values())
    assert logs["student_loss"][-1] < logs["student_loss"][0]
    after = [keras.ops.convert_to_numpy(w) for w in student.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    assert model.get_config()["alignment"] == alignment
    # The raw text went through align_tokens with both preprocessors.
    x = aligned(student, teacher, alignment=alignment)
    direct = model.evaluate(x, batch_size=3, return_dict=True, verbose=0)
    text = model.evaluate(TEXTS, batch_size=3, return_dict=True, verbose=0)
    np.testing.assert_allclose(direct["loss"], text["loss"], rtol=1e-6)


def test_prompt_and_response_pairs_train_on_the_responses_only():
    student, teacher = char_student(), bpe_teacher()
    pairs = {"prompts": ["the cat", "a dog"], "responses": [" sat", " ran"]}
    x = aligned(student, teacher, pairs)
    assert x["response_mask"].sum(axis=1).tolist() == [5, 5]  # 4 + end
    model = compiled(student, teacher, losses.HybridLogitDistance())
    logs = model.evaluate(pairs, return_dict=True, verbose=0)
    assert np.isfinite(logs["loss"])
    with pytest.raises(ValueError, match="responses"):
        model.fit({"prompts": ["the cat"]}, verbose=0)


def test_errors_name_the_argument():
    student, teacher = char_student(), bpe_teacher()
    sizes = (student.backbone.vocabulary_size, teacher.backbone.vocabulary_size)
    with pytest.raises(ValueError, match=f"{sizes[0]}.*{sizes[1]}"):
        compiled(student, teacher, losses.KLDivergence())
    with pytest.raises(ValueError, match="UniversalLogitDistance"):
        compiled(student, teacher, losses.JensenShannonDivergence())
    bare = gpt2(tokenizer(), 2, 32, 0, with_preprocessor=False)
    with pytest.raises(ValueError, match="teacher"):
        compiled(student, bare, losses.UniversalLogitDistance())
    with pytest.raises(ValueError, match="alignment"):
        keras_kd.CausalLMDistiller(student, teacher, alignment="chars")
    model = compiled(student, teacher, losses.UniversalLogitDistance())
    x = aligned(student, teacher)
    with pytest.raises(ValueError, match="sample_weight"):
        model.fit(TEXTS, sample_weight=np.ones(len(TEXTS)), verbose=0)
    same = gpt2(tokenizer(), 1, 16, 1)
    kl = compiled(same, teacher, losses.KLDivergence())
    with pytest.raises(ValueError, match="HybridLogitDistance"):
        kl.evaluate(aligned(same, teacher), verbose=0)
    missing = {k: v for k, v in x.items() if k != "group_mask"}
    with pytest.raises(ValueError, match="group_mask"):
        model.evaluate(missing, verbose=0)


def test_match_vocabularies_pairs_tokens_of_the_same_text():
    char, bpe = tokenizer(merges=False), tokenizer()
    student_ids, teacher_ids = keras_kd.match_vocabularies(char, bpe)
    assert len(student_ids) == char.vocabulary_size()  # all in the BPE's
    for s, t in zip(student_ids, teacher_ids):
        assert char.id_to_token(int(s)) == bpe.id_to_token(int(t))
    again = keras_kd.match_vocabularies(
        char_student().preprocessor, bpe_teacher().preprocessor
    )
    np.testing.assert_array_equal(again[1], teacher_ids)
    reverse = keras_kd.match_vocabularies(bpe, char)
    assert len(reverse[0]) == len(student_ids)
    with pytest.raises(ValueError, match="teacher_tokenizer"):
        keras_kd.match_vocabularies(char, "not a tokenizer")


# ------------------------------------------------ on-policy across tokenizers

PAIRS = {
    "prompts": ["the cat", "a dog", "the dog", "cats and"],
    "responses": [" sat", " ran", " sat on", " dogs"],
}


def on_policy(fraction, alpha=0.4, optimizer=None, **kwargs):
    student, teacher = char_student(), bpe_teacher()
    model = keras_kd.CausalLMDistiller(student, teacher, seed=0)
    model.compile(
        optimizer or keras.optimizers.SGD(0.0),
        distillation_loss=losses.HybridLogitDistance(),
        alpha=alpha,
        on_policy_fraction=fraction,
        sampler="greedy",
        max_new_tokens=3,
        **kwargs,
    )
    return model


def test_on_policy_rows_are_the_students_own_text_aligned_again():
    from keras_kd.lm._cross_generation import EpochResponses

    model = on_policy(1.0)
    data = EpochResponses(model, PAIRS, 2, False, "x")
    student = model.student
    student.compile(sampler="greedy")
    tokenizer = student.preprocessor.tokenizer
    end = tokenizer.end_token_id
    for row, prompt in enumerate(PAIRS["prompts"]):
        prompt_tokens = len(tokenizer(prompt)) + 1  # and the start token
        text = student.generate(prompt, max_length=prompt_tokens + 3)
        ids = data.arrays["token_ids"][row][data.arrays["response_mask"][row]]
        ids = ids[ids != end]
        written = keras.ops.convert_to_numpy(tokenizer.detokenize(ids))
        written = written.item() if hasattr(written, "item") else written
        written = written.decode() if isinstance(written, bytes) else written
        assert text == prompt + written and written
    assert data.arrays["student_written"].tolist() == [1.0] * 4
    assert (data.arrays["group_mask"].sum(axis=1) > 0).all()


def test_on_policy_fraction_picks_rows_per_epoch_and_refreshes_them(
    monkeypatch,
):
    from keras_kd.lm import _cross_generation

    seen = []
    refresh = _cross_generation.EpochResponses.refresh

    def recorded(self, epoch):
        refresh(self, epoch)
        seen.append((epoch, self.arrays["student_written"].copy()))

    monkeypatch.setattr(_cross_generation.EpochResponses, "refresh", recorded)
    model = on_policy(0.5, optimizer=keras.optimizers.Adam(1e-2))
    logs = model.fit(PAIRS, epochs=3, batch_size=2, verbose=0).history
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    written = np.stack([w for _, w in seen])
    assert 0 < written.mean() < 1  # some rows of some epochs, not all
    expected = written.sum(axis=1) > 0
    assert [g > 0 for g in logs["generated_length"]] == expected.tolist()
    assert all(np.isfinite(v).all() for v in logs.values())


def test_no_cross_entropy_is_trained_on_the_students_own_samples():
    model = on_policy(1.0, alpha=1.0, optimizer=keras.optimizers.SGD(1.0))
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    logs = model.fit(PAIRS, epochs=1, batch_size=4, verbose=0).history
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert logs["loss"] == [0.0] and logs["student_loss"][0] > 0
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_on_policy_across_tokenizers_errors():
    with pytest.raises(ValueError, match="sequence_kd"):
        on_policy(0.0, sequence_kd=True)
    model = on_policy(0.5)
    x = aligned(model.student, model.teacher, PAIRS)
    with pytest.raises(ValueError, match="raw text"):
        model.fit(x, verbose=0)


def test_a_saved_cross_tokenizer_distiller_reloads_and_scores_alike(
    tmp_path,
):
    student, teacher = char_student(), bpe_teacher()
    model = compiled(
        student,
        teacher,
        losses.HybridLogitDistance(beta=0.3),
        alignment="positional",
    )
    path = str(tmp_path / "cross.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.alignment == "positional"
    assert isinstance(loaded.distillation_loss, losses.HybridLogitDistance)
    expected = model.evaluate(TEXTS, return_dict=True, verbose=0)
    got = loaded.evaluate(TEXTS, return_dict=True, verbose=0)
    for key in ("loss", "student_loss", "distillation_loss"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)


def test_a_saved_same_tokenizer_distiller_with_preprocessors_reloads(
    tmp_path,
):
    # The vocabulary check of an exact divergence runs at `compile`, which
    # a reload calls before the tokenizers get their vocabularies.
    student = gpt2(tokenizer(), 1, 16, 1)
    model = compiled(student, bpe_teacher(), losses.KLDivergence())
    path = str(tmp_path / "same.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    expected = model.evaluate(TEXTS, return_dict=True, verbose=0)
    got = loaded.evaluate(TEXTS, return_dict=True, verbose=0)
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
