"""Divergences and losses as pure functions over `keras.ops`.

Every function here returns the *unreduced* value: the reduction axis (the
class axis, or the label grid of a GlobalPointer head) is summed away and
every other axis is kept, so `[batch, classes]` gives `[batch]` and
`[batch, length, vocab]` gives one value per token. Reduction, sample weights
and masks are the job of `keras.losses.Loss.__call__` (see
`keras_kd.losses`), or of the caller in a custom training loop.

Conventions shared by all functions:

- `y_true` is the target (the teacher), `y_pred` the prediction (the
  student). Inputs are logits by default (`from_logits=True`); with
  `from_logits=False` they are probabilities, which are turned into
  log-probabilities once and then treated exactly like logits.
- Everything is computed in log space from logits by one log-softmax
  engine, with the row maximum subtracted before the temperature divides
  and without overflow for any finite logits (up to the float32 maximum).
  Nothing is clipped.
- Two paths, chosen by `precise=None | True | False` on every divergence
  and its Loss class (`None`: the fast path, since the precise path's
  extra passes over the logits were measurable on every backend and
  device tried, an H200 included; BENCHMARKS.md, "KL on logits (CPU)"). Both
  are never negative and take the closed-form gradient
  (`keras.ops.custom_gradient`; second order: `_gradients.py`).
- Accuracy of the fast path, checked against float64 by the test suite:
  the absolute error of a divergence is at most
  `1e-5 * T**2 * (1 + E|log P| + E|log Q|)`, the expectations
  taken under the distribution(s) that weight it (no `T**2` for entropy
  and cross-entropy): float32 rounding of log-probabilities of that size.
  That is a relative 1e-5 for a divergence of the order of the
  log-probabilities (a confidently wrong student), not for a tiny one: a
  student within 1e-3 of its teacher (KL about 1e-7) or `T = 1000` can be
  off by a relative 0.1 to 10.
- Accuracy of the precise path, checked the same way: a relative 1e-5 of
  the exact value wherever the student is near its teacher (KL down to
  1e-10 `T**2`, also for a student shifted by a constant, and at
  `T = 1000`), from `u = log P - log Q` exact to the
  rounding of `t - s` (`_log_ratio.py`); rows far from the teacher
  (`_log_ratio.py` says which) have the fast path's bound.
- A log-probability below the dtype's lowest value (about -3.4e38 in
  float32, reachable only with logits of opposite sign beyond 1.7e38) is
  taken at that value: a divergence that reads it with weight `w` comes out
  at least `w * 3.4e38` (possibly up to twice too small) or `+inf`.
- Entries equal to `-inf` (masked logits, or zero probabilities) carry no
  mass: they contribute exactly 0 and give finite gradients, and a row whose
  entries are all `-inf` contributes 0. Where the target has mass and the
  prediction has none the KL is infinite in the math; it comes out as `+inf`
  or as a huge finite value (that mass times about 3.4e38 in float32).
- NaN anywhere in a row of an input gives NaN for that row (as Keras' own
  losses and torch's `F.kl_div` do). A label outside the class range
  (decoupled KD, sparse multi-label labels) gives NaN for its row.
- An empty batch (zero rows) gives an empty result.
- `temperature` divides the logits and multiplies the divergence by
  `temperature**2` (Hinton et al., 2015), so gradient magnitudes do not
  shrink as the temperature grows.
- float64 inputs are computed and returned in float64 (on JAX with
  `jax_enable_x64`); float16 and bfloat16 inputs are computed in float32.
  On torch and JAX, `kl_divergence`, `symmetric_kl_divergence` and
  `jensen_shannon_divergence` of half-precision logits larger than one
  block (8 MiB of float32 on a CPU, 128 MiB on a GPU) cast a block of rows
  at a time, never the whole array; the gradient comes back in the
  logits' dtype, rounded once.
- On the torch backend the fused chunk bodies run through `torch.compile`
  on a CUDA device (`set_torch_compile(True | False | "auto")`; eager
  where compiling fails).
"""

