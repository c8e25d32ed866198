"""Replaying a region's launches without re-planning them: the eager op's host cost.

Why this exists: one eager call of the fused op used to spend ~285 µs of CPU time on the H200
machine (perf/NOTES.md), nearly all of it Python that gives the same answer for every call of the
same shape: the argument checks, the configuration pick, ~40 keyword arguments per launch, and
Triton's ``JITFunction.run``, which binds and specialises each of them again (23
``native_specialize_impl`` calls per launch) before it looks up the compiled kernel. Without CUDA
graphs that host time, not the GPU's, set the layer's speed at small M (0.69x eager at M=1).

A `LaunchCache` entry is what is left after the first call of a shape: per launch, the compiled
kernel and its arguments in the kernel's positional order, with the constants (sizes, strides,
flags, block sizes) filled in and only the per-call tensors left as holes. A call then allocates
the buffers, fills the holes and calls Triton's compiled launcher directly. The entry's key is
everything the kernels were specialised on: every tensor's shape, strides, dtype, device and
16-byte alignment (Triton specialises pointer arguments on alignment and integer arguments on
their value, and the integers are all sizes and strides), the scalars and the configuration.
Entries hold no tensors, so cached shapes keep no memory alive.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

try:
    from triton import knobs as _knobs
except ImportError:  # Triton before 3.4 kept the hooks elsewhere: launch through the JIT there
    _knobs = None

# Entries are a few hundred bytes; the bound only stops a caller that feeds ever-new shapes (a
# prefill of every length) from growing the dict without limit.
MAX_ENTRIES = 4096


def tensor_key(t: Tensor | None) -> tuple[Any, ...] | None:
    """What a launch plan depends on in one tensor argument (see the module docstring)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


@dataclasses.dataclass(frozen=True)
class _Descriptor:
    """A TMA descriptor argument: rebuilt per call around that call's tensor."""

    position: int
    source: int
    shape: list[int]
    strides: list[int]
    block_shape: list[int]


