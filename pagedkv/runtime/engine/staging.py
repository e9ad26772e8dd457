"""One host-to-device copy for a step's small inputs.

The arrays of a step (token ids, positions, slot mapping, block tables, sampling parameters)
are packed into one pinned host buffer and sent up in one asynchronous copy; the device
tensors are views into the one device buffer. On the CPU the arrays are simply wrapped.
"""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16  # bytes; every array starts at a multiple, so any dtype can view its slice


class Staging:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.host = torch.empty(0, dtype=torch.uint8)
        self.copied: torch.cuda.Event | None = None  # the last copy out of `host`

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The arrays as tensors on the device, with their dtypes and shapes."""
        if not self.on_cuda:
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        layout, total = [], 0
        for name, a in arrays.items():
            layout.append((name, total, a))
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        if self.copied is not None:
            self.copied.synchronize()  # the previous copy must have read the buffer
        if total > self.host.numel():
            self.host = torch.empty(max(total, 2 * self.host.numel(), 4096), dtype=torch.uint8, pin_memory=True)
        buf = self.host.numpy()
        for _, offset, a in layout:
            buf[offset:offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        dev = self.host[:max(total, 1)].to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        out = {}
        for name, offset, a in layout:
            dtype = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
            out[name] = dev[offset:offset + a.nbytes].view(dtype).view(a.shape)
        return out
