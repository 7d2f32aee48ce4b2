"""Keeps a model's teachers out of its training, without touching them."""

from keras_kd import _checks


class FrozenTeachers:
    """Mixin for a `keras.Model` that holds frozen teacher models.

    Teachers registered with `_add_teachers` are left out of the model's
    `trainable_weights` (and listed in `non_trainable_weights`), so no
    optimizer updates them, and their own activity losses are left out of
    `losses`, all without changing the teachers (their `trainable` flags
    included). The identity of variables decides, so the check at
    registration that no variable is shared with the student is what keeps
    a shared layer from being trained through the student. Place it before
    `keras.Model` in the bases.
    """

    def _add_teachers(self, name, teachers):
        """Checks `teachers` (built, distinct, sharing no variable with the
        student) and records them as the frozen models."""
        frozen = list(getattr(self, "_frozen_models", []))
        student_vars = {id(v): v for v in self.student.variables}
        for i, teacher in enumerate(teachers):
            label = name if name == "teacher" else f"{name}[{i}]"
            _checks.model(label, teacher)
            if teacher is self.student or any(teacher is f for f in frozen):
                raise _checks.invalid(
                    label,
                    "a distinct model, neither the student nor another "
                    "teacher (give a repeated teacher a larger weight)",
                    teacher.name,
                )
            if not teacher.built:
                raise _checks.invalid(
                    label,
                    "a built model (a trained teacher, or one given "
                    "an `Input`)",
                    teacher.name,
                )
            shared = [
                student_vars[id(v)].path
                for v in teacher.variables
                if id(v) in student_vars
            ]
            if shared:
                raise ValueError(
                    f"Invalid value for argument `{label}`. Expected a "
                    "teacher that shares no variable with the student (fit "
                    "would train the teacher through the student). "
                    f"Received: {label}={teacher.name} sharing {shared}"
                )
            frozen.append(teacher)
        # A plain list is not tracked by Keras: the models are tracked
        # through their own attributes (`teacher`, `teachers`).
        object.__setattr__(self, "_frozen_models", frozen)

    def _frozen_ids(self):
        return {
            id(v)
            for model in getattr(self, "_frozen_models", [])
            for v in model.variables
        }

    @property
    def trainable_weights(self):
        frozen = self._frozen_ids()
        return [v for v in super().trainable_weights if id(v) not in frozen]

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

    @property
    def losses(self):
        """Keras' losses of the Distiller without the teachers' own.

        The teachers' weights are not trainable here, so their weight
        regularization is already left out; what remains of theirs are
        activity losses added by their calls, constants of frozen models.
        """
        losses = super().losses
        frozen = getattr(self, "_frozen_models", [])
        if not losses or not frozen:
            return losses
        teacher_losses = {id(v) for model in frozen for v in model.losses}
        return [v for v in losses if id(v) not in teacher_losses]

    def zero_grad(self, set_to_none=True):
        """Clears the gradients of every trainable variable (PyTorch).

        Keras' PyTorch backend registers a model's parameters under their
        variable paths, and a teacher and student whose layers have the
        same names (two keras-hub backbones, a cloned model) collide there:
        `torch.nn.Module.zero_grad` then misses some student parameters and
        their gradients would add up from step to step.
        """
        for variable in self.trainable_variables:
            variable.value.grad = None
        super().zero_grad(set_to_none=set_to_none)
