"""How states are stored: fp32, fp16, bf16 (its bits in uint16) or int8 with per-channel and per-token
scales; and their decoding (`CompactStates.widen`, after the move to the training device)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STATE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}


def calibrate_channel_scales(states: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS over calibration tokens (n, d): dividing by it puts every channel on one scale."""
    return states.float().pow(2).mean(0).sqrt().clamp_min(1e-6)


def encode_states(states: torch.Tensor, precision: str, channel_scale: torch.Tensor | None = None):
    """(n, d) float -> (stored values, per-token scales or None). int8: x / channel_scale, then a per-token
    absmax scale (stored in fp16; quantisation uses the rounded scale so decoding is exact to it)."""
    if precision == "int8":
        normalised = states.float() / channel_scale
        token_scale = (normalised.abs().amax(-1) / 127).clamp_min(2 ** -14).half()
        q = torch.round(normalised / token_scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return q.numpy(), token_scale.numpy()
    if precision == "bf16":
        return states.to(torch.bfloat16).view(torch.uint16).numpy(), None
    return states.to(torch.float32 if precision == "fp32" else torch.float16).numpy(), None


def decode_values(values: np.ndarray, precision: str) -> torch.Tensor:
    """Stored values as a tensor of their real dtype (bf16 bits reinterpreted; int8 still scaled)."""
    tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if precision == "bf16" else tensor


@dataclass
class CompactStates:
    """Cached states as stored, (B, L, d), plus what decoding needs; `widen` dequantises where it is
    called (after the move to the training device, so the transfer stays compact)."""

    values: torch.Tensor
    token_scale: torch.Tensor | None = None  # (B, L) fp16, int8 only
    channel_scale: torch.Tensor | None = None  # (d,) fp32, int8 only

    def to(self, device, non_blocking: bool = False) -> "CompactStates":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return CompactStates(move(self.values), move(self.token_scale), move(self.channel_scale))

    def pin_memory(self) -> "CompactStates":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return CompactStates(pin(self.values), pin(self.token_scale), pin(self.channel_scale))

    def widen(self, dtype=torch.float32) -> torch.Tensor:
        if self.values.dtype == torch.int8:
            return (self.values.to(dtype) * self.token_scale.to(dtype).unsqueeze(-1)) * self.channel_scale.to(dtype)
        return self.values.to(dtype)
