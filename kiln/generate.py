"""Sample text from a checkpoint: greedy, or temperature with optional top-k."""
from __future__ import annotations

from pathlib import Path

import torch

from kiln.checkpoint.manager import CheckpointManager
from kiln.config import Config, from_yaml_text
from kiln.errors import KilnError
from kiln.model import Transformer


def load_model(ckpt: Path) -> tuple[Transformer, Config]:
    cfg_file = ckpt / "config.yaml"
    if not cfg_file.is_file():
        raise KilnError(f"checkpoint {ckpt} has no config.yaml")
    cfg = from_yaml_text(cfg_file.read_text())
    model = Transformer(cfg.model)
    CheckpointManager(ckpt.parent).load_weights(ckpt, [model], None)
    return model.eval(), cfg


@torch.no_grad()
def sample(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
           top_k: int | None = None, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Autoregressive decoding; temperature 0 is greedy. Recomputes the window each token (no KV cache):
    simple and exact, meant for inspecting small models."""
    if not prompt:
        raise KilnError("the prompt is empty")
    g = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    limit = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens[-limit:]]))[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return tokens[len(prompt):]
