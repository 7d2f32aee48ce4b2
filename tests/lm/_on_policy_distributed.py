"""Run by tests/lm/test_on_policy.py in a subprocess with 8 virtual CPU
devices: on-policy distillation with random sampling under DataParallel
and ModelParallel (the student sharded by keras-hub's layout map) draws
the same samples and takes the same steps as one device."""

import jax
import keras
import keras_hub
import numpy as np
from test_on_policy import prompts

import keras_kd

assert len(jax.devices()) == 8, jax.devices()


def llama(layers, hidden):
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=40,
        num_layers=layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        tie_word_embeddings=False,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def train(start=None):
    keras.utils.set_random_seed(0)
    teacher, student = llama(2, 32), llama(1, 16)
    if start is not None:
        teacher.set_weights(start[0])
        student.set_weights(start[1])
    start = (
        [np.array(w) for w in teacher.get_weights()],
        [np.array(w) for w in student.get_weights()],
    )
    d = keras_kd.CausalLMDistiller(student, teacher, seed=11)
    d.compile(
        keras.optimizers.SGD(0.5),
        distillation_loss=keras_kd.losses.ReverseKLDivergence(),
        alpha=0.5,
        on_policy_fraction=0.5,
        sampler="random",
        stop_token_ids=[3],
    )
    x = prompts(n=16)
    y = np.roll(x["token_ids"], -1, axis=1)
    w = x["padding_mask"].astype("float32")
    w[:, 0] = 0.0
    h = d.fit(
        x, y, sample_weight=w, batch_size=8, epochs=3, shuffle=False, verbose=0
    ).history
    return [np.array(v) for v in student.get_weights()], h, start, student


single, logs, start, _ = train()
assert np.count_nonzero(logs["generated_length"]) > 0, logs
devices = jax.devices()
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=devices)
)
dp, dp_logs, _, _ = train(start)
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
layout = keras_hub.models.LlamaBackbone.get_layout_map(mesh)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")
)
mp, mp_logs, _, mp_student = train(start)
embeddings = mp_student.backbone.token_embedding.embeddings.value
assert not embeddings.sharding.is_fully_replicated, embeddings.sharding
for trained, trained_logs in ((dp, dp_logs), (mp, mp_logs)):
    np.testing.assert_array_equal(
        trained_logs["generated_length"], logs["generated_length"]
    )
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single, trained))
    assert diff < 1e-5, diff
    np.testing.assert_allclose(trained_logs["loss"], logs["loss"], rtol=1e-5)
print("matches one device")
