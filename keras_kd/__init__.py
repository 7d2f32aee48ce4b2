"""keras-kd: exact knowledge distillation and consistency regularization
for Keras 3, on the TensorFlow, PyTorch and JAX backends."""

from keras_kd import callbacks as callbacks
from keras_kd import layers as layers
from keras_kd import losses as losses
from keras_kd import metrics as metrics
from keras_kd import ops as ops
from keras_kd.distillers import Distiller as Distiller
from keras_kd.distillers import DKDDistiller as DKDDistiller
from keras_kd.distillers import FeatureDistiller as FeatureDistiller
from keras_kd.distillers import MultiTeacherDistiller as MultiTeacherDistiller
from keras_kd.distillers import OfflineDistiller as OfflineDistiller
from keras_kd.distillers import cache_teacher_outputs as cache_teacher_outputs
from keras_kd.distillers import load_teacher_outputs as load_teacher_outputs
from keras_kd.lm import CausalLMDistiller as CausalLMDistiller
from keras_kd.lm import align_tokens as align_tokens
from keras_kd.lm import cache_causal_lm_top_k as cache_causal_lm_top_k
from keras_kd.lm import load_causal_lm_top_k as load_causal_lm_top_k
from keras_kd.lm import match_vocabularies as match_vocabularies
from keras_kd.rdrop import RDrop as RDrop

__version__ = "0.1.0"
