"""Keeps a model's `teacher` sublayer out of its training."""


class FrozenTeacher:
    """Mixin for a `keras.Model` with a `teacher` attribute.

    The teacher's weights are left out of `trainable_weights` (and listed
    in `non_trainable_weights`), so optimizers never update them, and the
    teacher's own regularization losses are left out of `losses`, all
    without changing the teacher object (its `trainable` flag included).
    Place it before `keras.Model` in the bases.
    """

    @property
    def losses(self):
        """Regularization losses of everything but the teacher."""
        losses = super().losses
        teacher = getattr(self, "teacher", None)
        if teacher is None:
            return losses
        teacher_losses = {
            id(loss)
            for layer in teacher._flatten_layers()
            for loss in layer._get_own_losses()
        }
        if not teacher_losses:
            return losses
        return [loss for loss in losses if id(loss) not in teacher_losses]

    def _trained_layers(self):
        teacher = getattr(self, "teacher", None)
        return [layer for layer in self.layers if layer is not teacher]

    @property
    def trainable_weights(self):
        if not self.trainable:
            return []
        seen = set()
        weights = []
        candidates = [v for v in self._trainable_variables if v.trainable]
        for layer in self._trained_layers():
            candidates.extend(layer.trainable_weights)
        for v in candidates:
            if id(v) not in seen:
                seen.add(id(v))
                weights.append(v)
        return weights

    @property
    def trainable_variables(self):
        return self.trainable_weights

    @property
    def non_trainable_weights(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trainable]

    @property
    def non_trainable_variables(self):
        trainable = {id(v) for v in self.trainable_weights}
        return [v for v in self.variables if id(v) not in trainable]
