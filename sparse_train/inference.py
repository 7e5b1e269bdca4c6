"""Loading a trained checkpoint for evaluation (validation loss) and text generation (greedy or nucleus sampling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sparse_train.config import Config, compose_config
from sparse_train.data.dataset import load_token_data, validation_batches
from sparse_train.data.tokenizer import Tokenizer, build_tokenizer
from sparse_train.models.transformer import Transformer, materialize
from sparse_train.train import checkpoint as ckpt
from sparse_train.train.loss import lm_loss


@dataclass
class LoadedModel:
    cfg: Config
    model: Transformer
    tokenizer: Tokenizer
    step: int
    path: Path


def load_trained(path: Path, overrides: list[str] | tuple[str, ...] = (), device: str = "cpu") -> LoadedModel:
    """Build the model a checkpoint (or a run directory's newest valid checkpoint) describes."""
    resolved = ckpt.resolve_checkpoint_path(path, warn=lambda msg: None)
    cfg = compose_config(yaml.safe_load(ckpt.read_checkpoint_config(resolved)), overrides)
    with torch.device("meta"):  # storage once, for the checkpoint's weights: nothing drawn to be overwritten
        model = Transformer(cfg.model, cfg.moe, cfg.router, cfg.fff)
    materialize(model, cfg.model, torch.device(device), seed=None)
    ckpt.load_sharded(resolved, model, None, distributed=False)  # resolve_checkpoint_path verified it
    state = ckpt.read_trainer_state(resolved)
    model.eval()
    return LoadedModel(cfg, model, build_tokenizer(cfg.data), int(state["step"]), resolved)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Autoregressive sampling; the context is cropped to the model's max_seq_len."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    window = model.config.max_seq_len
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)
        logits_V = model(context).logits_BSV[0, -1].float()
        if greedy:
            next_id = int(logits_V.argmax())
        else:
            probs_V = torch.softmax(logits_V / temperature, dim=-1).cpu()
            sorted_p, order = probs_V.sort(descending=True)
            # nucleus: keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep = (sorted_p.cumsum(0) - sorted_p) < top_p
            sorted_p = sorted_p * keep
            next_id = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])
        ids.append(next_id)
        if stop_id is not None and next_id == stop_id:
            break
    return ids[len(prompt_ids) :]


@torch.no_grad()
def evaluate(loaded: LoadedModel) -> dict:
    """Validation loss of a loaded checkpoint on its config's data (train.eval_batches micro-batches)."""
    cfg = loaded.cfg
    data = load_token_data(cfg.data, loaded.tokenizer, cfg.model.vocab_size)
    batches = validation_batches(data.val, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches)
    losses = [float(lm_loss(loaded.model(x).logits_BSV, y)) for x, y in batches]
    val = sum(losses) / len(losses)
    return {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "val_loss": val,
        "val_ppl": math.exp(val),
        "tokens": len(batches) * cfg.train.batch_size * cfg.data.seq_len,
        "data": data.source,
    }
