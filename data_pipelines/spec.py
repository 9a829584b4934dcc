"""What a model needs to know about its data (`DataSpec`), from a shard directory's manifest or, when the
shards are not at hand (`harness plan` on a login node), from the standard datasets' sizes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits, cifar10, ...
    task: str  # classification | language_model | reconstruction
    num_train: int
    num_test: int
    num_classes: int = 0
    in_shape: tuple[int, ...] = ()  # (C, H, W) for images; (C, 1, L) for 1-D signals
    vocab_size: int = 0
    curvature: tuple[float, ...] = ()  # the noisy quadratic's Hessian diagonal (data_pipelines/nqm.py)


STREAMING = ("imagenet",)  # too large for memory: streamed from the shards by data_pipelines/stream.py

# The standard datasets' shapes, for `harness plan` when the shards are not at hand.
KNOWN = {
    "digits": DataSpec("digits", "classification", 1347, 450, 10, (1, 8, 8)),
    "cifar10": DataSpec("cifar10", "classification", 50000, 10000, 10, (3, 32, 32)),
    "cifar100": DataSpec("cifar100", "classification", 50000, 10000, 100, (3, 32, 32)),
    "mnist": DataSpec("mnist", "classification", 60000, 10000, 10, (1, 28, 28)),
    "mnist1d": DataSpec("mnist1d", "classification", 4000, 1000, 10, (1, 1, 40)),  # signals of length 40
    "imagenet": DataSpec("imagenet", "classification", 1281167, 50000, 1000, (3, 224, 224)),
    # Zaremba's PTB with <eos> per line: sizes in tokens.
    "ptb": DataSpec("ptb", "language_model", 929589, 82430, vocab_size=10000),
}


def spec_from_manifest(manifest: dict) -> DataSpec:
    splits = manifest["splits"]
    # Streamed JPEGs have no fixed shape: the reader crops data.image_size (the standard 224 shown here).
    shape = manifest.get("image_shape") or (KNOWN[manifest["kind"]].in_shape if manifest.get("kind") in STREAMING else ())
    return DataSpec(
        kind=manifest["kind"], task=manifest["task"], num_train=splits["train"]["size"],
        num_test=splits.get(manifest.get("eval_split", "test"), {}).get("size", 0),
        num_classes=len(manifest.get("classes", [])),
        in_shape=tuple(shape),
        vocab_size=manifest.get("vocab_size", 0),
        curvature=tuple((manifest.get("nqm") or {}).get("curvature", ())),
    )