@dataclasses.dataclass(frozen=True)
class _CachedLaunch:
    kernel: Any  # the @triton.jit function (the fallback path launches through it)
    compiled: Any  # its compiled kernel for this specialisation, or None (interpreter)
    names: tuple[str, ...]  # the kernel's parameters, in order
    template: tuple[Any, ...]  # positional arguments, None where a tensor goes
    fills: tuple[tuple[int, int], ...]  # (position, index into the call's tensor pool)
    descriptors: tuple[_Descriptor, ...]
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int

    def launch(self, pool: list[Tensor], stream: Any, hooks: tuple[Any, Any] | None) -> None:
        values = list(self.template)
        for position, source in self.fills:
            values[position] = pool[source]
        for d in self.descriptors:
            values[d.position] = _descriptor(pool[d.source], d.shape, d.strides, d.block_shape)
        compiled = self.compiled
        if compiled is not None and stream is not None:
            # What JITFunction.run ends with (Triton 3.6-3.9), minus its argument binding and
            # specialisation: this compiled kernel *is* the one those would look up. Launch hooks
            # (a profiler's) get the same metadata they would get there.
            gx, gy, gz = self.grid
            enter, leave = hooks or (None, None)
            metadata = None
            if hooks is not None:
                metadata = compiled.launch_metadata(self.grid, stream, *values)
            compiled.run(
                gx, gy, gz, stream, compiled.function, compiled.packed_metadata, metadata,
                enter, leave, *values,
            )  # fmt: skip
            return
        kwargs = dict(zip(self.names, values, strict=True))
        self.kernel[self.grid](**kwargs, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class CachedPlan:
    """One shape's launches, replayable on new tensors of that shape."""

    launches: tuple[_CachedLaunch, ...]
    buffers: tuple[tuple[tuple[int, ...], torch.dtype], ...]  # allocated per call, in order
    out: int  # pool index of the result
    device: torch.device

    def __call__(self, inputs: Sequence[Tensor | None]) -> Tensor:
        device = self.device
        pool = list(inputs)
        for shape, dtype in self.buffers:
            pool.append(torch.empty(shape, dtype=dtype, device=device))
        stream = hooks = None
        if device.type == "cuda":
            index = device.index
            if torch.cuda.current_device() != index:
                with torch.cuda.device(index):
                    return self(inputs)
            stream = _raw_stream(index)
            hooks = _launch_hooks()
        for launch in self.launches:
            launch.launch(pool, stream, hooks)
        return pool[self.out]


class LaunchCache:
    """A dict of `CachedPlan` by key, bounded (see ``MAX_ENTRIES``); ``None`` is cached too, for
    keys whose plan cannot be replayed (the first call's tensors were copies of the caller's)."""

    def __init__(self) -> None:
        self._plans: dict[Any, CachedPlan | None] = {}

    def get(self, key: Any) -> CachedPlan | None:
        return self._plans.get(key)

    def __contains__(self, key: Any) -> bool:
        return key in self._plans

    def put(self, key: Any, plan: CachedPlan | None) -> None:
        if len(self._plans) >= MAX_ENTRIES:
            self._plans.clear()
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def record(
    launches: Sequence[Any],
    compiled: Sequence[Any],
    inputs: Sequence[Tensor | None],
    out: Tensor,
    device: torch.device,
    out_shape: tuple[int, ...] | None = None,
) -> CachedPlan | None:
    """A `CachedPlan` of launches that just ran (``compiled``: what each launch returned).

    ``launches`` are objects with ``kernel``, ``grid``, ``args`` (by name), ``num_warps`` and
    ``num_stages``. Every tensor argument must be one of ``inputs`` (by identity) or a buffer the
    planner allocated with ``torch.empty`` (its contents are never read before a launch writes
    them): any other tensor would be replayed as garbage, so the caller hands over the exact
    objects the launches received. ``out_shape`` allocates the result buffer in that (same-sized,
    contiguous) shape, e.g. the caller's 3-D one, which saves a view per call.

    None when one object is passed as two inputs: an argument then cannot be traced to the input
    it stands for, and a replay on inputs that are distinct would feed one to both places.
    """
    present = [t for t in inputs if t is not None]
    pool_index = {id(t): i for i, t in enumerate(inputs) if t is not None}
    if len(pool_index) != len(present):
        return None
    buffers: list[tuple[tuple[int, ...], torch.dtype]] = []

    def source(t: Tensor) -> int:
        index = pool_index.get(id(t))
        if index is None:
            _check_fresh_buffer(t)
            index = pool_index[id(t)] = len(inputs) + len(buffers)
            buffers.append((tuple(t.shape), t.dtype))
        return index

    cached = []
    for launch, kernel in zip(launches, compiled, strict=True):
        names = _parameter_names(launch.kernel)
        template: list[Any] = []
        fills, descriptors = [], []
        for position, name in enumerate(names):
            value = launch.args[name]
            if isinstance(value, Tensor):
                fills.append((position, source(value)))
                value = None
            elif isinstance(value, TensorDescriptor):
                descriptors.append(
                    _Descriptor(
                        position, source(value.base), list(value.shape), list(value.strides),
                        list(value.block_shape),
                    )
                )  # fmt: skip
                value = None
            template.append(value)
        grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
        cached.append(
            _CachedLaunch(
                launch.kernel, _compiled(kernel), names, tuple(template), tuple(fills),
                tuple(descriptors), grid, launch.num_warps, launch.num_stages,
            )
        )  # fmt: skip
    out_index = source(out)
    if out_shape is not None:
        if out_index < len(inputs) or out.numel() != _numel(out_shape):
            raise ValueError("launch cache: out_shape must reshape a buffer the plan allocates")
        buffers[out_index - len(inputs)] = (tuple(out_shape), out.dtype)
    return CachedPlan(tuple(cached), tuple(buffers), out_index, device)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _raw_stream(index: int) -> int:
    # The handle Triton's own launch passes (its CUDA driver calls the same function); building
    # a torch.cuda.Stream object for it costs a few µs more per call.
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is None:
        return torch.cuda.current_stream(index).cuda_stream
    return get(index)


def _check_fresh_buffer(t: Tensor) -> None:
    # A planner's buffer is a whole, dense allocation of its own; a view is most likely a caller's
    # tensor that reached a launch under another object (a reshape), which must not be replayed
    # as an uninitialised buffer.
    if t._base is not None or t.storage_offset() != 0 or not t.is_contiguous():
        raise ValueError(
            "launch cache: a tensor argument is neither an input nor a fresh buffer "
            f"(shape {tuple(t.shape)}, strides {t.stride()})"
        )


def _parameter_names(kernel: Any) -> tuple[str, ...]:
    # JITFunction and the interpreter's InterpretedFunction both list them (Triton 3.6 and 3.9).
    return tuple(kernel.arg_names)


def _compiled(kernel: Any) -> Any:
    """The compiled kernel a JIT launch returned, if it has the launcher Triton 3.6-3.9 call
    (``run``, ``function``, ``packed_metadata``, ``launch_metadata``); None makes the entry
    launch through the JIT function (the interpreter, or a Triton whose launch protocol we have
    not checked)."""
    if kernel is None or _knobs is None:
        return None
    if hasattr(kernel, "result"):  # an asynchronous compile's future
        kernel = kernel.result()
    attributes = ("run", "function", "packed_metadata", "launch_metadata")
    if not all(hasattr(kernel, a) for a in attributes):
        return None
    return kernel


def _launch_hooks() -> tuple[Any, Any] | None:
    """Triton's launch hooks (enter, exit) if any is set, else None (no metadata to build).

    Triton 3.6-3.9 keep them as ``HookChain`` objects that are never None, and JITFunction.run
    builds launch metadata and has the launcher call both chains on every launch, empty or not;
    an empty chain here costs nothing."""
    runtime = _knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if _hook_set(enter) or _hook_set(leave):
        return enter, leave
    return None


def _hook_set(hook: Any) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


def _descriptor(
    base: Tensor, shape: list[int], strides: list[int], block_shape: list[int]
) -> TensorDescriptor:
    """A descriptor without ``TensorDescriptor.__post_init__``'s checks (~10 µs): the first call
    of this key made the same descriptor through them, and the key pins everything they check
    (shape, strides, dtype, the base's 16-byte alignment)."""
    d = TensorDescriptor.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = base, shape, strides, block_shape, "zero"
    return d
