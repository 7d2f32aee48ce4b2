"""Distillation losses of language models computed from hidden states:
the `[tokens, vocab]` logits are never built.

At a vocabulary of 150,000 the logits of a batch (with their gradient and
the teacher's logits) are the largest tensors of a training step. These
functions compute the loss and its gradients chunk by chunk over the
tokens, one student and one teacher matmul per chunk (the loop:
`_chunk_engine.py`, with the `DenseTeacher` of `_chunk_teachers.py`; the
per-chunk math: `_fused_linear_math.py`).

Conventions shared by the three functions:

- Kernels are `[hidden, vocab]` (the `keras.layers.Dense` layout,
  `*_kernel_layout="hv"`, the default) or `[vocab, hidden]` (a tied or
  reversible embedding matrix used as it is stored, `*_kernel_layout="vh"`:
  the matmuls contract the right axis, nothing is transposed or copied).
- `mask` (bool, or float weights) has the hidden states' leading shape;
  the loss is the mask-weighted mean over tokens, and a token whose mask is
  0 is ignored entirely (its hidden states may be NaN, its label out of
  range). With every token masked the loss is 0.
- Gradients reach `student_hidden` and `student_kernel` only; the teacher's
  hidden states and kernel get none (`None` on every backend).
- The softmax math runs in float64 for float64 inputs and in float32
  otherwise. A model whose hidden states are bfloat16 or float16 has its
  products run in that dtype, its kernel cast to it: what its own `Dense`
  head computes under a `bfloat16` or `mixed_bfloat16` policy, and what
  GPU matrix units are fast at. The backend's matmul accumulates in
  float32 and rounds the logits to that dtype (XLA may keep them in
  float32); they are then cast to float32. Gradients come back in the
  inputs' dtypes; the kernel gradient is accumulated over the chunks in
  the kernel's dtype (a float32 accumulator for a bfloat16 kernel would
  take twice its memory), one rounding per chunk.
- `chunk_size` tokens are processed at a time; the default keeps a chunk's
  `[chunk, vocab]` float32 block at 8 MiB on a CPU and 128 MiB on a GPU
  (`2**21 // vocab` and `2**25 // vocab` tokens, multiples of 8): 64 and
  1048 tokens at a 32,000 vocabulary. Peak memory is then
  flat in the token count: a few such blocks plus the gradient buffers
  (`[tokens, hidden]` and `[hidden, vocab]`); a larger chunk trades memory
  for larger matmuls. Token counts are padded to whole chunks (masked).
"""

from keras import ops

from keras_kd import _checks
from keras_kd.ops import _fused_linear_args as args
from keras_kd.ops._chunk_engine import fused_loss
from keras_kd.ops._chunk_teachers import DenseTeacher
from keras_kd.ops._gradients import resolve_precise


def _call(
    student_hidden,
    student_kernel,
    teacher_hidden,
    teacher_kernel,
    labels,
    mask,
    divergence,
    beta,
    options,
    layout,
    cap,
    precise=None,
):
    """Checks every argument, then runs the chunk engine. `options` holds
    the student's options (`args.student_inputs`); `layout` and `cap` are
    the teacher's."""
    if divergence is not None:
        _checks.choice("divergence", divergence, args.DIVERGENCES)
        beta = _checks.fraction("beta", beta)
        if divergence == "jsd" and beta in (0.0, 1.0):
            # The interior formula is 0 at both ends; GKD defines the end
            # points as the forward and the reverse KL.
            divergence = "kl" if beta == 0.0 else "reverse_kl"
    student, cfg, vocab = args.student_inputs(
        student_hidden, student_kernel, labels, mask, options
    )
    if divergence is None:
        return fused_loss(student, None, cfg)
    hidden = student["student_hidden"]
    teacher, t_kernel = args.tensor(teacher_hidden), args.tensor(teacher_kernel)
    args.same_leading("teacher_hidden", teacher, hidden, extra_dims=1)
    t_vocab = args.kernel_vocab("teacher_kernel", t_kernel, layout, teacher)
    if t_vocab is not None and vocab is not None and t_vocab < vocab:
        raise args.shape_error(
            "teacher_kernel",
            f"at least the student's {vocab} vocabulary entries (extra "
            "teacher entries, e.g. a padded vocabulary, are ignored)",
            t_kernel,
        )
    # Padded vocabularies: the student's ids are the first `vocab`.
    if t_vocab != vocab:
        cut = slice(0, vocab)
        t_kernel = t_kernel[:, cut] if layout == "hv" else t_kernel[cut]
    dense = DenseTeacher(
        teacher,
        t_kernel,
        layout,
        args.cap("teacher_logit_soft_cap", cap),
        divergence,
        beta,
        resolve_precise(precise),
    )
    return fused_loss(student, dense, cfg)


