"""In-memory reader for token streams (PTB) for the LSTM language model, batched as Zaremba et al. 2014.

The training split (one stream of N token ids, data_pipelines.tokens) is cut into B equal streams, B being
the global batch size: stream b is tokens [b L, (b+1) L) with L = N // B (the tail is dropped, as in
Zaremba's reader). An epoch is S_e = (L - 1) // T steps of T = unroll tokens; step i of the run is step
j = i mod S_e of its epoch and reads, for every stream b, inputs stream[b, jT : jT+T] and targets shifted by
one. Every epoch reads the streams in the same order (Zaremba does not shuffle: the state carried across
consecutive batches needs the continuation of each stream), and the hidden state is reset at each epoch start.

Ordering guarantee: sequence position b of every global batch is stream b; this rank's micro-batch (a, r)
holds streams `plan.micro_slice(a, r)`, whatever the layout, so a rank owns fixed streams and the state it
carries for them (harness.train.objectives.LanguageModel) is exactly the single-process one.
Dropout keys: one 64-bit key per (seed, step, stream) (order.example_keys with the step in the epoch slot).

Evaluation (Zaremba's): the test split as ONE stream from a zero state, every token predicted from all
the tokens before it; exp(mean cross-entropy) is the test perplexity. That stream cannot be split over
ranks without changing it, so rank 0 evaluates it alone (in chunks of `eval_batch_size` tokens, the state
carried between chunks) and the other ranks contribute nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from data_pipelines.order import device_example_keys
from data_pipelines.spec import DataSpec
from data_pipelines.tokens import load_tokens
from harness.core.errors import PlanError
from harness.recipe.budget import lm_steps_per_epoch


class StreamBatch(NamedTuple):
    """One micro-batch of token streams. `streams` = (first, last + 1) stream positions in the global batch,
    or None for the evaluation stream; `reset`: start from a zero state (first step of an epoch)."""

    inputs: torch.Tensor  # (streams, T) int64
    targets: torch.Tensor  # (streams, T) int64
    keys: torch.Tensor | None  # (streams,) int64 dropout keys; None in evaluation
    streams: tuple[int, int] | None
    total_streams: int
    reset: bool


class TokenStreams:
    def __init__(self, path, manifest, plan, seed, rank, device, unroll: int, eval_batch_size: int):
        root = Path(path)
        self.plan, self.seed, self.rank, self.device = plan, seed, rank, device
        self.unroll, self.eval_batch_size = unroll, eval_batch_size
        train = load_tokens(root, manifest, "train")
        self.test = load_tokens(root, manifest, "test").to(device)
        b = plan.global_batch_size
        self.steps_per_epoch = lm_steps_per_epoch(len(train), b, unroll)
        if self.steps_per_epoch < 1:
            raise PlanError(
                f"the training split of {root} has {len(train)} tokens: too few for {b} streams x "
                f"{unroll + 1} tokens (unroll + 1); lower batch.global_batch_size or model.unroll"
            )
        length = len(train) // b
        self.streams = train[: b * length].view(b, length).to(device)
        self.spec = DataSpec(kind=manifest["kind"], task="language_model", num_train=len(train),
                             num_test=len(self.test), vocab_size=manifest["vocab_size"])

    def train_micro_batches(self, step: int) -> list[StreamBatch]:
        j = step % self.steps_per_epoch
        t0, t = j * self.unroll, self.unroll
        out = []
        for a in range(self.plan.accumulation_steps):
            lo, hi = self.plan.micro_slice(a, self.rank)
            # The keys are made on the device (bit for bit order.example_keys): a host array copied there would be
            # a blocking host-to-device copy, a wait for the GPU, every step (found by tests/test_fake_cuda_train.py).
            streams = torch.arange(lo, hi, dtype=torch.int64, device=self.device)
            keys = device_example_keys(self.seed, torch.full_like(streams, step), streams)
            out.append(StreamBatch(
                self.streams[lo:hi, t0 : t0 + t], self.streams[lo:hi, t0 + 1 : t0 + t + 1],
                keys, (lo, hi), self.plan.global_batch_size, j == 0,
            ))
        return out

    def eval_batches(self, split: str = "test"):
        """Rank 0: the whole test stream in chunks (state carried); other ranks: nothing. Split "train"
        (eval.train_loss): the training tokens the streams hold, read as one stream in the same way."""
        if self.rank != 0:
            return
        tokens = self.test if split == "test" else self.streams.reshape(-1)
        x, y = tokens[:-1], tokens[1:]
        for start in range(0, len(x), self.eval_batch_size):
            stop = min(len(x), start + self.eval_batch_size)
            yield StreamBatch(x[None, start:stop], y[None, start:stop], None, None, 1, start == 0)
