"""Run by tests/lm/test_causal_lm.py in a subprocess with 8 virtual CPU
devices: CausalLMDistiller under DataParallel and ModelParallel (teacher
and student sharded by keras-hub's layout map) matches one device.
`matches_one_device` is shared with the on-policy run."""

import jax
import keras
import keras_hub
import numpy as np

import keras_kd

assert len(jax.devices()) == 8, jax.devices()


def build(seed):
    """A teacher and a student (untied Llamas whose heads shard 4 ways)."""
    keras.utils.set_random_seed(seed)

    def llama(layers, hidden):
        b = keras_hub.models.LlamaBackbone(
            vocabulary_size=40,
            num_layers=layers,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=hidden,
            intermediate_dim=2 * hidden,
            tie_word_embeddings=False,
        )
        return keras_hub.models.LlamaCausalLM(backbone=b, preprocessor=None)

    return llama(2, 32), llama(1, 16)


def trained(fit, start=None):
    """`fit(distiller_factory)` from the same starting weights: returns
    `(student weights, history, start, student)`."""
    teacher, student = build(0)
    if start is not None:
        teacher.set_weights(start[0])
        student.set_weights(start[1])
    start = (
        [np.array(w) for w in teacher.get_weights()],
        [np.array(w) for w in student.get_weights()],
    )
    history = fit(student, teacher)
    return [np.array(v) for v in student.get_weights()], history, start, student


def matches_one_device(fit, same_logs=("loss",)):
    """Trains with `fit` on one device, then under DataParallel and under
    ModelParallel from the same weights; asserts they all agree."""
    single, logs, start, _ = trained(fit)
    devices = jax.devices()
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    dp, dp_logs, _, _ = trained(fit, start)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout, batch_dim_name="batch"
        )
    )
    mp, mp_logs, _, mp_student = trained(fit, start)
    keras.distribution.set_distribution(None)
    embeddings = mp_student.backbone.token_embedding.embeddings.value
    assert not embeddings.sharding.is_fully_replicated, embeddings.sharding
    for weights, other_logs in ((dp, dp_logs), (mp, mp_logs)):
        diff = max(float(np.abs(a - b).max()) for a, b in zip(single, weights))
        assert diff < 1e-5, diff
        for key in same_logs:
            np.testing.assert_allclose(other_logs[key], logs[key], rtol=1e-5)
    print("matches one device")
    return logs


def _fit(student, teacher):
    from test_causal_lm import batch

    d = keras_kd.CausalLMDistiller(student, teacher, chunk_size=8)
    d.compile(
        keras.optimizers.SGD(0.5),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=2.0),
        alpha=0.5,
    )
    x, y, w = batch(n=16)
    return d.fit(
        x, y, sample_weight=w, batch_size=8, epochs=2, shuffle=False, verbose=0
    ).history


if __name__ == "__main__":
    matches_one_device(_fit)
