"""Run INSIDE the public speculators venv (python -P, neutral cwd): build an EAGLE-3 draft
with the public package's own code, save it, and record its TTT logits.

argv: a JSON list of specs.  A build spec {"verifier", "out", "num_layers", "draft_arch",
"norm_before_fc", "fc_norm", "norm_output", "sliding_window", "full_attention_indices",
"draft_vocab_size", "ttt_steps"} makes `<out>/draft/` with random weights; a load spec
{"load": dir, "out"} loads a checkpoint with the package's `from_pretrained` instead.
Either way the model runs its training forward on `<out>/inputs.safetensors`
(hidden_states [1,T,3H], input_ids, document_ids, position_ids [1,T]) and writes the
per-TTT-step logits to `<out>/logits.safetensors` (step<i>).
Nothing here re-implements the package: every step calls its public API.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def build(spec: dict):
    from speculators.models.eagle3.core import Eagle3DraftModel
    from speculators.train.cli import create_transformer_layer_config

    out = Path(spec["out"])
    num_layers = spec.get("num_layers", 1)
    window = spec.get("sliding_window")
    full = spec.get("full_attention_indices")
    if window is None:  # their builder always writes layer_types; all-full means no window
        window, full = 2048, list(range(num_layers))
    tl = create_transformer_layer_config(
        verifier_name_or_path=spec["verifier"],
        num_layers=num_layers,
        draft_arch=spec.get("draft_arch", "llama"),
        hidden_act=None,
        sliding_window=window,
        full_attention_indices=full or [],
    )
    vocab = tl.vocab_size
    dv = spec.get("draft_vocab_size") or vocab
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[:dv] = True
    d2t = torch.zeros(dv, dtype=torch.long)
    torch.manual_seed(spec.get("seed", 0))
    model = Eagle3DraftModel.from_training_args(
        verifier_config=tl,
        t2d=t2d if dv != vocab else None,
        d2t=d2t if dv != vocab else None,
        verifier_name_or_path=spec["verifier"],
        draft_vocab_size=dv,
        norm_before_residual=spec.get("norm_before_residual", True),
        norm_before_fc=spec.get("norm_before_fc", False),
        fc_norm=spec.get("fc_norm", False),
        norm_output=spec.get("norm_output", False),
        ttt_steps=spec.get("ttt_steps", 3),
        draft_attn_impl="sdpa",
    )
    # Random norm weights too, so a misnamed or unused norm tensor changes the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("verifier_", "embed_tokens")):
                continue
            if name.endswith("norm.weight") or ".fc_norm." in name or "norm." in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    model.eval()
    model.save_pretrained(str(out / "draft"))
    return model


def load(spec: dict):
    from speculators.models.eagle3.core import Eagle3DraftModel

    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.from_pretrained(spec["load"])
    config.transformer_layer_config._attn_implementation = "sdpa"  # as build() asks for
    return Eagle3DraftModel.from_pretrained(spec["load"], config=config).eval()


def run(spec: dict) -> int:
    out = Path(spec["out"])
    model = load(spec) if "load" in spec else build(spec)
    inputs = load_file(str(out / "inputs.safetensors"))
    logits: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda m, a, o: logits.append(o.detach().clone()))
    with torch.no_grad():
        model(
            hidden_states=inputs["hidden_states"],
            input_ids=inputs["input_ids"],
            document_ids=inputs["document_ids"],
            position_ids=inputs["position_ids"],
            ttt_steps=spec.get("ttt_steps", 3),
        )
    hook.remove()
    save_file({f"step{i}": t.contiguous() for i, t in enumerate(logits)}, str(out / "logits.safetensors"))
    return len(logits)


def main() -> None:
    import importlib.metadata

    import speculators

    version = importlib.metadata.version("speculators")
    specs = json.loads(sys.argv[1])
    steps = [run(spec) for spec in specs]
    print(json.dumps({"speculators": version, "file": speculators.__file__, "steps": steps}))


if __name__ == "__main__":
    main()
