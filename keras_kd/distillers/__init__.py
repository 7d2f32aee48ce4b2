"""Distillers: `keras.Model`s that train a student against frozen teachers
(or their cached outputs) with `fit`."""

from keras_kd.distillers.distiller import Distiller as Distiller
from keras_kd.distillers.dkd import DKDDistiller as DKDDistiller
from keras_kd.distillers.feature import FeatureDistiller as FeatureDistiller
from keras_kd.distillers.multi_teacher import (
    MultiTeacherDistiller as MultiTeacherDistiller,
)
from keras_kd.distillers.offline import OfflineDistiller as OfflineDistiller
from keras_kd.distillers.teacher_cache import (
    cache_teacher_outputs as cache_teacher_outputs,
)
from keras_kd.distillers.teacher_cache import (
    load_teacher_outputs as load_teacher_outputs,
)
