"""`sparse-train generate`: continue a prompt with a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_train.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a checkpoint")
    gen.set_defaults(run=run)
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from sparse_train.inference import generate, load_trained

    if args.max_new_tokens < 1:
        raise UsageError("sparse-train generate: --max-new-tokens must be >= 1")
    if not 0.0 < args.top_p <= 1.0:
        raise UsageError("sparse-train generate: --top-p must be in (0, 1]")
    if args.temperature <= 0:
        raise UsageError("sparse-train generate: --temperature must be > 0 (use --greedy for argmax)")
    loaded = load_trained(Path(args.checkpoint))
    prompt_ids = loaded.tokenizer.encode(args.prompt).tolist()
    if not prompt_ids:
        raise UsageError("sparse-train generate: --prompt is empty")
    new_ids = generate(
        loaded.model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop_id=loaded.tokenizer.eot_id,
    )
    print(args.prompt + loaded.tokenizer.decode(new_ids))
    return 0
