"""TED filters (one per tapped layer) and the throw-away Stage-I task heads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load, save
from torch import nn

from .taps import in_own_dtype, pooled


@dataclass
class FilterSpec:
    layers: list[int]  # 0-based tapped layers, one filter each
    in_dim: int
    out_dim: int
    kind: str = "linear"  # "linear" or "mlp"


class FilterBank(nn.Module):
    """filters[j] maps the hidden state of layers[j] (B, L, in_dim) to (B, L, out_dim)."""

    def __init__(self, spec: FilterSpec, filters: list[nn.Module] | None = None):
        super().__init__()
        self.spec = spec
        self.filters = nn.ModuleList(filters if filters is not None else (self._make(spec) for _ in spec.layers))

    @staticmethod
    def _make(spec: FilterSpec) -> nn.Module:
        if spec.kind == "linear":
            return nn.Linear(spec.in_dim, spec.out_dim)
        return nn.Sequential(nn.Linear(spec.in_dim, spec.in_dim), nn.GELU(), nn.Linear(spec.in_dim, spec.out_dim))

    def forward(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f(h) for f, h in zip(self.filters, hidden_states)]

    def select(self, layers: list[int]) -> "FilterBank":
        """A bank holding only the filters of `layers` (the same modules, not copies)."""
        spec = FilterSpec(list(layers), self.spec.in_dim, self.spec.out_dim, self.spec.kind)
        return FilterBank(spec, [self.filters[self.spec.layers.index(layer)] for layer in layers])

    def to_bytes(self) -> dict[str, bytes]:
        """{".safetensors": weights, ".json": spec}: what a cache stores for its teacher filters."""
        weights = save({k: v.detach().contiguous() for k, v in self.state_dict().items()})
        return {".safetensors": weights, ".json": json.dumps(asdict(self.spec)).encode()}

    @classmethod
    def from_bytes(cls, files: dict[str, bytes]) -> "FilterBank":
        bank = cls(FilterSpec(**json.loads(files[".json"])))
        bank.load_state_dict(load(files[".safetensors"]))
        return bank


class SequenceHead(nn.Module):
    """Stage-I head on a filter's output at one position (see taps.pooled: token 0 for encoders, the last
    real token for decoder-only models): the shape of a BERT classification head."""

    def __init__(self, dim: int, num_outputs: int, last_token: bool = False, dropout: float = 0.1):
        super().__init__()
        self.last_token = last_token
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, num_outputs))

    def forward(self, filtered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(pooled(filtered, mask, self.last_token))


class TokenHead(nn.Module):
    """Stage-I head on a filter's output at every token (token classification): the shape of HF's token
    classification heads (dropout, then a linear map to the tags)."""

    def __init__(self, dim: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_outputs))

    def forward(self, filtered: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(filtered)


class LMHead(nn.Module):
    """Stage-I next-token head on a filter's output (causal-lm).

    "tied": the model's own frozen output embedding after a trainable Linear(d_f -> d), so a filter is
    judged by what the model's vocabulary projection reads from it (d_f x d trainable weights).
    "new": a fresh trainable Linear(d_f -> vocab) (d_f x vocab weights: ~28M for SmolLM2 at d_f = 576)."""

    def __init__(self, dim: int, output_embedding: nn.Module, kind: str = "tied"):
        super().__init__()
        self.kind = kind
        if kind == "tied":
            self.project = nn.Linear(dim, output_embedding.in_features, bias=False)
            self.frozen = [output_embedding]  # a list, so the frozen weights are not this module's parameters
        else:
            self.project = nn.Linear(dim, output_embedding.out_features)

    def forward(self, filtered: torch.Tensor) -> torch.Tensor:
        hidden = self.project(filtered)
        return in_own_dtype(self.frozen[0], hidden) if self.kind == "tied" else hidden
