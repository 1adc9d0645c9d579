"""Where the segments of a row lie, computed once per forward and handed to every layer.

A packed row's offsets on the device would have to be read back (`.tolist()`), which waits for the device to
finish everything queued before. The layout reads them once, when the forward starts (not at all when they are
given on the host, as training gives them), and keeps on the host what the backends need on the host (the
lengths) and on the device what the kernels read there (offsets in steps and in chunks), copied there without
waiting, so no layer syncs. CHUNK, the chunk length of every chunked backend, is defined here alone.
"""

from dataclasses import dataclass, replace
from itertools import accumulate

import torch

CHUNK = 16


@dataclass(frozen=True)
class PackedLayout:
    cu_seqlens: torch.Tensor  # [S + 1] int64 offsets of the segments, on the inputs' device
    lengths: tuple[int, ...]  # each segment's steps, on the host
    step_offsets: torch.Tensor  # [S + 1] int32, on the device: what the Triton kernels read
    chunk_offsets: torch.Tensor  # [S + 1] int32, on the device: each segment's first chunk of CHUNK steps
    total_chunks: int

    @property
    def offsets(self) -> list[int]:
        return list(accumulate(self.lengths, initial=0))

    @property
    def n_segments(self) -> int:
        return len(self.lengths)


def on_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU: itself when it is there, else read back once (which waits for the device's queued work).
    Forwards check and index their layout inputs (ids, masks, labels, offsets) on the host, in numpy (which
    refuses a device tensor rather than read it back silently): given them on the CPU, as training gives them,
    a forward queues all its device work without waiting for any of it."""
    return t if t.device.type == "cpu" else t.cpu()


def to_device_nowait(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A copy on `device` that the host does not wait for (from pageable memory the driver stages it first)."""
    return t.to(device=device, dtype=dtype, non_blocking=True)


def check_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> list[int]:
    """The segment offsets as ints, after checking that they cut [0, T) into non-empty segments."""
    offsets = on_host(cu_seqlens).numpy().tolist()  # at most one device read, not one per offset
    if cu_seqlens.dim() != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"cu_seqlens must run from 0 to T={T}, got {offsets}")
    if any(e <= s for s, e in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens: every segment needs at least one step, got offsets {offsets}")
    return offsets


def _layout(lengths: list[int], device, cu_seqlens=None) -> PackedLayout:
    chunks = [-(-n // CHUNK) for n in lengths]
    offsets = list(accumulate(lengths, initial=0))
    chunk_offsets = list(accumulate(chunks, initial=0))
    if cu_seqlens is None:
        cu_seqlens = torch.tensor(offsets)
    return PackedLayout(to_device_nowait(cu_seqlens, device, torch.long), tuple(lengths),
                        to_device_nowait(torch.tensor(offsets, dtype=torch.int32), device),
                        to_device_nowait(torch.tensor(chunk_offsets, dtype=torch.int32), device), chunk_offsets[-1])


def packed_layout(cu_seqlens: torch.Tensor, T: int, device=None) -> PackedLayout:
    """The layout of a packed row [1, T] cut at `cu_seqlens` [S + 1] (checked; the one host sync)."""
    offsets = check_cu_seqlens(cu_seqlens, T)
    return _layout([e - s for s, e in zip(offsets, offsets[1:])], device or cu_seqlens.device, cu_seqlens)


def as_layout(packed: "PackedLayout | torch.Tensor", T: int, device=None) -> PackedLayout:
    """A layout as given (checked against T on the host; its tensors copied to `device` without waiting when built
    on another, as `packed_layout(cu_seqlens, T)` builds them on the offsets' CPU) or built from cu_seqlens."""
    if isinstance(packed, PackedLayout):
        if sum(packed.lengths) != T:
            raise ValueError(f"the packed layout covers {sum(packed.lengths)} steps, the input has T={T}")
        if device is None or packed.step_offsets.device == torch.device(device):
            return packed
        return replace(packed, cu_seqlens=to_device_nowait(packed.cu_seqlens, device),
                       step_offsets=to_device_nowait(packed.step_offsets, device),
                       chunk_offsets=to_device_nowait(packed.chunk_offsets, device))
    return packed_layout(packed, T, device)


def rows_layout(B: int, T: int, device) -> PackedLayout:
    """A batch [B, T] as B segments of T steps, from the shape alone (no device read)."""
    return _layout([T] * B, device)
