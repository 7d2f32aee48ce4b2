"""On-policy distillation of a small Llama-style language model.

A character-level teacher (keras-hub `LlamaCausalLM`, built from its
constructor) is trained on English prose that scikit-learn ships. Three
students of one size are then trained for the same number of steps:

- from scratch, on the next characters of the text;
- off-policy: `CausalLMDistiller` on the text (forward KL and the
  cross-entropy);
- on-policy: `CausalLMDistiller` with `on_policy_fraction`: on that share
  of the steps the student writes the continuation of each window's prompt
  and learns the teacher's distribution on its own text (reverse KL).

The script prints each student's held-out perplexity (on the text) and the
teacher's mean per-token negative log-likelihood of the student's own
continuations of held-out prompts, greedy and sampled: how plausible the
teacher finds what the student writes, the quantity on-policy training
improves.

    KERAS_BACKEND=jax python examples/on_policy_distill.py
    python examples/on_policy_distill.py --epochs 1 --length 32   # quick
"""

import argparse
import time

import keras
import numpy as np
from causal_lm_distill import encode, llama, perplexity, shipped_text, split

import keras_kd


def continuations(model, x, prompt, sampler, seed):
    """`model`'s continuations of the first `prompt` tokens of each row."""
    mask = np.zeros_like(x["padding_mask"])
    mask[:, :prompt] = 1
    keras.utils.set_random_seed(seed)
    model.compile(sampler=sampler)
    out = model.generate(
        {"token_ids": x["token_ids"] * mask, "padding_mask": mask},
        stop_token_ids=None,
    )
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


def teacher_nll(teacher, tokens, prompt):
    """The teacher's mean negative log-likelihood per generated token."""
    total, count = 0.0, 0
    for start in range(0, len(tokens), 64):
        rows = tokens[start : start + 64]
        x = {"token_ids": rows, "padding_mask": np.ones_like(rows)}
        logits = keras.ops.convert_to_numpy(teacher(x)).astype("float64")
        logits -= logits.max(axis=-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        # Position i predicts token i + 1; the prompt is not scored.
        picked = np.take_along_axis(log_p[:, :-1], rows[:, 1:, None], -1)
        total -= picked[:, prompt - 1 :].sum()
        count += picked[:, prompt - 1 :].size
    return total / count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--on-policy-fraction", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    text = shipped_text()
    x, y, vocab = encode(text, args.length, stride=args.length // 2)
    (x_train, y_train), (x_test, y_test) = split(x, y, 0.1)
    # Labels before the prompt's end weigh nothing: each window's prompt
    # is its first `prompt` characters, the rest its reference response.
    w_train = np.ones(y_train.shape, "float32")
    w_train[:, : args.prompt - 1] = 0.0
    print(
        f"{len(text):,} characters, vocabulary {vocab}, "
        f"{len(y_train)} training and {len(y_test)} held-out windows of "
        f"{args.length} ({args.prompt}-character prompts), backend "
        f"{keras.backend.backend()}"
    )

    def fit(model, weights=None):
        start = time.perf_counter()
        model.fit(
            x_train,
            y_train,
            sample_weight=weights,
            batch_size=32,
            epochs=args.epochs,
            verbose=0,
        )
        return time.perf_counter() - start

    teacher = llama(vocab, 2, 96, args.seed)
    teacher.compile(keras.optimizers.Adam(3e-3))
    teacher.fit(
        x_train,
        y_train,
        batch_size=32,
        epochs=args.teacher_epochs or 3 * args.epochs,
        verbose=0,
    )

    scratch = llama(vocab, 1, 48, args.seed + 1)
    scratch.compile(keras.optimizers.Adam(3e-3))
    rows = [("scratch", scratch, fit(scratch))]

    def distilled(divergence, **options):
        student = llama(vocab, 1, 48, args.seed + 1)
        distiller = keras_kd.CausalLMDistiller(student, teacher, seed=args.seed)
        distiller.compile(
            keras.optimizers.Adam(3e-3),
            distillation_loss=divergence,
            alpha=args.alpha,
            stop_token_ids=None,
            **options,
        )
        return student, fit(distiller, w_train)

    rows.append(("off-policy", *distilled(keras_kd.losses.KLDivergence())))
    rows.append(
        (
            "on-policy",
            *distilled(
                keras_kd.losses.ReverseKLDivergence(),
                on_policy_fraction=args.on_policy_fraction,
                sampler="random",
            ),
        )
    )

    held_out = {k: v[: args.samples] for k, v in x_test.items()}
    print()
    print(
        "student    | held-out perplexity | teacher NLL of its own text: "
        "greedy | sampled | time"
    )
    print("-----------+---------------------+" + "-" * 37 + "+-------")
    results = {}
    for name, model, seconds in rows:
        value = perplexity(model, x_test, y_test)
        nll = []
        for sampler in ("greedy", "random"):
            out = continuations(model, held_out, args.prompt, sampler, 7)
            nll.append(teacher_nll(teacher, out["token_ids"], args.prompt))
        results[name] = {
            "perplexity": value,
            "teacher_nll_greedy": nll[0],
            "teacher_nll_sampled": nll[1],
        }
        print(
            f"{name:<10} | {value:>19.3f} | {nll[0]:>35.3f} | "
            f"{nll[1]:>7.3f} | {seconds:5.1f} s"
        )
    teacher_value = perplexity(teacher, x_test, y_test)
    print(f"(teacher's held-out perplexity: {teacher_value:.3f})")
    return results


if __name__ == "__main__":
    main()
