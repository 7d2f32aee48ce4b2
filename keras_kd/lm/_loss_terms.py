"""The loss terms of a `CausalLMDistiller` step, from the student's and
the teacher's final hidden states through the fused output-head ops."""

from keras import ops

from keras_kd import _checks
from keras_kd import losses as kd_losses
from keras_kd import ops as kd_ops
from keras_kd.lm import _keras_hub as hub

# The divergences the fused language-model ops compute.
_FUSED_DIVERGENCES = ("kl", "reverse_kl", "jsd")


def divergence_of(loss):
    if (
        isinstance(loss, kd_losses.DivergenceLoss)
        and loss.divergence in _FUSED_DIVERGENCES
        and getattr(loss, "from_logits", True)
    ):
        return loss.divergence
    raise _checks.invalid(
        "distillation_loss",
        "`keras_kd.losses.KLDivergence`, `ReverseKLDivergence` or "
        "`JensenShannonDivergence` on logits (the losses the fused "
        "language-model kernels compute)",
        loss,
    )


def online(distiller, x, y, y_pred, mask, alpha):
    """`(total, cross_entropy, distillation)` with a teacher model."""
    loss = distiller.distillation_loss
    kernel, layout, cap = hub.output_head(distiller.student, "student")
    teacher_kernel, teacher_layout, teacher_cap = hub.output_head(
        distiller.teacher, "teacher"
    )
    arguments = dict(
        mask=mask,
        divergence=divergence_of(loss),
        beta=getattr(loss, "beta", 0.5),
        temperature=distiller.temperature,
        chunk_size=distiller.chunk_size,
        student_kernel_layout=layout,
        teacher_kernel_layout=teacher_layout,
        student_logit_soft_cap=cap,
        teacher_logit_soft_cap=teacher_cap,
        # The distillation loss's own choice of path.
        precise=getattr(loss, "precise", None),
    )
    teacher_hidden = distiller.teacher_predictions(x)
    if y is None:
        total = kd_ops.fused_linear_divergence(
            y_pred, kernel, teacher_hidden, teacher_kernel, **arguments
        )
        return total, None, ops.stop_gradient(total)
    return kd_ops.fused_linear_distillation_loss(
        y_pred,
        kernel,
        teacher_hidden,
        teacher_kernel,
        y,
        alpha=alpha,
        return_components=True,
        **arguments,
    )


def offline(distiller, x, y, y_pred, mask, alpha):
    """`(total, cross_entropy, distillation)` from a top-k cache in `x`."""
    kernel, layout, cap = hub.output_head(distiller.student, "student")
    *teacher, cached_temperature = distiller.teacher_predictions(x)
    arguments = dict(
        mask=mask,
        temperature=distiller.temperature,
        chunk_size=distiller.chunk_size,
        student_kernel_layout=layout,
        student_logit_soft_cap=cap,
        teacher_temperature=cached_temperature,
    )
    if y is None:
        total = kd_ops.fused_linear_top_k_divergence(
            y_pred, kernel, *teacher, **arguments
        )
        return total, None, ops.stop_gradient(total)
    return kd_ops.fused_linear_top_k_distillation_loss(
        y_pred,
        kernel,
        *teacher,
        y,
        alpha=alpha,
        return_components=True,
        **arguments,
    )
