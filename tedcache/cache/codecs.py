"""How states are stored: fp32, fp16, bf16 (its bits in uint16) or int8 with per-channel and per-token
scales; and their decoding (`CompactStates.widen`, after the move to the training device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

STATE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int8": np.int8}


def calibrate_channel_scales(states: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS over calibration tokens (n, d): dividing by it puts every channel on one scale."""
    return states.float().pow(2).mean(0).sqrt().clamp_min(1e-6)


PAD_TOKEN_SCALE = 2 ** -14  # the smallest int8 per-token scale: what an all-zero (padding) row gets


def encode_states(states: torch.Tensor, precision: str, channel_scale: torch.Tensor | None = None):
    """(n, d) float -> (stored values, per-token scales or None), tensors on the states' device. int8:
    x / channel_scale, then a per-token absmax scale (stored in fp16; quantisation uses the rounded scale so
    decoding is exact to it). bf16 values stay bfloat16 here (`as_stored` gives their bits)."""
    if precision == "int8":
        normalised = states.float() / channel_scale
        token_scale = (normalised.abs().amax(-1) / 127).clamp_min(PAD_TOKEN_SCALE).half()
        q = torch.round(normalised / token_scale.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return q, token_scale
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return states.to(dtype), None


def as_stored(values: torch.Tensor) -> np.ndarray:
    """A host tensor of encoded values as the array the cache stores (bf16 as its bits in uint16)."""
    return values.view(torch.uint16).numpy() if values.dtype == torch.bfloat16 else values.numpy()


class EncodedStates(NamedTuple):  # a tuple, so that HostCopies moves its tensors
    """One unit's states of one layer as stored, with the float64 moments of their float values
    ([tokens, per-channel sums (d,), sum of squares ()]) that the cache's state variance comes from."""

    values: torch.Tensor  # (tokens, d)
    token_scale: torch.Tensor | None  # (tokens,) fp16, int8 only
    moments: list


class UnitStates:
    """One layer's states over one unit, added batch by batch as (tokens, d) float tensors on the device
    that computed them. Each batch is encoded there, so only the stored bytes cross to the host and the
    writer thread only pads, writes and checksums; the exception is the first training unit of an int8 cache,
    whose states set the channel scales: its float states wait on the host until `finish(channel_scale)`."""

    def __init__(self, precision: str, channel_scale: torch.Tensor | None, device: torch.device):
        self.precision = precision
        self.calibrating = precision == "int8" and channel_scale is None
        self.channel_scale = None if channel_scale is None else channel_scale.to(device)
        self.parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.floats: list[torch.Tensor] = []
        self.count, self.sums, self.squares = 0, 0.0, 0.0

    def add(self, states: torch.Tensor) -> None:
        self.count += len(states)
        self.sums = self.sums + states.sum(0, dtype=torch.float64)
        self.squares = self.squares + states.double().square().sum()
        if self.calibrating:
            self.floats.append(states.cpu())
        else:
            self.parts.append(encode_states(states, self.precision, self.channel_scale))

    def float_states(self) -> torch.Tensor:
        """The unit's float states (calibrating units only), what `calibrate_channel_scales` reads."""
        return torch.cat(self.floats)

    def finish(self, channel_scale: torch.Tensor | None = None) -> EncodedStates:
        """The unit encoded, where it was computed (nothing waits for the device); a calibrating unit is
        encoded with `channel_scale`."""
        if self.calibrating:
            self.parts = [encode_states(part, self.precision, channel_scale) for part in self.floats]
        values = torch.cat([v for v, _ in self.parts])
        token_scale = torch.cat([s for _, s in self.parts]) if self.precision == "int8" else None
        return EncodedStates(values, token_scale, [self.count, torch.as_tensor(self.sums), torch.as_tensor(self.squares)])


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


def planned_bytes(tokens: int, examples: int, state_widths: list[int], precision: str, logit_rows: tuple[str, int] | None,
                  per_token_outputs: bool) -> int:
    """About what a cache takes on disk, uncompressed: per token its id (4 bytes), each stored state of
    `state_widths` (and int8's 2-byte token scale), a causal LM's rows (`logit_rows`: ("hidden", the final
    state's width), or (kind, entries a token): an id, a log-probability, a sample's count) and, with
    `per_token_outputs`, its labels, outputs and spans; per example its outputs."""
    value = np.dtype(STATE_DTYPES[precision]).itemsize
    per_token = 4 + sum(width * value + (2 if precision == "int8" else 0) for width in state_widths)
    if logit_rows is not None and logit_rows[0] == "hidden":
        per_token += logit_rows[1] * value
    elif logit_rows is not None:
        per_token += logit_rows[1] * (4 + 2 + (1 if logit_rows[0] == "sample" else 0))
    if per_token_outputs:
        per_token += 4 * 2 * 2  # token labels, per-token outputs, spans
    return tokens * per_token + examples * 4 * 8
