"""On-policy and sequence-level distillation: responses generated inside
the training step by the student or the teacher (small keras-hub Llama
models built from their constructors)."""

import keras
import numpy as np
import pytest
from test_causal_lm import VOCAB, dense_reference, llama, run_on_eight_devices

import keras_kd
from keras_kd import losses

keras_hub = pytest.importorskip("keras_hub")

LENGTH = 10


def prompts(n=4, seed=0):
    """Rows of 2 to 4 prompt tokens, padded to LENGTH; ids 1..VOCAB-1."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, LENGTH), "int32")
    mask = np.zeros((n, LENGTH), "int32")
    for i in range(n):
        size = 2 + i % 3
        tokens[i, :size] = rng.integers(1, VOCAB, size)
        mask[i, :size] = 1
    return {"token_ids": tokens, "padding_mask": mask}


def models(seed=0, tie=True, padded=True):
    keras.utils.set_random_seed(seed)
    teacher = llama(2, 16, vocab=VOCAB + (8 if padded else 0), tie=False)
    # keras-hub 0.32's LlamaBackbone config forgets tie_word_embeddings
    # (a tied model reloads untied), so saved models are untied.
    student = llama(1, 8, tie=tie)
    return student, teacher


def distiller(student, teacher, seed=5, lr=0.0, alpha=0.0, **options):
    options.setdefault("stop_token_ids", None)
    d = keras_kd.CausalLMDistiller(student, teacher, seed=seed)
    d.compile(
        keras.optimizers.SGD(lr),
        distillation_loss=losses.ReverseKLDivergence(temperature=1.5),
        alpha=alpha,
        **options,
    )
    return d


def fit_once(d, x, y=None, w=None):
    return d.fit(
        x,
        y,
        sample_weight=w,
        batch_size=len(x["token_ids"]),
        shuffle=False,
        verbose=0,
    ).history


def keras_hub_generate(model, x, stop_token_ids=None):
    model.compile(sampler="greedy")
    out = model.generate(
        {k: keras.ops.convert_to_tensor(v) for k, v in x.items()},
        stop_token_ids=stop_token_ids,
    )
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_greedy_generation_equals_keras_hub_generate(source):
    # keras-hub would sample a padded teacher's extra ids: none here.
    student, teacher = models(padded=False)
    d = distiller(student, teacher, sampler="greedy")
    x = prompts()
    got, labels, w = d.generate_responses(x, source=source)
    model = student if source == "student" else teacher
    expected = keras_hub_generate(model, x)
    np.testing.assert_array_equal(got["token_ids"], expected["token_ids"])
    # Every position after the prompt is generated (no stop token) and
    # weighted through its label; the prompt is not.
    prompt = x["padding_mask"].astype(bool)
    np.testing.assert_array_equal(got["padding_mask"], np.ones_like(prompt))
    np.testing.assert_array_equal(labels[:, :-1], got["token_ids"][:, 1:])
    expected_w = np.zeros_like(w)
    expected_w[:, :-1] = ~prompt[:, 1:]
    np.testing.assert_array_equal(w, expected_w)


def test_padded_teacher_ids_are_never_sampled():
    student, teacher = models()
    kernel = teacher.backbone.token_embedding.reverse_embeddings
    # The padded columns would win every argmax.
    value = keras.ops.convert_to_numpy(kernel).copy()
    value[:, VOCAB:] = 50.0
    kernel.assign(value)
    d = distiller(student, teacher, sampler="greedy", sequence_kd=True)
    got, _, _ = d.generate_responses(prompts(), source="teacher")
    assert got["token_ids"].max() < VOCAB


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_on_policy_loss_and_step_equal_the_reference_on_its_responses(alpha):
    student, teacher = models()
    twin = llama(1, 8)
    twin.set_weights(student.get_weights())
    d = distiller(
        student,
        teacher,
        lr=0.5,
        alpha=alpha,
        on_policy_fraction=1.0,
        sampler="greedy",
    )
    x = prompts()
    batch, labels, w = d.generate_responses(x)
    total, ce, kd = dense_reference(
        student, teacher, batch, labels, w, "reverse_kl", 1.5, alpha
    )
    logs = fit_once(d, x)
    # The cross-entropy never applies to the student's own samples.
    np.testing.assert_allclose(logs["loss"][0], (1 - alpha) * kd, rtol=2e-4)
    np.testing.assert_allclose(logs["distillation_loss"][0], kd, rtol=2e-4)
    np.testing.assert_allclose(logs["student_loss"][0], ce, rtol=1e-5)
    generated = (w > 0).sum(axis=1).mean()
    np.testing.assert_allclose(logs["generated_length"][0], generated)
    # One step: the off-policy distiller on the same completed batch, its
    # cross-entropy dropped, its loss scaled by (1 - alpha) through lr.
    off = distiller(twin, teacher, lr=0.5 * (1 - alpha), alpha=0.0)
    fit_once(off, batch, labels, w)
    for a, b in zip(student.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_each_step_generates_with_that_steps_weights():
    # Under JAX `fit` the weights live in the step's state between steps:
    # the second step must generate with the weights the first step made.
    x = prompts()
    student, teacher = models()
    twin = llama(1, 8)
    twin.set_weights(student.get_weights())
    options = dict(lr=2.0, on_policy_fraction=1.0, sampler="greedy")
    both = distiller(student, teacher, **options)
    x2 = {k: np.concatenate([v, v]) for k, v in x.items()}
    logs = both.fit(x2, batch_size=4, shuffle=False, verbose=0).history
    one = distiller(twin, teacher, **options)
    expected = []
    for _ in range(2):
        batch, labels, w = one.generate_responses(x)
        _, _, kd = dense_reference(
            twin, teacher, batch, labels, w, "reverse_kl", 1.5, 0.0
        )
        expected.append(kd)
        fit_once(one, x)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)
    np.testing.assert_allclose(logs["loss"][0], np.mean(expected), rtol=2e-4)


def test_sequence_kd_trains_on_the_teachers_greedy_generation():
    student, teacher = models(padded=False)
    d = distiller(
        student, teacher, alpha=0.3, sequence_kd=True, sampler="greedy"
    )
    x = prompts()
    expected = keras_hub_generate(teacher, x)
    batch, labels, w = d.generate_responses(x, source="teacher")
    np.testing.assert_array_equal(batch["token_ids"], expected["token_ids"])
    total, ce, kd = dense_reference(
        student, teacher, batch, labels, w, "reverse_kl", 1.5, 0.3
    )
    logs = fit_once(d, x)
    # The teacher's responses keep the cross-entropy term.
    np.testing.assert_allclose(logs["loss"][0], total, rtol=2e-4)
    np.testing.assert_allclose(logs["student_loss"][0], ce, rtol=1e-5)


def test_nothing_after_the_stop_token_is_trained():
    student, teacher = models()
    x = prompts()
    greedy = distiller(student, teacher, sampler="greedy")
    starts = x["padding_mask"].sum(axis=1)
    first, _, _ = greedy.generate_responses(x)
    stop = int(first["token_ids"][0, starts[0] + 1])
    # The stop token inside a prompt stops nothing.
    x["token_ids"][1, 0] = stop
    free, _, free_w = greedy.generate_responses(x)
    d = distiller(student, teacher, sampler="greedy", stop_token_ids=[stop])
    got, _, w = d.generate_responses(x)
    for row in range(len(w)):
        generated = free["token_ids"][row, starts[row] :]
        hits = np.flatnonzero(generated == stop)
        end = starts[row] + (hits[0] + 1 if hits.size else len(generated))
        expected = np.zeros(LENGTH, bool)
        expected[starts[row] : end] = True
        np.testing.assert_array_equal(w[row, :-1] > 0, expected[1:], str(row))
        np.testing.assert_array_equal(
            got["token_ids"][row, :end], free["token_ids"][row, :end]
        )
        assert not got["padding_mask"][row, end:].any()
    assert w[0].sum() <= 2 < free_w[0].sum()
    assert w[1].sum() > 0


def test_max_new_tokens_bounds_each_row():
    student, teacher = models()
    d = distiller(student, teacher, sampler="greedy", max_new_tokens=2)
    x = prompts()
    got, _, w = d.generate_responses(x)
    np.testing.assert_array_equal(w.sum(axis=1), 2.0)
    np.testing.assert_array_equal(
        got["padding_mask"].sum(axis=1), x["padding_mask"].sum(axis=1) + 2
    )


def test_prompts_end_at_the_first_weighted_label():
    student, teacher = models()
    d = distiller(student, teacher, sampler="greedy")
    x = prompts()
    x["padding_mask"][:] = 1  # a dataset response fills every row
    w = np.zeros((4, LENGTH), "float32")
    w[0, 3:] = 1.0  # prompt token_ids[:4]
    w[1, 1:] = 1.0  # prompt token_ids[:2]
    # rows 2 and 3 have no weighted label: all prompt, nothing to fill
    got, _, got_w = d.generate_responses(x, sample_weight=w)
    np.testing.assert_array_equal(
        got_w.sum(axis=1), [LENGTH - 4, LENGTH - 2, 0, 0]
    )
    np.testing.assert_array_equal(
        got["token_ids"][0, :4], x["token_ids"][0, :4]
    )
    np.testing.assert_array_equal(got["token_ids"][2], x["token_ids"][2])


def test_fraction_zero_is_todays_step_bit_for_bit():
    student, teacher = models()
    twin = llama(1, 8)
    twin.set_weights(student.get_weights())
    x = prompts()
    y = np.roll(x["token_ids"], -1, axis=1)
    w = x["padding_mask"].astype("float32")
    today = keras_kd.CausalLMDistiller(twin, teacher)
    today.compile(
        keras.optimizers.SGD(0.5),
        distillation_loss=losses.ReverseKLDivergence(temperature=1.5),
        alpha=0.3,
    )
    logs = fit_once(today, x, y, w)
    d = distiller(
        student,
        teacher,
        lr=0.5,
        alpha=0.3,
        on_policy_fraction=0.0,
        sequence_kd=False,
        sampler="top_p",
    )
    got = fit_once(d, x, y, w)
    assert "generated_length" not in got
    assert got == logs
    for a, b in zip(student.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_half_of_the_steps_are_on_policy_and_evaluate_scores_the_dataset():
    student, teacher = models()
    x = prompts(n=2)
    y = np.roll(x["token_ids"], -1, axis=1)
    w = x["padding_mask"].astype("float32")
    w[:, 0] = 0.0  # each row's prompt is its first two tokens
    d = distiller(student, teacher, on_policy_fraction=0.5, sampler="random")
    logs = d.fit(x, y, sample_weight=w, epochs=40, batch_size=2, verbose=0)
    lengths = np.array(logs.history["generated_length"])
    on = lengths > 0
    assert 12 <= on.sum() <= 28, lengths
    # Every on-policy step fills the rows after their 2-token prompts.
    np.testing.assert_allclose(lengths[on], LENGTH - 2)
    # The dataset steps keep the cross-entropy; evaluate never generates.
    plain = keras_kd.CausalLMDistiller(student, teacher)
    plain.compile(
        distillation_loss=losses.ReverseKLDivergence(temperature=1.5),
        alpha=0.0,
    )
    got = d.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
    expected = plain.evaluate(
        x, y, sample_weight=w, verbose=0, return_dict=True
    )
    assert got.pop("generated_length") == 0.0
    assert got == pytest.approx(expected)


def test_same_seed_same_history_and_steps_draw_new_samples():
    def run():
        student, teacher = models()
        d = distiller(
            student, teacher, lr=0.3, on_policy_fraction=1.0, sampler="top_k"
        )
        logs = d.fit(prompts(), epochs=3, batch_size=4, verbose=0).history
        return d, logs

    d, first = run()
    _, second = run()
    assert first == second
    a, _, _ = d.generate_responses(prompts())
    b, _, _ = d.generate_responses(prompts())
    assert not np.array_equal(a["token_ids"], b["token_ids"])


def test_saved_weights_resume_the_sampling_stream(tmp_path):
    student, teacher = models()
    d = distiller(student, teacher, on_policy_fraction=1.0)
    d.fit(prompts(), epochs=2, batch_size=2, verbose=0)
    path = str(tmp_path / "distiller.weights.h5")
    d.save_weights(path)
    expected, _, _ = d.generate_responses(prompts())
    student2, teacher2 = models(seed=1)
    other = distiller(student2, teacher2, seed=123, on_policy_fraction=1.0)
    other.load_weights(path)
    got, _, _ = other.generate_responses(prompts())
    np.testing.assert_array_equal(got["token_ids"], expected["token_ids"])


def test_saved_model_keeps_the_generation_settings(tmp_path):
    student, teacher = models(tie=False)
    sampler = keras_hub.samplers.TopKSampler(k=3, temperature=0.7)
    d = distiller(
        student,
        teacher,
        on_policy_fraction=0.25,
        sequence_kd=True,
        sampler=sampler,
        max_new_tokens=3,
        stop_token_ids=[7],
    )
    path = str(tmp_path / "distiller.keras")
    d.save(path)
    expected, _, _ = d.generate_responses(prompts())
    loaded = keras.saving.load_model(path)
    config = loaded.get_compile_config()
    assert config["on_policy_fraction"] == 0.25
    assert config["sequence_kd"] is True
    assert config["max_new_tokens"] == 3
    assert list(config["stop_token_ids"]) == [7]
    got, _, _ = loaded.generate_responses(prompts())
    np.testing.assert_array_equal(got["token_ids"], expected["token_ids"])
    # A reloaded distiller saves again (its sampler came as a config).
    loaded.save(str(tmp_path / "again.keras"))
    again = keras.saving.load_model(str(tmp_path / "again.keras"))
    assert again.get_compile_config()["sampler"] == config["sampler"]


def test_generation_records_no_gradient():
    seen = []

    class Recording(keras_hub.samplers.GreedySampler):
        def get_next_token(self, probabilities):
            grad = False
            if keras.backend.backend() == "torch":
                import torch

                grad = torch.is_grad_enabled()
            seen.append(grad)
            return super().get_next_token(probabilities)

    student, teacher = models()
    d = distiller(
        student, teacher, lr=0.1, on_policy_fraction=1.0, sampler=Recording()
    )
    fit_once(d, prompts())
    assert seen and not any(seen)  # it sampled, and without autograd


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution on JAX"
)
def test_data_and_model_parallel_draw_and_train_as_one_device():
    run_on_eight_devices("_on_policy_distributed.py")


def test_errors_name_the_argument():
    student, teacher = models()

    def compile_with(**options):
        return distiller(student, teacher, **options)

    cases = [
        (dict(on_policy_fraction=1.5), "on_policy_fraction"),
        (dict(on_policy_fraction=-0.1), "on_policy_fraction"),
        (dict(sampler="nucleus"), "sampler"),
        (dict(sampler=3), "sampler"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(sequence_kd=True, on_policy_fraction=1.0), "sequence_kd"),
        (dict(sequence_kd="yes"), "sequence_kd"),
        (dict(on_policy_fraction=0.5, stop_token_ids="auto"), "stop_token_ids"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ]
    for options, name in cases:
        with pytest.raises(ValueError, match=name):
            compile_with(**options)
    offline = keras_kd.CausalLMDistiller(student)
    for options, name in [
        (dict(on_policy_fraction=0.5), "on_policy_fraction"),
        (dict(sequence_kd=True), "sequence_kd"),
    ]:
        with pytest.raises(ValueError, match=f"{name}.*teacher"):
            offline.compile("sgd", stop_token_ids=None, **options)
    d = distiller(student, teacher, on_policy_fraction=0.5)
    with pytest.raises(
        ValueError, match="on_policy_fraction.*without responses"
    ):
        d.fit(prompts(), verbose=0)
    with pytest.raises(ValueError, match="source"):
        d.generate_responses(prompts(), source="dataset")
    full = prompts()
    full["padding_mask"][0] = 1
    with pytest.raises(ValueError, match="room"):
        d.fit(full, np.zeros_like(full["token_ids"]), verbose=0)


def test_example_runs_and_reports_its_figures(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parents[2] / "examples"
    monkeypatch.setattr(sys, "path", [str(folder), *sys.path])
    path = folder / "on_policy_distill.py"
    spec = importlib.util.spec_from_file_location("on_policy_distill", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(
        ["--epochs", "1", "--length", "16", "--prompt", "6", "--samples", "16"]
    )
    assert set(results) == {"scratch", "off-policy", "on-policy"}
    for figures in results.values():
        # A character model beats guessing among ~90 symbols; the teacher
        # gives each written character some likelihood.
        assert 1.0 < figures["perplexity"] < 60.0
        assert 0.0 < figures["teacher_nll_greedy"] < np.log(200)
        assert 0.0 < figures["teacher_nll_sampled"] < np.log(200)