def _options(temperature, alpha, chunk_size, layout, cap):
    """The student's options of `args.student_inputs`."""
    return {
        "temperature": temperature,
        "alpha": alpha,
        "chunk_size": chunk_size,
        "student_kernel_layout": layout,
        "student_logit_soft_cap": cap,
    }


def fused_linear_divergence(
    student_hidden,
    student_kernel,
    teacher_hidden,
    teacher_kernel,
    mask=None,
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    chunk_size=None,
    student_kernel_layout="hv",
    teacher_kernel_layout="hv",
    student_logit_soft_cap=None,
    teacher_logit_soft_cap=None,
    precise=None,
):
    """Token-level distillation divergence from hidden states, without
    building the logits.

    Formula:

    ```
    s = cap_s * tanh((student_hidden @ student_kernel) / cap_s)  # or no cap
    t = cap_t * tanh((teacher_hidden @ teacher_kernel) / cap_t)
    P = softmax(t / T), Q = softmax(s / T)       # per token
    loss = T**2 * sum_n mask_n D(P_n || Q_n) / sum_n mask_n
    ```

    with `D` the forward `KL(P || Q)` (`"kl"`), the reverse `KL(Q || P)`
    (`"reverse_kl"`), or the generalized Jensen-Shannon divergence
    (`"jsd"`): `beta KL(P || M) + (1 - beta) KL(Q || M)` with
    `M = beta P + (1 - beta) Q`, the forward KL at `beta = 0` and the
    reverse KL at `beta = 1` (as `jensen_shannon_divergence`). With
    `precise=True` each term is computed without cancellation, so the value
    is exact to rounding also for a student very close to its teacher
    (divergences of 1e-9); the fast path (the default) computes the plain
    log-space sums, exact to rounding of the log-probabilities. Both are
    exact for confident logits (1e3 and beyond). The gradient with respect
    to token n's logits `s_n`, formed in the forward pass, is
    `mask_n / sum(mask)` times

    ```
    kl:          T (Q - P)
    reverse_kl:  T Q (log Q - log P - KL(Q || P))
    jsd:         T (1 - beta) Q (E_Q[l] - l),  l = log(M / Q)
    ```

    Args:
        student_hidden: the student's last hidden states `[..., H_s]`.
        student_kernel: its output kernel, `[H_s, V]` (`"hv"`) or `[V, H_s]`
            (`"vh"`, a tied embedding matrix).
        teacher_hidden: the teacher's hidden states `[..., H_t]`, same
            leading shape. No gradient flows to them.
        teacher_kernel: its output kernel, `[H_t, V_t]` or `[V_t, H_t]`
            with `V_t >= V`; only the first `V` entries are used (padded
            vocabularies). No gradient flows to it.
        mask: real tokens, bool or float weights, shape `[...]`. `None`
            counts every token.
        divergence: `"kl"`, `"reverse_kl"` or `"jsd"`.
        beta: the JSD mixing weight in `[0, 1]`.
        temperature: `T > 0`, a number or a scalar tensor/variable.
        chunk_size: tokens per chunk, or `None` for `2**21 // V` on a CPU
            and `2**25 // V` on a GPU (multiples of 8).
        student_kernel_layout: `"hv"` or `"vh"`.
        teacher_kernel_layout: `"hv"` or `"vh"`.
        student_logit_soft_cap: Gemma's `final_logit_soft_cap` of the
            student (applied before the temperature), or `None`.
        teacher_logit_soft_cap: the same for the teacher.
        precise: `None` (the measured default, see
            `keras_kd.ops.kl_divergence`), `True` for the cancellation-free
            terms, `False` for the fast path.

    Returns:
        A scalar, float64 for float64 inputs and float32 otherwise.

    Example:

    >>> h_s, h_t = np.ones((2, 7, 4)), np.ones((2, 7, 8))
    >>> fused_linear_divergence(
    ...     h_s, np.zeros((4, 11)), h_t, np.zeros((8, 11)), temperature=2.0
    ... )  # 0.0: identical (uniform) distributions

    Reference:
        Agarwal et al. On-Policy Distillation of Language Models (GKD).
        ICLR 2024. https://arxiv.org/abs/2306.13649
    """
    out = _call(
        student_hidden,
        student_kernel,
        teacher_hidden,
        teacher_kernel,
        None,
        mask,
        divergence,
        beta,
        _options(
            temperature,
            0.0,
            chunk_size,
            student_kernel_layout,
            student_logit_soft_cap,
        ),
        teacher_kernel_layout,
        teacher_logit_soft_cap,
        precise,
    )
    return out[0]


