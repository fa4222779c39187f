"""Bytes of tensors alive at once on any device, counted op by op: the CPU's stand-in for
torch.cuda.max_memory_allocated.

Every storage an operator creates while the mode is active is counted until it is freed (a weak
reference to the storage tells when). Storages that existed before (parameters, gradients being
accumulated in place, the batch) are not counted, nor are views or in-place results of them. So the
peak is what a step adds on top of the model and its inputs: activations, saved tensors, teacher
outputs, transient buffers. Allocator caching and fragmentation are not modelled.

torch's own MemTracker (torch.distributed._tools) does this too, but stops on frozen parameters
(the teachers), so this is the small part of it the benchmarks need.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(values):
    return [value.untyped_storage() for value in tree_flatten(values)[0] if isinstance(value, torch.Tensor)]


class LiveTensorBytes(TorchDispatchMode):
    """with LiveTensorBytes() as memory: ... ; memory.live, memory.peak (bytes); reset_peak() starts a new peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted = {}  # storage data pointer -> bytes

    def reset_peak(self):
        self.peak = self.live

    def _forget(self, pointer):
        self.live -= self._counted.pop(pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        inputs = {storage.data_ptr() for storage in _storages((args, kwargs))}
        for storage in _storages(outputs):
            pointer = storage.data_ptr()
            if pointer in inputs or pointer in self._counted or storage.nbytes() == 0:
                continue  # a view or in-place result, or already counted
            self._counted[pointer] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._forget, pointer)
        self.peak = max(self.peak, self.live)
        return outputs
