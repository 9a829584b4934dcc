"""Fake CUDA: run the project's real code on fake `cuda:0` tensors on a CPU-only machine, and record what a GPU
would do with it (the fake-CUDA test tier, tests/test_fake_cuda_*.py; user guide: docs/fake_cuda.md).

Under torch's FakeTensorMode a tensor made with device="cuda" is a FakeTensor: real shape, dtype, strides and
device, no data. Kernels run as shape functions, autocast("cuda") applies its CUDA casting rules, and mixing a
CPU tensor into a CUDA op raises FakeTensorDeviceMismatchError where a GPU would raise. What this module adds:

  * a dispatch mode that records, per phase of the run, every host sync a GPU would make: `.item()`/`bool()`
    (aten._local_scalar_dense), cuda->cpu copies, data-dependent shapes (nonzero, ...), blocking cpu->cuda copies
    (PyTorch's copy_ waits for the stream after a non-pinned, blocking host-to-device copy), and non_blocking
    copies from memory that was never pinned (asynchronous only from pinned memory);
  * `CudaDouble`: test doubles of the torch.cuda functions the project calls; each records its arguments and
    checks them against what the real function accepts (e.g. set_rng_state takes a CPU ByteTensor);
    torch.cuda.is_available() is True for the project's own frames only (torch's internals keep the truth);
  * a replacement for Tensor.backward: the autograd engine cannot run on fake CUDA tensors (torch 2.14.1 CPU:
    "hasPrimaryContext expects a valid device index"). The replacement walks the autograd graph from the loss,
    gives every reachable leaf a zero gradient of its own shape/dtype/device, and runs the project's own
    autograd Functions' backward (ghost BN) on zero gradients. Exercised: every forward op, the graph's
    reachability, the custom backward's arithmetic, everything after backward (clipping, noise scale, SGD).
    Not exercised: torch's built-in backward kernels (they are torch's, not the project's).

Values read back to the host are dummies (-1.0 for floats, 0 or arange for integers, True for bools): numbers
from a fake run mean nothing; shapes, dtypes, devices, memory formats and the syncs do.
The prototype this follows: the shared tools' fakecuda (same ideas; this copy is the project's own).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = str(Path(__file__).resolve().parent.parent)
aten = torch.ops.aten
SYNC = "sync"  # the kinds of record that make the host wait for the device start with this


def _ops(*names):
    out = set()
    for name in names:
        base, _, overload = name.partition(".")
        packet = getattr(aten, base, None)
        if packet is not None and hasattr(packet, overload or "default"):
            out.add(getattr(packet, overload or "default"))
    return out


# Ops whose output shape depends on the data: the host must read the device to size the output.
DATA_DEPENDENT = _ops("nonzero", "masked_select", "_unique2", "unique_consecutive", "unique_dim",
                      "repeat_interleave.Tensor", "equal", "argwhere")
FUSED_SGD = _ops("_fused_sgd_", "_fused_sgd_.tensor_lr")


def project_frames() -> list[str]:
    """The project's own frames (not tests/, not site-packages) of the current stack, outermost first."""
    out = []
    for fs in traceback.extract_stack()[:-2]:
        if _ours(fs.filename):
            out.append(f"{fs.filename[len(ROOT) + 1:]}:{fs.lineno} {fs.name}")
    return out


def _ours(filename: str) -> bool:
    return (filename.startswith(ROOT + "/") and "/.venv/" not in filename and "site-packages" not in filename
            and not filename.startswith(ROOT + "/tests/"))


@dataclass
class Record:
    phase: str
    kind: str
    detail: str
    frames: list[str] = field(default_factory=list)

    @property
    def site(self) -> str:
        return self.frames[-1] if self.frames else "<outside the project>"


