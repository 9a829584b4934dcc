"""What floating-point arithmetic a run gets, set once per process before the first kernel, and recorded in
env.json: the math mode of fp32 matrix products and convolutions, deterministic algorithms, cuDNN autotuning.

- `precision: fp32` means IEEE fp32 everywhere. On CUDA, torch 2.14 runs fp32 convolutions and RNNs in TF32
  unless told otherwise (cuDNN's fp32_precision defaults to "tf32"), which is not the arithmetic the CPU tests
  validate; the harness sets "ieee". `precision: tf32` asks for TF32 explicitly (fp32 weights, TF32 products).
- `speed.deterministic: true`: deterministic algorithms (torch.use_deterministic_algorithms, cuDNN deterministic,
  no autotuning, cuBLAS workspace config), so a resumed run on a GPU is bitwise the uninterrupted one at the same
  layout, at some cost in speed. Off (the default) on a GPU: cuDNN autotunes and may pick non-deterministic
  kernels (atomics in weight gradients), so two runs of the same config agree to round-off at the first step and
  then drift apart chaotically: the GPU promise is then statistical (the same distribution of results), not
  bitwise. On the CPU every kernel the harness uses is deterministic either way.
"""

from __future__ import annotations

import os

import torch


def configure(precision: str, deterministic: bool, device: torch.device) -> dict:
    """Set the process's math mode; return what was set (for env.json)."""
    fp32 = "tf32" if precision == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = fp32
    torch.backends.cudnn.conv.fp32_precision = fp32
    torch.backends.cudnn.rnn.fp32_precision = fp32
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible reductions; read when cuBLAS starts, so set it now.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the setter imports inductor: seconds
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    return {"fp32_math": fp32, "deterministic": deterministic, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "resume_promise": "bitwise at the same layout" if deterministic or device.type != "cuda"
            else "statistical (non-deterministic GPU kernels; set speed.deterministic: true for bitwise)"}
