"""Each softmax loss class names its divergence, and the fused paths of the
distillers choose by that name."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import losses

NAMES = {
    losses.KLDivergence: "kl",
    losses.ReverseKLDivergence: "reverse_kl",
    losses.SymmetricKLDivergence: "symmetric_kl",
    losses.JensenShannonDivergence: "jsd",
}


@pytest.mark.parametrize("cls", sorted(NAMES, key=lambda c: c.__name__))
def test_each_softmax_loss_names_its_divergence(cls):
    assert cls.divergence == NAMES[cls]
    assert cls().divergence == NAMES[cls]


def test_reverse_kl_is_a_sibling_of_kl():
    assert not issubclass(losses.ReverseKLDivergence, losses.KLDivergence)
    assert issubclass(losses.ReverseKLDivergence, losses.DivergenceLoss)
    reverse = losses.ReverseKLDivergence(temperature=2.0, precise=True)
    assert reverse.get_config()["temperature"] == 2.0
    restored = keras.losses.deserialize(keras.losses.serialize(reverse))
    assert type(restored) is losses.ReverseKLDivergence
    assert restored.get_config() == reverse.get_config()
    t = np.array([[2.0, 0.0, -1.0]], "float32")
    s = np.array([[0.0, 1.0, 0.5]], "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reverse(t, s)),
        keras.ops.convert_to_numpy(losses.KLDivergence(temperature=2.0)(s, t)),
        rtol=1e-6,
    )


def test_other_losses_name_none():
    assert losses.DivergenceLoss.divergence is None
    assert losses.DecoupledKD.divergence is None
    assert losses.GlobalPointerKLDivergence.divergence is None
    assert losses.FeatureMeanSquaredError.divergence is None


def test_a_subclass_that_changes_the_math_names_no_divergence():
    class HalfKL(losses.KLDivergence):
        def call(self, y_true, y_pred):
            return 0.5 * super().call(y_true, y_pred)

    class Renamed(losses.KLDivergence):
        pass

    class Declared(losses.KLDivergence):
        fn = staticmethod(keras_kd.ops.kl_divergence)
        divergence = "kl"

    assert HalfKL.divergence is None
    assert Renamed.divergence == "kl"
    assert Declared.divergence == "kl"


def test_causal_lm_distiller_reads_the_name():
    keras_hub = pytest.importorskip("keras_hub")

    def llama(hidden):
        backbone = keras_hub.models.LlamaBackbone(
            vocabulary_size=16,
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=hidden,
            intermediate_dim=2 * hidden,
        )
        return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)

    class HalfKL(losses.KLDivergence):
        def call(self, y_true, y_pred):
            return 0.5 * super().call(y_true, y_pred)

    distiller = keras_kd.CausalLMDistiller(llama(8), llama(8))
    for loss in (
        losses.ReverseKLDivergence(),
        losses.JensenShannonDivergence(),
    ):
        distiller.compile("sgd", distillation_loss=loss)
    for loss in (HalfKL(), losses.SymmetricKLDivergence()):
        with pytest.raises(ValueError, match="distillation_loss"):
            distiller.compile("sgd", distillation_loss=loss)
