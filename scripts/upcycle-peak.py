#!/usr/bin/env python
"""Peak memory of `sparse-train upcycle` and `convert` on a dense HF Llama built here (random
weights; nothing is downloaded), one JSON line per case.

    .venv/bin/python scripts/upcycle-peak.py --work /tmp/upcycle-peak [--sparse-train .venv/bin/sparse-train]

Every command runs in its own process under /usr/bin/time, whose maximum resident set size is
the peak reported; `baseline_mb` is a process that imports the same modules and converts
nothing. Sizes (fp32) are computed from the model's shapes: the dense model, the upcycled
one, and one upcycled block (its FFN: the experts and the router).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FP32 = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (models are written here)")
    parser.add_argument("--sparse-train", default=str(Path(sys.executable).parent / "sparse-train"))
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--label", default="", help="a name for the code measured (e.g. a commit)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dense = args.work / "dense"
    if not (dense / "config.json").is_file():
        _build_dense(dense, args)
    sizes = _sizes_mb(args)
    baseline = _peak_mb([sys.executable, "-c", "import torch, transformers, sparse_train.upcycle.run"])
    upcycle = [args.sparse_train, "upcycle", "--from", str(dense), "--method", "copy"]
    upcycle += ["--num-experts", str(args.experts), "--top-k", "2", "--overwrite"]
    convert = [args.sparse_train, "convert", "--from", str(dense), "--overwrite"]
    for command, fmt in ((upcycle, "hf"), (upcycle, "native"), (convert, "hf"), (convert, "native")):
        target = args.work / f"{command[1]}-{fmt}"
        peak = _peak_mb([*command, "--to", str(target), "--format", fmt])
        record = {"label": args.label, "command": command[1], "format": fmt, "peak_rss_mb": peak}
        print(json.dumps({**record, "baseline_mb": baseline, **sizes}), flush=True)


def _build_dense(path: Path, args: argparse.Namespace) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d_model // 64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def _sizes_mb(args: argparse.Namespace) -> dict[str, float]:
    d, f, e = args.d_model, args.ffn, args.experts
    outer = 2 * args.vocab * d + d  # embeddings, output projection, final norm
    attn = 4 * d * d + 2 * d  # q, k, v, o and the two norms
    dense_block, sparse_ffn = attn + 3 * d * f, e * 3 * d * f + e * d
    return {
        "dense_mb": round((outer + args.layers * dense_block) * FP32 / 2**20, 1),
        "upcycled_mb": round((outer + args.layers * (attn + sparse_ffn)) * FP32 / 2**20, 1),
        "upcycled_block_mb": round(sparse_ffn * FP32 / 2**20, 1),
    }


def _peak_mb(command: list[str]) -> float:
    """The command's maximum resident set size (MiB), from /usr/bin/time; fails if the command does."""
    done = subprocess.run(["/usr/bin/time", "-f", "peak_kb=%M", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    line = next(line for line in reversed(done.stderr.splitlines()) if line.startswith("peak_kb="))
    return round(int(line.split("=")[1]) / 1024, 1)


if __name__ == "__main__":
    main()