def fused_linear_cross_entropy(
    student_hidden,
    student_kernel,
    labels,
    mask=None,
    chunk_size=None,
    student_kernel_layout="hv",
    student_logit_soft_cap=None,
):
    """Mean next-token cross-entropy from hidden states, without building
    the logits.

    Formula:

    ```
    s = student_hidden @ student_kernel        # capped if asked
    loss = sum_n mask_n (logsumexp(s_n) - s_n[labels_n]) / sum_n mask_n
    ```

    Args:
        student_hidden: hidden states `[..., H]`, aligned with `labels`
            (shift the tokens yourself: `labels = tokens[:, 1:]` for
            `hidden[:, :-1]`).
        student_kernel: `[H, V]` (`"hv"`) or `[V, H]` (`"vh"`).
        labels: integer token ids `[...]`. An id outside `[0, V)` on an
            unmasked token makes the loss NaN.
        mask: real tokens, bool or float weights, shape `[...]`.
        chunk_size: tokens per chunk, or `None` (see
            `fused_linear_divergence`).
        student_kernel_layout: `"hv"` or `"vh"`.
        student_logit_soft_cap: soft-capping of the logits, or `None`.

    Returns:
        A scalar, the mean cross-entropy over real tokens.

    Example:

    >>> fused_linear_cross_entropy(np.ones((2, 7, 4)), np.zeros((4, 11)),
    ...                            np.zeros((2, 7), "int32"))  # log(11)
    """
    out = _call(
        student_hidden,
        student_kernel,
        None,
        None,
        labels,
        mask,
        None,
        None,
        _options(
            1.0, 1.0, chunk_size, student_kernel_layout, student_logit_soft_cap
        ),
        "hv",
        None,
    )
    return out[0]


def fused_linear_distillation_loss(
    student_hidden,
    student_kernel,
    teacher_hidden,
    teacher_kernel,
    labels,
    mask=None,
    alpha=0.1,
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    chunk_size=None,
    student_kernel_layout="hv",
    teacher_kernel_layout="hv",
    student_logit_soft_cap=None,
    teacher_logit_soft_cap=None,
    return_components=False,
    precise=None,
):
    """The whole distillation loss of a language model in one pass:
    `alpha * cross_entropy + (1 - alpha) * divergence`, from one student
    matmul per chunk.

    Formula:

    ```
    loss = alpha * fused_linear_cross_entropy(...)    # T = 1
           + (1 - alpha) * fused_linear_divergence(...)  # T, times T**2
    ```

    Args:
        student_hidden, student_kernel, teacher_hidden, teacher_kernel,
            mask, divergence, beta, temperature, chunk_size,
            student_kernel_layout, teacher_kernel_layout,
            student_logit_soft_cap, teacher_logit_soft_cap, precise: as in
            `fused_linear_divergence`.
        labels: integer next-token ids `[...]`, as in
            `fused_linear_cross_entropy`.
        alpha: weight of the cross-entropy in `[0, 1]` (a number or a
            scalar tensor/variable), as the `Distiller`'s `alpha`.
        return_components: also return both terms.

    Returns:
        The scalar loss, or `(loss, cross_entropy, divergence)` with
        `return_components=True`. The components are for logging: they
        carry no gradient (differentiate `loss`).

    Example:

    >>> loss, ce, kd = fused_linear_distillation_loss(
    ...     h_s, w_s, h_t, w_t, labels, alpha=0.1, temperature=2.0,
    ...     return_components=True)
    """
    out = _call(
        student_hidden,
        student_kernel,
        teacher_hidden,
        teacher_kernel,
        labels,
        mask,
        divergence,
        beta,
        _options(
            temperature,
            args.weight("alpha", alpha),
            chunk_size,
            student_kernel_layout,
            student_logit_soft_cap,
        ),
        teacher_kernel_layout,
        teacher_logit_soft_cap,
        precise,
    )
    if not return_components:
        return out[0]
    return out[0], ops.stop_gradient(out[1]), ops.stop_gradient(out[2])