class FakeCuda(TorchDispatchMode):
    """`with FakeCuda() as fc:` ... the project's code with device cuda ...; then fc.syncs(phase), fc.calls, ..."""

    def __init__(self):
        super().__init__()
        self.records: list[Record] = []
        self.pinned: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so that ids stay unique)
        self.phase = "setup"
        self.cuda = CudaDouble(self)
        self.custom_backward = collections.Counter()  # the project's autograd Functions run by the graph walk
        self.ops = collections.Counter()  # (op name, output dtype) of matrix products and convolutions on cuda
        self.convs: list[tuple[int, bool, bool]] = []  # 2-D convolutions: (input channels, input CL, weight CL)
        self._undo: list = []

    # ---- records
    def record(self, kind: str, detail: str) -> None:
        self.records.append(Record(self.phase, kind, detail, project_frames()))

    def syncs(self, *phases: str) -> list[Record]:
        return [r for r in self.records if r.kind.startswith(SYNC) and (not phases or r.phase in phases)]

    def kinds(self, prefix: str, *phases: str) -> list[Record]:
        return [r for r in self.records if r.kind.startswith(prefix) and (not phases or r.phase in phases)]

    def describe(self, records) -> str:
        return "\n".join(f"[{r.phase}] {r.kind} {r.detail} at {r.site}" for r in records)

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def phased(self, phase, fn):
        """`fn` wrapped to run in `phase` (a name, or a function of fn's arguments giving one)."""
        def wrapper(*args, **kwargs):
            with self.in_phase(phase(*args, **kwargs) if callable(phase) else phase):
                return fn(*args, **kwargs)
        return wrapper

    # ---- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _host_only(func, args, kwargs):  # what the host computes on a GPU machine too: real values
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        first = args[0] if args else None
        on_cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
        if func is aten._local_scalar_dense.default:
            if first.device.type == "cuda":
                self.record(f"{SYNC} item", f"{tuple(first.shape)} {first.dtype}")
            return True if first.dtype == torch.bool else (-1.0 if first.dtype.is_floating_point else 0)
        if func in DATA_DEPENDENT and on_cuda:
            self.record(f"{SYNC} data-dependent shape", str(func))
            if func is aten.nonzero.default:
                return torch.zeros((first.numel(), first.dim()), dtype=torch.int64, device=first.device)
            if func is aten.equal.default:
                return True
        if func in FUSED_SGD:
            return self._fused_sgd(args, kwargs)
        if func is aten._pin_memory.default:
            self.record("pin_memory", f"{tuple(first.shape)}")
            self.pinned[id(first)] = first
            return first
        if func is aten.is_pinned.default:
            return id(first) in self.pinned
        if func is aten._to_copy.default:
            dst = torch.device(kwargs["device"]) if kwargs.get("device") is not None else first.device
            if first.device.type == "cuda" and dst.type == "cpu":
                self.record(f"{SYNC} cuda->cpu copy", f"{tuple(first.shape)} {first.dtype}")
                return _dummy_cpu(first, kwargs.get("dtype") or first.dtype)
            if first.device.type == "cpu" and dst.type == "cuda":
                self._host_to_device(first, kwargs.get("non_blocking", False))
        if func is aten.copy_.default and isinstance(args[1], torch.Tensor):
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type == "cuda":
                self.record(f"{SYNC} cuda->cpu copy_", f"{tuple(src.shape)}")
            elif dst.device.type == "cuda" and src.device.type == "cpu" and src.dim() > 0:
                self._host_to_device(src, args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        out = func(*args, **kwargs)
        if on_cuda and func in _MATMULS:
            self.ops[(func.overloadpacket.__name__, out.dtype)] += 1
            if func is aten.convolution.default and first.dim() == 4:
                cl = torch.channels_last
                self.convs.append((first.shape[1], first.is_contiguous(memory_format=cl),
                                   args[1].is_contiguous(memory_format=cl)))
        return out

    def _host_to_device(self, src: torch.Tensor, non_blocking: bool) -> None:
        if not non_blocking:
            self.record(f"{SYNC} blocking cpu->cuda copy", f"{tuple(src.shape)} {src.dtype}")
        elif id(src) not in self.pinned and src.numel() > 1:
            self.record("non_blocking copy from unpinned memory", f"{tuple(src.shape)} {src.dtype}")
        else:
            self.record("async cpu->cuda copy", f"{tuple(src.shape)}")

    def _fused_sgd(self, args, kwargs):
        """aten._fused_sgd_ has no fake kernel: check what the CUDA kernel checks (one device, matching shapes and
        dtypes, a tensor lr on that device), update nothing."""
        params, grads, bufs = args[0], args[1], args[2]
        devices = {t.device for t in [*params, *grads, *bufs]}
        lr = kwargs.get("lr", args[5] if len(args) > 5 else None)
        if isinstance(lr, torch.Tensor):
            devices.add(lr.device)
        assert devices == {torch.device("cuda", 0)}, f"_fused_sgd_ tensors on {devices}"
        assert all(p.shape == g.shape and p.dtype == g.dtype for p, g in zip(params, grads)), "fused SGD shapes"
        self.record("fused_sgd", f"{len(params)} params, lr {type(lr).__name__}")

    # ---- install
    def _patch(self, obj, name, value) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self):
        import torch.cuda.amp.common as amp_common

        self.cuda.install(self._patch)
        self._patch(amp_common, "amp_definitely_not_available", lambda: False)  # autocast("cuda") on a CPU build
        # The DataLoader pins batches (pin_memory=True) only where torch.accelerator says there is one.
        self._patch(torch.accelerator, "is_available", lambda: True)
        self._patch(torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda"))
        self._patch(torch.Tensor, "backward", _graph_walk_backward(self))
        self._patch(torch.nn.Module, "to", _module_to)
        self._patch(FakeTensor, "tolist", _tolist)
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)
        self.fake.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.fake.__exit__(*exc)
            for obj, name, old in reversed(self._undo):
                setattr(obj, name, old)
            self._undo.clear()