from keras_kd.ops._core import log_probabilities as log_probabilities
from keras_kd.ops._distillation import (
    sparse_crossentropy_and_kl_divergence as sparse_crossentropy_and_kl_divergence,  # noqa: E501
)
from keras_kd.ops._divergences import cross_entropy as cross_entropy
from keras_kd.ops._divergences import entropy as entropy
from keras_kd.ops._divergences import (
    jensen_shannon_divergence as jensen_shannon_divergence,
)
from keras_kd.ops._divergences import kl_divergence as kl_divergence
from keras_kd.ops._divergences import (
    paired_symmetric_kl_divergence as paired_symmetric_kl_divergence,
)
from keras_kd.ops._divergences import (
    symmetric_kl_divergence as symmetric_kl_divergence,
)
from keras_kd.ops._dkd import decoupled_kd as decoupled_kd
from keras_kd.ops._dkd import non_target_class_kd as non_target_class_kd
from keras_kd.ops._dkd import target_class_kd as target_class_kd
from keras_kd.ops._features import attention_map as attention_map
from keras_kd.ops._features import attention_transfer as attention_transfer
from keras_kd.ops._features import (
    feature_cosine_distance as feature_cosine_distance,
)
from keras_kd.ops._features import (
    feature_mean_squared_error as feature_mean_squared_error,
)
from keras_kd.ops._fused_cross_vocab import (
    fused_linear_logit_distance as fused_linear_logit_distance,
)
from keras_kd.ops._fused_cross_vocab import (
    fused_linear_token_log_probs as fused_linear_token_log_probs,
)
from keras_kd.ops._fused_linear import (
    fused_linear_cross_entropy as fused_linear_cross_entropy,
)
from keras_kd.ops._fused_linear import (
    fused_linear_distillation_loss as fused_linear_distillation_loss,
)
from keras_kd.ops._fused_linear import (
    fused_linear_divergence as fused_linear_divergence,
)
from keras_kd.ops._fused_top_k import (
    fused_linear_top_k as fused_linear_top_k,
)
from keras_kd.ops._fused_top_k import (
    fused_linear_top_k_distillation_loss as fused_linear_top_k_distillation_loss,  # noqa: E501
)
from keras_kd.ops._fused_top_k import (
    fused_linear_top_k_divergence as fused_linear_top_k_divergence,
)
from keras_kd.ops._global_pointer import (
    binary_symmetric_kl_divergence as binary_symmetric_kl_divergence,
)
from keras_kd.ops._global_pointer import (
    global_pointer_kl_divergence as global_pointer_kl_divergence,
)
from keras_kd.ops._multilabel import (
    multilabel_categorical_crossentropy as multilabel_categorical_crossentropy,
)
from keras_kd.ops._multilabel import (
    sparse_multilabel_categorical_crossentropy as sparse_multilabel_categorical_crossentropy,  # noqa: E501
)
from keras_kd.ops._multilabel import (
    sparse_multilabel_mask as sparse_multilabel_mask,
)
from keras_kd.ops._sorted_distance import (
    hybrid_logit_distance as hybrid_logit_distance,
)
from keras_kd.ops._sorted_distance import (
    universal_logit_distance as universal_logit_distance,
)
from keras_kd.ops._torch_compile import (
    set_torch_compile as set_torch_compile,
)
from keras_kd.ops._torch_compile import (
    torch_compile_enabled as torch_compile_enabled,
)

__all__ = [
    "attention_map",
    "attention_transfer",
    "binary_symmetric_kl_divergence",
    "cross_entropy",
    "decoupled_kd",
    "entropy",
    "feature_cosine_distance",
    "feature_mean_squared_error",
    "fused_linear_cross_entropy",
    "fused_linear_distillation_loss",
    "fused_linear_divergence",
    "fused_linear_logit_distance",
    "fused_linear_token_log_probs",
    "fused_linear_top_k",
    "fused_linear_top_k_distillation_loss",
    "fused_linear_top_k_divergence",
    "global_pointer_kl_divergence",
    "hybrid_logit_distance",
    "jensen_shannon_divergence",
    "kl_divergence",
    "log_probabilities",
    "multilabel_categorical_crossentropy",
    "non_target_class_kd",
    "paired_symmetric_kl_divergence",
    "set_torch_compile",
    "sparse_crossentropy_and_kl_divergence",
    "sparse_multilabel_categorical_crossentropy",
    "sparse_multilabel_mask",
    "symmetric_kl_divergence",
    "target_class_kd",
    "torch_compile_enabled",
    "universal_logit_distance",
]
