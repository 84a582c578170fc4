"""Activation functions by the names HuggingFace configs use (``hidden_act``, ``conv_act``).

Only names whose HF meaning we reproduce exactly are listed; any other name is rejected by the config.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # HF's "gelu_new" (the GPT-2/BERT-TF formula), written out so it matches bit for bit in fp32.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact erf GELU: what every released DeBERTa uses
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_new,
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None
