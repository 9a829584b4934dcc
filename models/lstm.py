"""Word-level LSTM language model, Zaremba et al. 2014 "medium" (the paper's appendix B.2).

Embedding (vocab x hidden) -> `layers` LSTM layers of `hidden` units -> linear softmax layer over the
vocabulary (the vocabulary comes from the data: 10,000 words for PTB; no weight tying). Every parameter is
initialised U(-init_range, init_range), biases included, as in Zaremba's code. Dropout with probability
`dropout` on the non-recurrent connections only: the embedding output, between LSTM layers and before the
softmax layer (layers + 1 places, a fresh mask per time step); the recurrent h -> h path is never dropped.
Each LSTM layer has two bias vectors (torch's b_ih and b_hh), exactly like Zaremba's two nn.Linear maps
i2h and h2h. Medium (2 x 650, vocab 10,000): 19,780,400 parameters.

Training unrolls `unroll` (35) steps; the hidden state is carried from one batch to the next and reset at
each epoch (see data_pipelines.text and harness.train.objectives.LanguageModel). Dropout masks are keyed per
(seed, step, stream) (models.dropout), so training is layout invariant. Tiny variant for tests:
layers 2, hidden 16, unroll 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from harness.core.configlib import positive
from models.dropout import KeyedDropout
from models.registry import ModelConfig, register


@dataclass
class LSTMConfig(ModelConfig):
    name: Literal["lstm"] = "lstm"
    layers: int = positive(2)
    hidden: int = positive(650)
    # Dropout on the non-recurrent connections (embedding output, between layers, before the softmax).
    dropout: float = 0.5
    # Truncated back-propagation length: tokens per stream per step.
    unroll: int = positive(35)
    # Every parameter starts U(-init_range, init_range).
    init_range: float = positive(0.05)

    def validate(self, path: str) -> None:
        from harness.core.errors import ConfigError

        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key {path}.dropout: a probability in [0, 1), got {self.dropout}")

    def sequence_length(self) -> int:
        return self.unroll


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, layers: int, dropout: float, init_range: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.drop = nn.ModuleList(KeyedDropout(dropout) for _ in range(layers + 1))
        self.rnns = nn.ModuleList(nn.LSTM(hidden, hidden, batch_first=True) for _ in range(layers))
        self.decoder = nn.Linear(hidden, vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """tokens (B, T) -> logits (B, T, vocab), state (h, c), each (layers, B, hidden); state None: zeros."""
        x = self.drop[0](self.embedding(tokens))
        hs, cs = [], []
        for i, rnn in enumerate(self.rnns):
            x, (h, c) = rnn(x, None if state is None else (state[0][i : i + 1], state[1][i : i + 1]))
            x = self.drop[i + 1](x)
            hs.append(h)
            cs.append(c)
        return self.decoder(x), (torch.cat(hs), torch.cat(cs))


@register(LSTMConfig)
def build(cfg: LSTMConfig, spec) -> nn.Module:
    from harness.core.errors import ConfigError

    if spec.task != "language_model" or spec.vocab_size < 1:
        raise ConfigError(f"config key model.name: lstm needs token-stream data (data.name: ptb); "
                          f"data {spec.kind!r} is {spec.task} data")
    return LSTMLanguageModel(spec.vocab_size, cfg.hidden, cfg.layers, cfg.dropout, cfg.init_range)
