"""How hidden states are stored on disk: bf16 as computed, or fp8 (e4m3) with one scale per row.

``--hidden-states-dtype fp8`` halves the bytes per token of datagen's output and of the online
cache. Each row (one token of one layer, ``H`` values) is stored as ``float8_e4m3fn`` values
``q = x / s`` with ``s = max|x| / 448`` (448 is e4m3's largest finite value; an all-zero row has
``s = 1``), and ``s`` as one float32. Reading multiplies back, ``x' = q * s``, and returns bf16,
the dtype a bf16 store returns, so the trainer never sees the difference. e4m3 keeps 3 mantissa
bits: an element is off by at most ``|x| / 16`` (normal range) or ``s / 1024`` (subnormal range).

A sample written in fp8 holds ``hidden_states`` (the fp8 tensors, ``[L, H]`` each) and
``hidden_states_scale`` (float32 ``[L]`` each, same order); data_config.json records
``hidden_states.dtype = "float8_e4m3fn"``. A store without the record (or with ``"bfloat16"``)
reads as before. The math here is pure functions; the layouts (`speculators.data.formats`)
and the online cache call them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from speculators.errors import UserError

HiddenStatesDtype = Literal["bf16", "fp8"]
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
READ_DTYPE = torch.bfloat16  # what a reader returns, whatever the storage
SCALE_KEY = "hidden_states_scale"
SCALE_NOTE = "per row (token, layer): float32 max|x|/448, 1 for an all-zero row"
# the choice (the flag's value) -> the name data_config.json records under hidden_states.dtype
RECORDED_NAME: dict[str, str] = {"bf16": "bfloat16", "fp8": "float8_e4m3fn"}
_FROM_RECORDED = {v: k for k, v in RECORDED_NAME.items()}
UNSCALED = ("bf16", "bfloat16", "float16", "float32", "float64")  # recorded names read without scales


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., H]`` -> (``q [..., H]`` float8_e4m3fn, ``scale [...]`` float32), ``x ~= q * scale``."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` for float8_e4m3fn, exact, by moving bits: the low 7 bits (exponent, mantissa)
    shifted into a bf16's exponent/mantissa read 2**-120 times the value (normal and subnormal
    alike), the sign moved to bit 15. About 1.7x faster than ``q.float()`` on this CPU build,
    whose float8 conversion is not vectorised. The NaN pattern (never written) is not preserved."""
    b = q.view(torch.uint8).to(torch.int16)
    bits = ((b & 0x7F) << 4) | ((b & 0x80) << 8)
    return bits.view(torch.bfloat16).float().mul_(2.0 ** 120)


def fp8_bits_to_float(q: torch.Tensor) -> torch.Tensor:
    """`fp8_to_float` in three in-place passes instead of six (2-3x faster on this CPU build; the
    batch path's converter): sign-extending the byte to int16 and shifting it left by 4 puts the
    sign at bit 15 and the 7 exponent/mantissa bits at bits 4-10; masking the rest leaves the same
    bf16 bits as `fp8_to_float`. Exact for every finite e4m3 pattern (tests/test_hs_quant.py)."""
    b = q.view(torch.int8).to(torch.int16)
    b <<= 4
    b &= 0x87F0 - 0x10000  # 0x87F0 as an int16
    return b.view(torch.bfloat16).float().mul_(2.0 ** 120)


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = READ_DTYPE) -> torch.Tensor:
    """``q * scale`` (per row, in float32) in ``dtype``."""
    return fp8_to_float(q).mul_(scale.float().unsqueeze(-1)).to(dtype)


def storage_of(recorded: Any, where: str) -> HiddenStatesDtype:
    """The storage a data_config.json records (``hidden_states.dtype``): ``"fp8"`` for scaled e4m3,
    else ``"bf16"`` (absent: stores written before fp8 existed; a converted public store may record
    float32 or float16, stored unscaled too). An unknown value is a `UserError` naming the file."""
    if recorded is None or recorded in UNSCALED:
        return "bf16"
    if recorded in _FROM_RECORDED:
        return _FROM_RECORDED[recorded]  # type: ignore[return-value]
    if recorded == "fp8":
        return "fp8"
    raise UserError(f"{where}: hidden_states.dtype {recorded!r} is not supported "
                    f"(expected float8_e4m3fn or one of {', '.join(UNSCALED[1:])})")


def check_choice(value: Any, flag: str = "--hidden-states-dtype") -> HiddenStatesDtype:
    """The flag's value, or a `UserError` naming the flag and its choices."""
    if value not in RECORDED_NAME:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(RECORDED_NAME)}")
    return value  # type: ignore[return-value]


