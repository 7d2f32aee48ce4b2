"""Layers: GlobalPointer span heads and rotary position embedding."""

from keras_kd.layers.global_pointer import (
    EfficientGlobalPointer as EfficientGlobalPointer,
)
from keras_kd.layers.global_pointer import GlobalPointer as GlobalPointer
from keras_kd.layers.global_pointer import (
    mask_span_logits as mask_span_logits,
)
from keras_kd.layers.rotary import rotary_embedding as rotary_embedding
