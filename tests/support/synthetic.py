"""Hidden-state training data made directly with a (tiny) transformers verifier.

For the tests and bench/memory_estimate.py, independent of the datagen pipeline: token
sequences are sampled from the verifier itself, run through it once, and the chosen
layers written in data format version 1 (`data_<i>.pt` + `data_config.json`).
Layer ids follow `speculators.verifier` (id `j`: input of decoder layer `j`; id `n`: the
final layer's output before the final norm), captured by its `capture_hidden_states`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from speculators.models.eagle3.config import default_aux_layer_ids
from speculators.verifier import capture_hidden_states, text_config


@torch.no_grad()
def write_synthetic_hidden_states(
    verifier_dir: str | Path,
    out_dir: str | Path,
    num_samples: int = 24,
    seq_len: int = 48,
    layer_ids: list[int] | None = None,
    seed: int = 0,
    temperature: float = 0.7,
    prompt_len: int = 4,
) -> Path:
    from transformers import AutoModelForCausalLM

    from speculators.data import data_config as dc
    from speculators.data.formats import DATA_CONFIG_NAME, write_pt_sample

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(verifier_dir), dtype=torch.float32)
    model.eval()
    text = text_config(model.config)
    n = int(text.num_hidden_layers)
    ids_wanted = list(layer_ids) if layer_ids is not None else default_aux_layer_ids(n) + [n]
    g = torch.Generator().manual_seed(seed)
    vocab = int(text.vocab_size)
    lengths = {}
    ids = torch.randint(3, vocab, (num_samples, prompt_len), generator=g)
    while ids.shape[1] < seq_len:  # sample continuations from the verifier, all rows at once
        logits = model(ids).logits[:, -1] / temperature
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt], dim=1)
    with capture_hidden_states(model, ids_wanted) as capture:
        model(ids)
    states = capture.ordered()
    mask = torch.zeros(seq_len, dtype=torch.long)
    mask[prompt_len:] = 1
    for i in range(num_samples):
        sample = {
            "input_ids": ids[i],
            "hidden_states": [h[i].to(torch.bfloat16) for h in states],
            "loss_mask": mask,
        }
        write_pt_sample(out, i, sample)
        lengths[str(i)] = seq_len
    dc.write(
        out / DATA_CONFIG_NAME,
        {
            "version": 1,
            "format": "pt",
            "model": str(verifier_dir),
            "data": "synthetic",
            "layer_ids": ids_wanted,
            "hidden_size": int(text.hidden_size),
            "num_hidden_layers": n,
            "lengths": lengths,
        },
    )
    return out