def encode_hidden_states(hidden_states: list[torch.Tensor], storage: HiddenStatesDtype) -> dict[str, list[torch.Tensor]]:
    """The sample-file entries that store ``hidden_states`` (``[L, H]`` each) as ``storage``."""
    check_choice(storage)
    if storage == "bf16":
        return {"hidden_states": [h.to(torch.bfloat16).contiguous() for h in hidden_states]}
    pairs = [quantise_rows(h) for h in hidden_states]
    return {"hidden_states": [q.contiguous() for q, _ in pairs], SCALE_KEY: [s.contiguous() for _, s in pairs]}


def check_scaled(sample: dict[str, Any], where: str) -> bool:
    """Whether ``sample`` holds scaled (fp8) hidden states; ``ValueError`` naming ``where`` when its
    scales do not fit its fp8 tensors (or fp8 tensors come without scales)."""
    hs = sample["hidden_states"]
    scales = sample.get(SCALE_KEY)
    if scales is None:
        if any(h.dtype == FP8 for h in hs):
            raise ValueError(f"{where}: fp8 hidden states without {SCALE_KEY}")
        return False
    if len(scales) != len(hs):
        raise ValueError(f"{where}: {len(scales)} {SCALE_KEY} tensors for {len(hs)} hidden-state layers")
    for k, (q, s) in enumerate(zip(hs, scales)):
        if q.dtype != FP8 or tuple(s.shape) != tuple(q.shape[:-1]):
            raise ValueError(f"{where}: hidden_states[{k}] ({q.dtype}, {tuple(q.shape)}) does not fit "
                             f"{SCALE_KEY}[{k}] {tuple(s.shape)}")
    return True


def decode_hidden_states(sample: dict[str, Any], where: str) -> list[torch.Tensor]:
    """A sample's hidden states in `READ_DTYPE`: dequantised when the sample holds scales.

    Raises ``ValueError`` naming ``where`` when the scales do not fit the fp8 tensors."""
    if not check_scaled(sample, where):
        return list(sample["hidden_states"])
    return [dequantise_rows(q, s) for q, s in zip(sample["hidden_states"], sample[SCALE_KEY])]


def decoded(sample: dict[str, Any], where: str) -> dict[str, Any]:
    """``sample`` with its hidden states dequantised and its scales dropped (as a bf16 store serves it)."""
    if SCALE_KEY not in sample:
        return sample
    out = {k: v for k, v in sample.items() if k != SCALE_KEY}
    out["hidden_states"] = decode_hidden_states(sample, where)
    return out


# ---------------------------------------------------------------- batches: dequantised where the step runs
# A collated batch may carry a hidden-state tensor ``name`` as its fp8 payload: ``name`` holds the
# e4m3 bits as uint8 ``[..., G*H]`` (G layers side by side, as the shift concatenates them) and
# ``name + "_scale"`` their float32 scales ``[..., G]``. The trainer's ``to_device`` copies both
# and calls `dequantise_groups` there, so on a GPU a quarter of float32's bytes cross the bus and
# the loader's workers never dequantise.
PAYLOAD_SCALE_SUFFIX = "_scale"


def payload_scale_key(name: str) -> str:
    return name + PAYLOAD_SCALE_SUFFIX


def dequantise_groups(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = READ_DTYPE,
                      native: bool | None = None) -> torch.Tensor:
    """``q [..., G*H]`` (e4m3 bits, uint8 or float8_e4m3fn) times ``scale [..., G]`` per ``H``-wide
    group, in ``dtype``: bit for bit what `dequantise_rows` gives each group (float32 product,
    then one rounding to ``dtype``), in one pass of tensor ops over the whole batch.

    ``native`` (default: on CUDA) converts with torch's own e4m3 kernel, exact and fast there;
    otherwise `fp8_bits_to_float`'s bit moves (faster on the CPU). They differ only on the NaN
    pattern, which `quantise_rows` never writes for finite input."""
    groups = scale.shape[-1]
    if q.shape[:-1] != scale.shape[:-1] or groups == 0 or q.shape[-1] % groups:
        raise ValueError(f"fp8 payload {tuple(q.shape)} does not fit its scales {tuple(scale.shape)}")
    if native is None:
        native = q.device.type == "cuda"
    q8 = q.view(FP8) if q.dtype == torch.uint8 else q
    x = q8.float() if native else fp8_bits_to_float(q8)
    x = x.view(*q.shape[:-1], groups, q.shape[-1] // groups).mul_(scale.float().unsqueeze(-1))
    return x.to(dtype).view(q.shape)


def bytes_per_token(hidden_size: int, num_layers: int, storage: HiddenStatesDtype) -> int:
    """Hidden-state bytes one token costs on disk (tensor payload; file headers not counted)."""
    check_choice(storage)
    per_layer = hidden_size * 2 if storage == "bf16" else hidden_size + 4
    return per_layer * num_layers
