"""Run by tests/lm/test_on_policy.py in a subprocess with 8 virtual CPU
devices: on-policy distillation with random sampling under DataParallel
and ModelParallel (the models sharded by keras-hub's layout map) draws
the same samples and takes the same steps as one device."""

import keras
import numpy as np
from _causal_lm_distributed import matches_one_device
from test_on_policy import prompts

import keras_kd


def fit(student, teacher):
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
    return d.fit(
        x, y, sample_weight=w, batch_size=8, epochs=3, shuffle=False, verbose=0
    ).history


logs = matches_one_device(fit, same_logs=("loss", "generated_length"))
assert np.count_nonzero(logs["generated_length"]) > 0, logs
