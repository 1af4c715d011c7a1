"""Fast, result-preserving execution of a U-Net on one device.

:func:`prepare_model` wraps a network into a callable ``f(x) -> {head: tensor}`` that runs it
in inference mode with the fastest execution path measured for the device and precision
(``benchmarks/cpu_paths.py``; figures in ``benchmarks/THROUGHPUT_NOTES.md``)::

    f = prepare_model(model, device="cpu", precision="bf16")
    out = f(x)          # x: (N, C, *spatial) float32 on the device; out: float32, contiguous

Paths (each can be forced on or off; ``None`` takes the measured default):

- ``channels_last``: model weights and input in ``torch.channels_last_3d`` (5D) or
  ``torch.channels_last`` (4D). oneDNN then runs every conv in NDHWC without re-laying out
  activations between layers; cuDNN uses its tensor-core kernels.
- ``compile``: ``torch.compile(dynamic=False)``, with inductor's ``freezing`` on CPU (weights
  become constants, oneDNN weights pre-packed). One compilation per input shape costs tens of
  seconds on a small CPU, so only shapes met ``compile_min_calls`` times (or ``example_shape``,
  compiled at once) are compiled, at most ``max_compiled_shapes`` of them; other shapes (edge
  blocks) run the eager fast path. Freezing bakes the weights in: prepare again after changing
  them. Any compile failure (no C++ compiler, unsupported platform) falls back to eager with a
  warning.
- ``onednn_conv`` (CPU, fp32, eager): every zero-padded Conv2d/Conv3d calls oneDNN
  (``aten.mkldnn_convolution``) directly. PyTorch otherwise sends a conv whose
  ``N*C*D*H <= 20480`` (the 1-channel first conv of most blocks, the deepest convs of small
  ones) to its im2col ``slow_conv3d`` plus layout copies; same arithmetic, 5-8% less time for the
  whole 3D net. Autocast does not cover that op, so it is never used with bf16/fp16 (there
  autocast's convs already run in oneDNN).
- precision ``"bf16"``/``"fp16"``: ``torch.autocast`` around the call, as
  :class:`bigcare.predictors.care.CAREPredictor` does. fp16 on a CPU without AVX-512 FP16 is
  emulated and far slower than fp32 (a warning says so).

The callable returns float32 tensors in the default (contiguous) memory format whatever path
ran, so callers see the same tensors as from the plain model, up to rounding. The caller's
module is never modified (a copy is prepared).
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings

import torch

from bigcare.types import PRECISIONS, check_choice

__all__ = ["prepare_model", "FastModel", "default_paths", "TORCH_DTYPES"]

#: The autocast dtype of each precision (None: plain float32).
TORCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Defaults per device type and precision: (channels_last, compile), chosen from the CPU and GPU
#: measurements in benchmarks/THROUGHPUT_NOTES.md (CUDA: the standard cuDNN recipe, channels_last
#: + cudnn.benchmark; compile off until measured).
_DEFAULTS = {
    ("cpu", "fp32"): (True, False),
    ("cpu", "bf16"): (True, False),
    ("cpu", "fp16"): (True, False),
    ("cuda", "fp32"): (True, False),
    ("cuda", "bf16"): (True, False),
    ("cuda", "fp16"): (True, False),
}


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (not emulated through float32).

    GPUs: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPUs: the AVX512_BF16 or AMX
    instructions, read from ``/proc/cpuinfo`` (torch reports only "AVX512" for both kinds of
    AVX-512 CPU); elsewhere (no such file) False.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """The precision that runs: ``auto`` becomes bf16 where :func:`native_bf16`, else fp32.

    On this project's AVX512_BF16 CPU bf16 runs the default network 1.76x (plain) to 2.40x
    (channels-last) faster than fp32 plain, at a relative L2 error of 1.4e-4 against fp32
    (benchmarks/RESULTS.md, "Throughput (issue 6)" and "Precision auto"); GPU figures are pending.
    Other values are returned as they are.
    """
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def default_paths(device: str | torch.device = "cpu", precision: str = "fp32") -> dict:
    """The execution paths :func:`prepare_model` picks when nothing is forced.

    Returns
    -------
    dict
        ``{"channels_last": bool, "compile": bool}``.
    """
    kind = torch.device(device).type
    channels_last, compiled = _DEFAULTS.get((kind, precision), (False, False))
    return {"channels_last": channels_last, "compile": compiled}


def _spatial_ndim(model: torch.nn.Module) -> int | None:
    ndim = getattr(getattr(model, "config", None), "ndim", None)
    if ndim in (2, 3):
        return int(ndim)
    for p in model.parameters():
        if p.dim() in (4, 5):
            return p.dim() - 2
    return None


class _OneDNNConv(torch.nn.Module):
    """A zero-padded Conv2d/Conv3d run by oneDNN whatever its size (see module docstring)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return torch.ops.aten.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def _swap_convs(module: torch.nn.Module) -> int:
    n = 0
    for name, child in module.named_children():
        if (isinstance(child, (torch.nn.Conv2d, torch.nn.Conv3d)) and child.padding_mode == "zeros"
                and not isinstance(child.padding, str)):
            setattr(module, name, _OneDNNConv(child))
            n += 1
        else:
            n += _swap_convs(child)
    return n


