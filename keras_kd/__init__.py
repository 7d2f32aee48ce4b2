"""keras-kd: exact knowledge distillation and consistency regularization
for Keras 3, on the TensorFlow, PyTorch and JAX backends."""

from keras_kd import callbacks as callbacks
from keras_kd import layers as layers
from keras_kd import losses as losses
from keras_kd import metrics as metrics
from keras_kd import ops as ops
from keras_kd.distiller import Distiller as Distiller
from keras_kd.rdrop import RDrop as RDrop

__version__ = "0.1.0"