def _host_only(func, args, kwargs) -> bool:
    """An op on real CPU tensors only, making no CUDA tensor: run it for real (data loading, index arithmetic,
    crop draws and RNG on the host keep their values; only device tensors are fake)."""
    if func in (aten._pin_memory.default, aten.is_pinned.default):
        return False
    if any(isinstance(a, FakeTensor) for a in tree_leaves((args, kwargs))):
        return False
    device = kwargs.get("device")
    return device is None or torch.device(device).type == "cpu"


_MATMULS = _ops("convolution", "mm", "addmm", "bmm", "baddbmm")  # (nn.Linear and the LSTM reach these)


_FAKE_TOLIST = FakeTensor.tolist


def _tolist(self):
    """Tensor.tolist as PyTorch does it for a device tensor: ONE copy to the host, then a list of the host copy
    (torch/csrc/utils/tensor_list.cpp, tensor_to_list). FakeTensor.tolist reads element by element instead, which
    would count one sync per element."""
    return self.cpu().tolist() if self.device.type == "cuda" else _FAKE_TOLIST(self)


def _dummy_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A real CPU tensor standing for the values a GPU would have sent back."""
    with unset_fake_temporarily():
        if dtype == torch.bool:
            return torch.ones(t.shape, dtype=dtype)
        if dtype.is_floating_point or dtype.is_complex:
            return torch.full(t.shape, -1.0, dtype=dtype)
        return torch.arange(t.numel(), dtype=dtype).reshape(t.shape)


def _cpu_byte_tensor(t, what: str) -> None:
    assert isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.uint8, \
        f"{what} takes a CPU ByteTensor, got {type(t).__name__} {getattr(t, 'device', '')} {getattr(t, 'dtype', '')}"


def _device_arg(d, what: str) -> None:
    assert d is None or isinstance(d, int) or (isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda"), \
        f"{what}: a CUDA device, index or None, got {d!r}"


class CudaDouble:
    """Doubles of the torch.cuda functions the project calls: each records (name, args, kwargs, project frames)
    and checks its arguments against the real signature (torch/cuda/__init__.py, torch/cuda/random.py)."""

    def __init__(self, fc: FakeCuda, devices: int = 1):
        self.fc, self.devices = fc, devices
        self.calls: list[tuple[str, tuple, dict, list[str]]] = []

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]

    def install(self, patch) -> None:
        real_available = torch.cuda.is_available

        def is_available():
            if _ours(sys._getframe(1).f_code.co_filename):
                self.calls.append(("is_available", (), {}, project_frames()))
                return True
            return real_available()

        patch(torch.cuda, "is_available", is_available)
        for name in ("device_count", "set_device", "current_device", "synchronize", "get_rng_state", "set_rng_state",
                     "manual_seed_all", "manual_seed", "get_device_name", "max_memory_allocated",
                     "reset_peak_memory_stats", "is_bf16_supported"):
            patch(torch.cuda, name, self._recorded(name, getattr(self, name)))

    def _recorded(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs, project_frames()))
            return fn(*args, **kwargs)
        return call

    # Each double: the real function's signature, its argument checks, a plausible result.
    def device_count(self) -> int:
        return self.devices

    def set_device(self, device) -> None:
        _device_arg(device, "torch.cuda.set_device")
        index = device if isinstance(device, int) else torch.device(device).index
        assert index is not None and 0 <= index < self.devices, f"set_device({device!r}) with {self.devices} GPUs"
        self.current = index

    current = 0

    def current_device(self) -> int:
        return self.current

    def synchronize(self, device=None) -> None:
        _device_arg(device, "torch.cuda.synchronize")

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        _device_arg(device, "torch.cuda.get_rng_state")
        with unset_fake_temporarily():
            return torch.zeros(16, dtype=torch.uint8)  # the real one: a CPU ByteTensor (the Philox seed and offset)

    def set_rng_state(self, new_state, device="cuda") -> None:
        _cpu_byte_tensor(new_state, "torch.cuda.set_rng_state")
        _device_arg(device, "torch.cuda.set_rng_state")

    def manual_seed_all(self, seed) -> None:
        assert isinstance(seed, int), f"torch.cuda.manual_seed_all takes an int, got {seed!r}"

    def manual_seed(self, seed) -> None:
        self.manual_seed_all(seed)

    def get_device_name(self, device=None) -> str:
        _device_arg(device, "torch.cuda.get_device_name")
        return "Fake GPU"

    def max_memory_allocated(self, device=None) -> int:
        _device_arg(device, "torch.cuda.max_memory_allocated")
        return 0

    def reset_peak_memory_stats(self, device=None) -> None:
        _device_arg(device, "torch.cuda.reset_peak_memory_stats")

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return True


def _module_to(self, *args, **kwargs):
    """nn.Module.to for fake tensors (torch swaps the tensors in place, which FakeTensors refuse): new Parameters
    and buffers by the same conversion rules (floating-point dtypes only; memory_format for 4-D tensors)."""
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)

    def convert(t):
        fmt = {"memory_format": memory_format} if memory_format is not None and t.dim() == 4 else {}
        return t.to(device, dtype if t.is_floating_point() else None, non_blocking, **fmt)

    with torch.no_grad():
        for m in self.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = torch.nn.Parameter(convert(p.detach()), requires_grad=p.requires_grad)
            for k, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[k] = convert(b)
    return self


# Outputs of the project's autograd Functions (models/ghost_bn.py): how many gradients each backward receives.
_CUSTOM_OUTPUTS = {"_LocalGroups": 4, "_AcrossRanks": 3}


def _graph_walk_backward(fc: FakeCuda):
    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        assert self.grad_fn is not None, "backward() of a tensor that does not require grad"
        seen, stack = set(), [self.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf
                v = node.variable
                g = torch.zeros_like(v)
                v.grad = g if v.grad is None else v.grad + g
                continue
            cls = getattr(node, "_forward_cls", None)
            if cls is not None and cls.__module__.startswith("models."):
                _custom_backward(fc, node, cls)
            stack.extend(nxt for nxt, _ in node.next_functions)
    return backward


def _custom_backward(fc: FakeCuda, node, cls) -> None:
    """The project's Function's backward on a zero gradient of its first output; its input gradients must have
    the inputs' shapes and devices (what the autograd engine would check)."""
    saved = node.saved_tensors
    grads = [torch.zeros_like(saved[0])] + [None] * (_CUSTOM_OUTPUTS.get(cls.__name__, 1) - 1)
    with torch.autocast("cuda", enabled=False), torch.no_grad():
        out = cls.backward(node, *grads)
    fc.custom_backward[cls.__name__] += 1
    for o, want in zip(out if isinstance(out, tuple) else (out,), saved[:2]):
        if o is not None:
            assert o.shape == want.shape and o.device == want.device, (cls.__name__, o.shape, want.shape, o.device)