def _memory_format(ndim_tensor: int):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim_tensor)


class FastModel:
    """Callable returned by :func:`prepare_model`; ``paths`` says what it runs.

    Attributes
    ----------
    device : torch.device
    precision : str
    paths : dict
        ``channels_last``, ``compile``, ``freezing`` as used (``compile`` turns False after a
        compile failure).
    compiled_shapes : set of tuple
        Input shapes that run compiled code.
    """

    def __init__(self, model, device, precision, channels_last, compile_, freezing, onednn_conv,
                 compile_min_calls, max_compiled_shapes):
        self.device = device
        self.precision = precision
        self._dtype = TORCH_DTYPES[precision]
        ndim = _spatial_ndim(model)
        self._format = _memory_format(ndim + 2) if (channels_last and ndim) else None
        module = copy.deepcopy(model).to(device).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        if self._format is not None:
            module = module.to(memory_format=self._format)
        swapped = 0
        if onednn_conv and not compile_ and device.type == "cpu" and self._dtype is None \
                and torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_convolution"):
            swapped = _swap_convs(module)
        self._module = module
        self.paths = {"channels_last": self._format is not None, "compile": bool(compile_),
                      "freezing": bool(compile_ and freezing), "onednn_conv": swapped > 0}
        self._compiled = None
        if compile_:
            options = {"freezing": True} if freezing else None
            try:
                self._compiled = torch.compile(module, dynamic=False, options=options)
            except Exception as err:  # torch.compile unavailable on this platform
                self._compile_failed(err)
        self.compiled_shapes: set = set()
        self._seen: dict = {}
        self._min_calls = max(1, int(compile_min_calls))
        self._max_shapes = int(max_compiled_shapes)
        self._lock = threading.Lock()

    def _compile_failed(self, err: BaseException) -> None:
        warnings.warn(f"torch.compile failed on {self.device.type} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); running the eager "
                      f"{'channels_last ' if self._format else ''}path instead", RuntimeWarning,
                      stacklevel=3)
        self._compiled = None
        self.paths["compile"] = self.paths["freezing"] = False

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._dtype is not None:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self._dtype))
        return stack

    def _use_compiled(self, shape: tuple) -> bool:
        if self._compiled is None:
            return False
        with self._lock:
            if shape in self.compiled_shapes:
                return True
            n = self._seen[shape] = self._seen.get(shape, 0) + 1
            if n >= self._min_calls and len(self.compiled_shapes) < self._max_shapes:
                self.compiled_shapes.add(shape)
                return True
        return False

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the network on ``x`` (N, C, *spatial); float32 contiguous outputs per head."""
        x = x.to(self.device, non_blocking=True)
        if self._format is not None and x.dim() in (4, 5):
            x = x.contiguous(memory_format=_memory_format(x.dim()))
        shape = tuple(x.shape)
        raw = None
        with self._context():
            if self._use_compiled(shape):
                try:
                    raw = self._compiled(x)
                except Exception as err:
                    raw = self._module(x)  # a bad input raises here, with the model's message
                    self._compile_failed(err)
                    self.compiled_shapes.clear()
            if raw is None:
                raw = self._module(x)
        return {k: v.float().contiguous() for k, v in raw.items()}

    def warm_up(self, shape: tuple) -> None:
        """Compile (when compiling) and run once on zeros of ``shape`` so later calls are fast."""
        shape = tuple(int(s) for s in shape)
        if self._compiled is not None:
            with self._lock:
                if len(self.compiled_shapes) < self._max_shapes:
                    self.compiled_shapes.add(shape)
        self(torch.zeros(shape, device=self.device))


def prepare_model(model: torch.nn.Module, *, device="cpu", precision: str = "fp32",
                  channels_last: bool | None = None, compile: bool | None = None,
                  example_shape: tuple | None = None, freezing: bool | None = None,
                  onednn_conv: bool | None = None,
                  cudnn_benchmark: bool | None = None, compile_min_calls: int = 2,
                  max_compiled_shapes: int = 4) -> FastModel:
    """Wrap a network into the fastest correct callable measured for ``device``/``precision``.

    Parameters
    ----------
    model : torch.nn.Module
        Returns a dict of head name to tensor (e.g. :class:`bigcare.models.UNet`); 2D or 3D.
        Not modified: a copy is moved, re-laid out and (optionally) compiled.
    device : str or torch.device
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype, applied inside the callable.
    channels_last : bool, optional
        Channels-last memory format for weights and input. Default: measured (on for CPU and
        CUDA).
    compile : bool, optional
        ``torch.compile(dynamic=False)`` per input shape. Default: measured (off; see module
        docstring for when it pays).
    example_shape : tuple of int, optional
        Input shape (N, C, *spatial), or spatial only (N=1, C from the model), to compile and
        warm up now - for the interior block shape of a run with many blocks.
    freezing : bool, optional
        Inductor freezing with ``compile`` (default: on CPU only).
    onednn_conv : bool, optional
        Run every conv through oneDNN on CPU in fp32 without compile (default: on there).
    cudnn_benchmark : bool, optional
        Set ``torch.backends.cudnn.benchmark`` (process-wide) on CUDA; default True.
    compile_min_calls : int
        Calls with one shape before that shape is compiled (1 = at once).
    max_compiled_shapes : int
        Shapes compiled at most; later new shapes run eagerly.

    Returns
    -------
    FastModel
        ``f(x) -> dict[str, Tensor]`` (float32, contiguous); ``f.paths`` tells what runs.
    """
    check_choice("precision", precision, PRECISIONS)
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    defaults = default_paths(device, precision)
    channels_last = defaults["channels_last"] if channels_last is None else bool(channels_last)
    compile_ = defaults["compile"] if compile is None else bool(compile)
    freezing = (device.type == "cpu") if freezing is None else bool(freezing)
    if device.type == "cuda" and (cudnn_benchmark is None or cudnn_benchmark):
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and precision == "fp16":
        warnings.warn("fp16 autocast on CPU is emulated on CPUs without AVX-512 FP16 (measured ~20x "
                      "slower than fp32 on AMD Zen 4); use bf16", RuntimeWarning, stacklevel=2)
    if compile_ and not hasattr(torch, "compile"):
        warnings.warn("torch.compile is not available in this torch; running eagerly", RuntimeWarning,
                      stacklevel=2)
        compile_ = False
    onednn_conv = True if onednn_conv is None else bool(onednn_conv)
    fast = FastModel(model, device, precision, channels_last, compile_, freezing, onednn_conv,
                     compile_min_calls, max_compiled_shapes)
    if example_shape is not None:
        shape = tuple(int(s) for s in example_shape)
        ndim = _spatial_ndim(model)
        if ndim is not None and len(shape) == ndim:
            n_in = getattr(getattr(model, "config", None), "n_channel_in", 1)
            shape = (1, n_in) + shape
        fast.warm_up(shape)
    return fast
