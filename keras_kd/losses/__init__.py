"""Loss classes: thin `keras.losses.Loss` wrappers over `keras_kd.ops`."""

from keras_kd.losses.base import DivergenceLoss as DivergenceLoss
from keras_kd.losses.cross_tokenizer import (
    HybridLogitDistance as HybridLogitDistance,
)
from keras_kd.losses.cross_tokenizer import (
    UniversalLogitDistance as UniversalLogitDistance,
)
from keras_kd.losses.divergences import (
    JensenShannonDivergence as JensenShannonDivergence,
)
from keras_kd.losses.divergences import KLDivergence as KLDivergence
from keras_kd.losses.divergences import (
    ReverseKLDivergence as ReverseKLDivergence,
)
from keras_kd.losses.divergences import (
    SymmetricKLDivergence as SymmetricKLDivergence,
)
from keras_kd.losses.dkd import DecoupledKD as DecoupledKD
from keras_kd.losses.features import AttentionTransfer as AttentionTransfer
from keras_kd.losses.features import (
    FeatureCosineDistance as FeatureCosineDistance,
)
from keras_kd.losses.features import (
    FeatureMeanSquaredError as FeatureMeanSquaredError,
)
from keras_kd.losses.multilabel import (
    GlobalPointerKLDivergence as GlobalPointerKLDivergence,
)
from keras_kd.losses.multilabel import (
    MultilabelCategoricalCrossentropy as MultilabelCategoricalCrossentropy,
)
from keras_kd.losses.multilabel import (
    SparseMultilabelCategoricalCrossentropy as SparseMultilabelCategoricalCrossentropy,  # noqa: E501
)
from keras_kd.losses.rdrop import (
    RDropCategoricalCrossentropy as RDropCategoricalCrossentropy,
)
from keras_kd.losses.rdrop import (
    RDropSparseCategoricalCrossentropy as RDropSparseCategoricalCrossentropy,
)
