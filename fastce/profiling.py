"""Count the bytes, peak memory and host syncs of a PyTorch/Triton computation, on the CPU.

Cross-entropy is memory-bound, so the bytes it moves predict its GPU time. This module
measures them without a GPU:

* **Triton kernels** run on the Triton interpreter (``TRITON_INTERPRET=1`` set before triton
  is imported). Every ``tl.load`` / ``tl.store`` and atomic is counted: active mask lanes ×
  element size, per kernel name, with the number of launches. Bytes *requested* and bytes
  *distinct* within one launch are both kept: a block read twice by one launch is served from
  L2 on a GPU, so ``triton_unique`` is the DRAM estimate and ``triton_read + triton_write``
  the upper bound.
* **torch operators** are counted by a ``TorchDispatchMode``: an operator reads its tensor
  inputs and writes its outputs. Views and allocations move nothing; write-only operators
  (``copy_``, ``fill_``, ``zero_``, ``out=`` arguments) do not read what they overwrite, nor
  ``zeros_like``-style factories the tensor they copy the shape of; picking operators
  (``nll_loss``, ``gather``) read one element per index, ``nll_loss``'s backward only the shape
  of its input; a ``copy_`` of a view onto the same view (the end of ``a[s] += b``) moves
  nothing, as ATen skips it.
  The interpreter's own host copies around a kernel launch are not counted. A custom op
  written in Python (``torch.library.custom_op``) is charged what its body runs, not its
  arguments and results on top. ``torch.compile``'d code is counted as it runs (the counter
  steps aside while compiling): with ``backend="aot_eager"`` that is every operator of the
  compiled graphs; inductor's generated kernels are invisible.
* **Peak memory**: the most bytes of tensor storages created inside the block that were
  alive at once (storages alive before the block are not counted).
* **Host syncs**: operators that make the host wait for the device: ``.item()``,
  ``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``, ``equal``,
  ``repeat_interleave`` without ``output_size``, ``bincount``, ``histc``, device→host copies.

Usage::

    from fastce.profiling import measure
    with measure() as m:
        loss = fastce.cross_entropy(x, t)
        loss.backward()
    print(m.report())
    m.total_bytes, m.peak_bytes, m.syncs        # ints
    m.ratio(2 * x.numel() * x.element_size())   # bytes moved / bytes floor

A ``Measurement`` has, in bytes unless noted: ``triton_read``, ``triton_write``,
``triton_unique`` (distinct bytes per launch, read + written), ``torch_read``,
``torch_write``, ``total_bytes`` (all four requested counts), ``unique_bytes``
(``triton_unique`` + torch bytes), ``peak_bytes``, ``syncs`` (count), ``triton_launches``,
``torch_calls`` (operators that moved bytes), ``launches`` (their sum: the kernels a GPU
would launch), per-name details in ``kernels`` and ``ops``, and ``as_dict()``.

Limits: Triton kernels compiled for a GPU (no interpreter) are invisible; only their
torch-side work is counted. Other than the picking operators above, the torch model counts
whole tensors (an indexed write is charged the whole destination). Triton is imported lazily: this module imports without it.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import gc
import os
import weakref
from dataclasses import dataclass
from typing import Dict, Iterator, List

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["measure", "Measurement", "KernelTraffic", "OpTraffic", "interpreter_active", "count_allocations",
           "AllocationCount"]


@dataclass
class KernelTraffic:
    """One Triton kernel (by function name), summed over its launches."""
    launches: int = 0
    read: int = 0
    write: int = 0
    unique_read: int = 0   # distinct bytes loaded, per launch, summed over launches
    unique_write: int = 0  # distinct bytes stored, per launch, summed over launches


@dataclass
class OpTraffic:
    """One aten operator (by name, without overload), summed over its calls."""
    calls: int = 0
    read: int = 0
    write: int = 0
    syncs: int = 0


class Measurement:
    """What ``measure()`` yields; read it inside or after the ``with`` block."""

    def __init__(self) -> None:
        self.kernels: Dict[str, KernelTraffic] = {}
        self.ops: Dict[str, OpTraffic] = {}
        self.peak_bytes = 0
        self._live_bytes = 0
        self._live_storages: Dict[int, int] = {}  # data_ptr -> bytes, of storages created inside

    # ---- totals -------------------------------------------------------------------------
    def _sum(self, table: str, *fields: str) -> int:
        return sum(getattr(entry, field) for entry in getattr(self, table).values() for field in fields)

    triton_read = property(lambda self: self._sum("kernels", "read"))
    triton_write = property(lambda self: self._sum("kernels", "write"))
    triton_unique = property(lambda self: self._sum("kernels", "unique_read", "unique_write"))
    triton_launches = property(lambda self: self._sum("kernels", "launches"))
    torch_read = property(lambda self: self._sum("ops", "read"))
    torch_write = property(lambda self: self._sum("ops", "write"))
    syncs = property(lambda self: self._sum("ops", "syncs"))

    @property
    def total_bytes(self) -> int:
        return self.triton_read + self.triton_write + self.torch_read + self.torch_write

    @property
    def unique_bytes(self) -> int:
        return self.triton_unique + self.torch_read + self.torch_write

    @property
    def torch_calls(self) -> int:
        return sum(o.calls for o in self.ops.values() if o.read or o.write)

    @property
    def launches(self) -> int:
        return self.triton_launches + self.torch_calls

    def ratio(self, floor_bytes: int, unique: bool = False) -> float:
        """Bytes moved as a multiple of ``floor_bytes`` (e.g. the logits' bytes)."""
        return (self.unique_bytes if unique else self.total_bytes) / floor_bytes

    def as_dict(self) -> Dict[str, int]:
        names = ("triton_read", "triton_write", "triton_unique", "torch_read", "torch_write",
                 "total_bytes", "unique_bytes", "peak_bytes", "syncs", "triton_launches",
                 "torch_calls", "launches")
        return {name: getattr(self, name) for name in names}

    def report(self) -> str:
        """A table: one line per Triton kernel and per torch operator, then the totals."""
        rows = [("triton", name, k.launches, k.read, k.write, k.unique_read + k.unique_write, "")
                for name, k in self.kernels.items()]
        rows += [("torch", name, o.calls, o.read, o.write, o.read + o.write, o.syncs or "")
                 for name, o in sorted(self.ops.items(), key=lambda kv: -(kv[1].read + kv[1].write))
                 if o.read or o.write or o.syncs]
        header = f"{'kind':6} {'name':40} {'calls':>5} {'read':>12} {'written':>12} {'distinct':>12} {'syncs':>5}"
        lines = [header, "-" * len(header)]
        lines += [f"{kind:6} {name:40} {calls:5} {_human(r):>12} {_human(w):>12} {_human(u):>12} {s:>5}"
                  for kind, name, calls, r, w, u, s in rows]
        lines.append("-" * len(header))
        lines.append(f"total {_human(self.total_bytes)} (distinct {_human(self.unique_bytes)}), "
                     f"peak {_human(self.peak_bytes)}, launches {self.launches}, syncs {self.syncs}")
        return "\n".join(lines)

    # ---- recording ----------------------------------------------------------------------
    def _track_storage(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key in self._live_storages or not storage.nbytes():
            return
        self._live_storages[key] = storage.nbytes()
        self._live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self._live_bytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self._live_bytes -= self._live_storages.pop(key)


def _human(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000


def interpreter_active() -> bool:
    """Whether Triton kernels run on the interpreter (so ``measure`` sees their loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def measure() -> Iterator[Measurement]:
    """Count bytes, peak memory and host syncs of everything run inside the block."""
    result = Measurement()
    launch = _LaunchRecorder(result)
    with contextlib.ExitStack() as stack:
        if interpreter_active():
            stack.enter_context(_hook_interpreter(launch))
        stack.enter_context(_TorchOpCounter(result, launch))
        yield result


# ---- Allocator level: torch's profiler ------------------------------------------------------

_GEMM_OPS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2), "aten::bmm": (0, 1),
             "aten::baddbmm": (1, 2)}  # positions of the two multiplied operands


@dataclass
class AllocationCount:
    """What ``count_allocations()`` yields, filled in when its block ends."""
    peak_bytes: int = 0   # most bytes of CPU storages allocated inside the block and alive at once
    gemm_flops: int = 0   # 2·M·N·K of every matrix product (per batch entry for bmm)
    gemm_calls: int = 0
    syncs: int = 0        # host-sync operators (measure()'s list)


@contextlib.contextmanager
def count_allocations() -> Iterator[AllocationCount]:
    """Peak memory, GEMM flops and host syncs of everything run inside the block, from torch's
    profiler: allocations as the CPU allocator sees them, so also those made inside custom ops
    and by compiled (Inductor) code, which ``measure()``'s dispatch mode cannot see, and which
    do not stop torch.compile. CPU tensors only; no byte counts (use ``measure()``).

    A GEMM counts only what it leaves allocated (its output): CPU BLAS libraries allocate and
    free packing workspaces inside a call (a bf16 product packs an fp32 copy of an operand),
    which GPU libraries keep preallocated. Under the interpreter, garbage is collected after each
    launch: the interpreter leaves its arguments in a reference cycle (a GPU launch holds nothing)."""
    from torch.profiler import ProfilerActivity, profile

    result = AllocationCount()
    with contextlib.ExitStack() as stack:
        if interpreter_active():
            stack.enter_context(_collect_after_launches())
        prof = stack.enter_context(profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                           record_shapes=True))
        yield result
    events = list(prof.profiler.kineto_results.events())
    # (start, end) of the GEMM calls; their workspaces may be allocated by BLAS worker threads
    gemm_spans = sorted((e.start_ns(), e.end_ns()) for e in events if e.name() in _GEMM_OPS)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    changes, net_of_gemm = [], collections.Counter()  # a GEMM's allocations count at its end, netted
    allocated = collections.Counter()  # sizes of the blocks allocated inside the block, still alive
    for time, nbytes in memory:
        if nbytes < 0:
            if not allocated[-nbytes]:
                continue  # a block allocated before the block (the profiler gives no addresses)
            allocated[-nbytes] -= 1
        else:
            allocated[nbytes] += 1
        span = bisect.bisect_right(gemm_spans, (time, float("inf"))) - 1
        if span >= 0 and time <= gemm_spans[span][1]:
            net_of_gemm[gemm_spans[span][1]] += nbytes
        else:
            changes.append((time, nbytes))
    live = 0
    for _, nbytes in sorted(changes + list(net_of_gemm.items())):
        live += nbytes
        result.peak_bytes = max(result.peak_bytes, live)
    for event in prof.events():
        if event.name in _GEMM_OPS:
            left, right = (event.input_shapes[i] for i in _GEMM_OPS[event.name])
            result.gemm_flops += 2 * int(np.prod(left)) * right[-1]
            result.gemm_calls += 1
        elif event.name.startswith("aten::") and event.name[len("aten::"):] in _SYNC_OPS:
            result.syncs += 1


@contextlib.contextmanager
def _collect_after_launches() -> Iterator[None]:
    try:
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        yield
        return
    launch = GridExecutor.__call__
    # garbage from before the block is collected now, not inside it; the objects alive now are
    # frozen, so that each collection after a launch only walks what was created since
    gc.collect()
    gc.freeze()

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect()

    GridExecutor.__call__ = launch_then_collect
    try:
        yield
    finally:
        GridExecutor.__call__ = launch
        gc.unfreeze()


# ---- Triton side: hooks on the interpreter --------------------------------------------------

class _LaunchRecorder:
    """Bytes of the Triton launch running now; the addresses it touched, for distinct bytes."""

    def __init__(self, result: Measurement) -> None:
        self.result = result
        self.kernel: KernelTraffic | None = None  # None: no Triton kernel is running
        self.addresses: Dict[str, List[np.ndarray]] = {"read": [], "write": []}

    def begin(self, name: str) -> None:
        self.kernel = self.result.kernels.setdefault(name, KernelTraffic())
        self.kernel.launches += 1

    def end(self) -> None:
        self.kernel.unique_read += _distinct_bytes(self.addresses["read"])
        self.kernel.unique_write += _distinct_bytes(self.addresses["write"])
        self.addresses = {"read": [], "write": []}
        self.kernel = None

    def access(self, direction: str, pointers, mask) -> None:
        """Count one memory instruction: ``pointers`` a TensorHandle of addresses, ``mask``
        a TensorHandle of active lanes or None for all lanes."""
        addresses = pointers.data
        if mask is not None:
            addresses = addresses[np.broadcast_to(mask.data, addresses.shape)]
        itemsize = max(1, pointers.get_element_ty().primitive_bitwidth // 8)
        nbytes = addresses.size * itemsize
        if direction == "read":
            self.kernel.read += nbytes
        else:
            self.kernel.write += nbytes
        starts = addresses.astype(np.int64).ravel()
        self.addresses[direction].append(np.stack([starts, starts + itemsize], axis=1))


def _distinct_bytes(intervals: List[np.ndarray]) -> int:
    """Length of the union of [start, end) byte intervals."""
    spans = np.concatenate(intervals) if intervals else np.empty((0, 2), np.int64)
    if not len(spans):
        return 0
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    starts, ends = spans[:, 0], spans[:, 1]
    # an interval adds only what lies beyond the furthest end seen before it
    covered_until = np.concatenate([[starts[0]], np.maximum.accumulate(ends)[:-1]])
    return int(np.clip(ends - np.maximum(starts, covered_until), 0, None).sum())


@contextlib.contextmanager
def _hook_interpreter(launch: _LaunchRecorder) -> Iterator[None]:
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton: only torch operators can run
        yield
        return

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = {
        (builder, "create_masked_load"): builder.create_masked_load,
        (builder, "create_masked_store"): builder.create_masked_store,
        (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
        (builder, "create_atomic_cas"): builder.create_atomic_cas,
        (executor, "__call__"): executor.__call__,
    }

    # Plain loads/stores, atomic loads/stores and tensor descriptors all end in the masked ones.
    def masked_load(self, pointers, mask, *rest):
        launch.access("read", pointers, mask)
        return originals[builder, "create_masked_load"](self, pointers, mask, *rest)

    def masked_store(self, pointers, value, mask, *rest):
        launch.access("write", pointers, mask)
        return originals[builder, "create_masked_store"](self, pointers, value, mask, *rest)

    def atomic_rmw(self, op, pointers, value, mask, *rest):
        launch.access("read", pointers, mask)
        launch.access("write", pointers, mask)
        return originals[builder, "create_atomic_rmw"](self, op, pointers, value, mask, *rest)

    def atomic_cas(self, pointers, *rest):
        launch.access("read", pointers, None)
        launch.access("write", pointers, None)
        return originals[builder, "create_atomic_cas"](self, pointers, *rest)

    def run_grid(self, *args, **kwargs):
        launch.begin(getattr(self.fn, "__name__", "triton_kernel"))
        try:
            return originals[executor, "__call__"](self, *args, **kwargs)
        finally:
            launch.end()
            # The interpreter's argument copies hold the arguments' storages in a reference cycle
            # (a recursive closure), which would keep them alive, and counted in the peak, until the
            # next garbage collection; on a GPU they are freed as soon as the caller drops them.
            # Objects alive before the block are frozen, so this collection is cheap.
            gc.collect()

    replacements = {
        (builder, "create_masked_load"): masked_load,
        (builder, "create_masked_store"): masked_store,
        (builder, "create_atomic_rmw"): atomic_rmw,
        (builder, "create_atomic_cas"): atomic_cas,
        (executor, "__call__"): run_grid,
    }
    for (owner, name), function in replacements.items():
        setattr(owner, name, function)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        for (owner, name), function in originals.items():
            setattr(owner, name, function)


# ---- torch side: a dispatch mode ------------------------------------------------------------

# Allocations and metadata changes move no bytes (views are recognised from the schema).
_FREE_OPS = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
                       "new_empty_strided", "resize_", "set_", "_unsafe_view"})
# In-place operators that overwrite `self` without reading it.
_WRITE_ONLY_SELF_OPS = frozenset({"copy_", "fill_", "zero_", "normal_", "uniform_", "random_",
                                  "bernoulli_", "exponential_", "geometric_", "cauchy_",
                                  "log_normal_"})
# Factories that look only at a tensor's shape, dtype and device, never at its data.
_SHAPE_ONLY_OPS = frozenset({"zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
                             "randint_like", "new_zeros", "new_ones", "new_full"})
# Operators that read from `self` only the elements an index picks (one per entry of the named
# argument): nll_loss reads the target class's log-probability of each row, not the whole row.
_PICKING_OPS = {"nll_loss_forward": "target", "nll_loss2d_forward": "target", "gather": "index"}
# Operators that look only at the shape of `self` (the gradient of a pick is written whole).
_SHAPE_OF_SELF_OPS = frozenset({"nll_loss_backward", "nll_loss2d_backward"})
# Operators whose output size or value the host must read back from the device.
_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "_unique",
                       "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
                       "equal", "bincount", "histc"})
_MASK_INDEXING_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})


def _tensors(tree) -> List[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copies_onto_itself(name: str, args) -> bool:
    """copy_ of a view onto the same view (what `a[s] += b` ends with): ATen returns at once."""
    if name != "copy_" or len(args) < 2:
        return False
    destination, source = args[0], args[1]
    return (destination.layout == source.layout == torch.strided and destination.dtype == source.dtype
            and destination.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
            and destination.storage_offset() == source.storage_offset()
            and destination.shape == source.shape and destination.stride() == source.stride()
            and destination.is_conj() == source.is_conj() and destination.is_neg() == source.is_neg())


def _forces_sync(name: str, overload: str, args, kwargs, output) -> bool:
    if name in _SYNC_OPS:
        return True
    if name == "repeat_interleave":  # the output size is the sum of `repeats`, unless given
        return overload == "Tensor" and kwargs.get("output_size") is None
    if name in _MASK_INDEXING_OPS:  # a boolean mask becomes indices through nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
        return any(i.dtype in (torch.bool, torch.uint8) for i in _tensors(indices))
    if name in ("_to_copy", "copy_"):  # device -> host copy
        source = args[1] if name == "copy_" else args[0]
        destination = output
        return source.device.type != "cpu" and destination.device.type == "cpu"
    return False


def _python_custom_op(func):
    """The torch.library.custom_op definition behind `func`, or None (aten and other operators)."""
    from torch._library.custom_ops import OPDEFS
    return OPDEFS.get(func._schema.name)


class _TorchOpCounter(TorchDispatchMode):
    def __init__(self, result: Measurement, launch: _LaunchRecorder) -> None:
        super().__init__()
        self.result = result
        self.launch = launch

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        custom_op = _python_custom_op(func)
        if custom_op is not None:
            # a torch.library custom op written in Python (fastce's, under torch.compile): count what
            # its body runs (its Triton kernels and torch operators), not the op as a whole
            with self:
                return custom_op._init_fn(*args, **kwargs)
        output = func(*args, **kwargs)
        if self.launch.kernel is not None:  # the interpreter copying kernel arguments
            return output
        name, overload = func._schema.name.split("::")[-1], func._overloadname
        op = self.result.ops.setdefault(name, OpTraffic())
        op.calls += 1
        if _forces_sync(name, overload, args, kwargs, output):
            op.syncs += 1
        is_view = any(r.alias_info is not None and not r.alias_info.is_write
                      for r in func._schema.returns)
        if name not in _FREE_OPS and not is_view and not _copies_onto_itself(name, args):
            read, written = self._accesses(func, name, args, kwargs, output)
            op.read += read
            op.write += _nbytes(written)
        self._track_new_storages(args, kwargs, output)
        return output

    @staticmethod
    def _accesses(func, name, args, kwargs, output):
        """(bytes read, tensors written): a mutating operator writes its mutated arguments, and
        reads them too unless it only overwrites them; others write their outputs. An operator
        reads what it touches: the picked elements of a picking operator's `self`, nothing of a
        tensor it takes only the shape of."""
        read, mutated = 0, []
        values = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
        for argument in func._schema.arguments:
            tensors = _tensors(values.get(argument.name))
            is_mutated = argument.alias_info is not None and argument.alias_info.is_write
            if is_mutated:
                mutated += tensors
            write_only = is_mutated and (argument.is_out or name in _WRITE_ONLY_SELF_OPS)
            if write_only or name in _SHAPE_ONLY_OPS or (argument.name == "self" and name in _SHAPE_OF_SELF_OPS):
                continue
            if argument.name == "self" and name in _PICKING_OPS:
                picks = values[_PICKING_OPS[name]].numel()
                read += sum(min(picks, t.numel()) * t.element_size() for t in tensors)
            else:
                read += _nbytes(tensors)
        return read, mutated or _tensors(output)

    def _track_new_storages(self, args, kwargs, output) -> None:
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.layout == torch.strided}
        for t in _tensors(output):
            if t.layout == torch.strided and t.untyped_storage().data_ptr() not in inputs:
                self.result._track_storage(t.untyped_storage())
