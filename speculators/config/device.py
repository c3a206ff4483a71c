"""What a `device` setting of "auto" means, decided once for every command.

"auto" is the GPU when torch sees one, else the CPU; any other value ("cpu", "cuda",
"cuda:N") is taken as given. The trainer, datagen, regenerate, eval and the memory check
all read a device setting through `resolve_device`.
"""

from __future__ import annotations


def resolve_device(device: str = "auto") -> str:
    """`device` with "auto" replaced by "cuda" (a GPU is visible) or "cpu" (none, or no torch)."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
