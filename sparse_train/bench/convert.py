"""`sparse-train bench convert`: HF import and export, per architecture, against transformers.

For each kind (sparse_train.bench.hf_models.KINDS): a tiny random transformers model is saved,
imported (read_hf, native_config, to_native) and both run on the same tokens in fp32; then our
weights are exported (write_hf), reloaded with transformers' AutoModelForCausalLM and run again.
One JSON object per architecture:

  arch                the HF architecture class (e.g. Qwen3MoeForCausalLM)
  kind                the builder's name for it (bench convert --archs)
  import_max_rel_err  max |ours - theirs| / max |theirs| over the logits, our imported model
  export_max_rel_err  the same for transformers' model reloaded from our export
  round_trip_exact    every tensor of the export equals the original's, bit for bit, same names
  params              our model's parameters (total; active per token beside it)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparse_train.bench.hf_models import build_hf, import_transformers
from sparse_train.lazy import read_all
from sparse_train.models.transformer import Transformer, count_parameters
from sparse_train.upcycle.hf import native_config, read_hf, to_native, write_hf

COLUMNS = ("arch", "import_max_rel_err", "export_max_rel_err", "round_trip_exact", "params", "active_params")
BATCH, SEQ = 2, 16


def max_rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Relative to the largest logit, so the figure does not blow up where a logit is near 0."""
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


def measure(kind: str, workdir: Path, seed: int = 0) -> dict[str, Any]:
    transformers = import_transformers()
    hf_model = build_hf(kind, seed)
    source, exported = workdir / kind / "hf", workdir / kind / "export"
    hf_model.save_pretrained(source)
    ckpt = read_hf(source)
    cfg = native_config(ckpt)
    ours = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    ours.load_state_dict(read_all(to_native(ckpt, cfg)), strict=True)
    ours.eval()
    vocab = cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        reference = hf_model(tokens).logits.float()
        import_err = max_rel_err(ours(tokens).logits_BSV.float(), reference)
    write_hf(exported, ours.state_dict(), cfg)
    again = read_hf(exported)
    exact = set(again.tensors) == set(ckpt.tensors) and all(
        torch.equal(again.tensors[name].full(), tensor.full()) for name, tensor in ckpt.tensors.items()
    )
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        export_err = max_rel_err(reloaded(tokens).logits.float(), reference)
    counts = count_parameters(ours)
    return {
        "arch": ckpt.arch,
        "kind": kind,
        "import_max_rel_err": import_err,
        "export_max_rel_err": export_err,
        "round_trip_exact": exact,
        "params": counts["total"],
        "active_params": counts["active"],
        "export_arch": type(reloaded).__name__,
        "tokens": [BATCH, SEQ],
        "dtype": "fp32",
        "transformers": transformers.__version__,
    }


def run(kinds: list[str], *, seed: int, as_json: bool) -> list[dict[str, Any]]:
    import_transformers().utils.logging.disable_progress_bar()  # one bar per load and save, on stderr
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        for kind in kinds:
            row = measure(kind, Path(tmp), seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not as_json:
        print(" | ".join(COLUMNS), file=sys.stderr)
        for row in rows:
            cells = [f"{row[c]:.2e}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
            print(" | ".join(cells), file=sys.stderr)
    return rows
