"""On-policy CausalLMDistiller step time against its floor, on the backend
named by `KERAS_BACKEND`, all in one process with interleaved samples:

- `generate`: keras-hub's own `student.generate` of the batch's prompts
  (compiled by keras-hub, greedy, no stop token);
- `off-policy`: `CausalLMDistiller.train_on_batch` on a batch already
  completed (today's step, no generation);
- `on-policy`: `CausalLMDistiller.train_on_batch` with
  `on_policy_fraction=1`: the student generates the responses inside the
  compiled step, then the same loss and update.

The floor is `generate + off-policy`; the targets for on-policy / floor are
<= 1.05 on JAX and TensorFlow and <= 1.15 on PyTorch.

Run `python -m benchmarks.bench_on_policy [--quick]`.
"""

import numpy as np

from benchmarks import common
from benchmarks.bench_causal_lm import layers_and_width, llama

NAME = "on_policy"


def add_arguments(parser):
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--teacher", default="4x256", help="layers x hidden width"
    )
    parser.add_argument(
        "--student", default="2x128", help="layers x hidden width"
    )


def measure(args):
    import keras

    import keras_kd

    length = args.prompt + args.new_tokens
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, args.vocab, (args.batch, length)).astype("int32")
    mask = np.zeros((args.batch, length), "int32")
    mask[:, : args.prompt] = 1
    prompts = {"token_ids": tokens * mask, "padding_mask": mask}
    teacher = llama(args.vocab, *layers_and_width(args.teacher), 0)

    def distiller(**options):
        student = llama(args.vocab, *layers_and_width(args.student), 1)
        model = keras_kd.CausalLMDistiller(student, teacher, seed=0)
        model.compile(
            keras.optimizers.Adam(1e-4),
            distillation_loss=keras_kd.losses.ReverseKLDivergence(),
            alpha=0.0,
            sampler="greedy",
            stop_token_ids=None,
            **options,
        )
        return model

    on_policy = distiller(on_policy_fraction=1.0)
    off_policy = distiller()
    generator = llama(args.vocab, *layers_and_width(args.student), 1)
    generator.compile(sampler="greedy")
    prompts_backend = {
        k: keras.ops.convert_to_tensor(v) for k, v in prompts.items()
    }
    x, y, w = on_policy.generate_responses(prompts)

    def generate():
        out = generator.generate(prompts_backend, stop_token_ids=None)
        common.block(out["token_ids"])

    samples = common.time_interleaved(
        {
            "generate": generate,
            "off-policy": lambda: off_policy.train_on_batch(
                x, y, sample_weight=w
            ),
            "on-policy": lambda: on_policy.train_on_batch(prompts),
        },
        repeats=args.repeats,
        warmup=3,
    )
    return samples


def section(samples, args):
    median = {k: common.summary(v)[0] for k, v in samples.items()}
    floor = median["generate"] + median["off-policy"]
    rows = [
        ["keras-hub generate", common.format_ms(samples["generate"])],
        ["off-policy step", common.format_ms(samples["off-policy"])],
        ["floor = generate + off-policy", common.fmt(floor * 1e3)],
        ["on-policy step", common.format_ms(samples["on-policy"])],
    ]
    ratio = [["on-policy / floor", common.fmt(median["on-policy"] / floor)]]
    return "\n".join(
        [
            common.fragment_heading("On-policy CausalLMDistiller step time"),
            f"Llama teacher {args.teacher}, student {args.student} (layers x "
            f"width), vocabulary {args.vocab}, {args.batch} rows of "
            f"{args.prompt} prompt + {args.new_tokens} generated tokens "
            f"(greedy, no stop token), {args.repeats} interleaved rounds.",
            "",
            common.markdown_table(["step", "median ms (IQR)"], rows),
            "",
            common.markdown_table(["ratio", "value"], ratio),
            "",
        ]
    )


def main(argv=None):
    args = common.parse_args(__doc__, argv, add_arguments)
    if args.quick:
        args.vocab, args.prompt, args.new_tokens, args.repeats = 512, 8, 8, 3
    text = section(measure(args), args)
    print(text)
    common.write_fragment(NAME, text, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
