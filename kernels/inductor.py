"""The custom ops' Inductor fallbacks, registered up front on torch < 2.13.

Inductor runs an op it has no lowering for as a fallback kernel (the op called as is from the compiled code),
and creates that fallback the first time it meets the op in a graph.  Before torch 2.13 it first formats an
INFO log line of the op's inputs, whether or not that line is logged: the text of each input's IR node,
recursively through the extern kernels that made it.  In a whole MaskDiT compiled with the triton backend
almost every node is an extern kernel (the custom ops, the matrix products), and an op first met deep in the
graph (``insert_mask_tokens`` after the encoder, the fused loss at its end) prints the whole graph before
it as a tree, exponential in depth: with 4 blocks of width 48 the line for ``insert_mask_tokens`` was 32 MB
(5.6 s) on the CPU, the next op's never finished, and the whole XL/2 step's first compilation was still at it
after minutes on an H100 and an H200 (2026-11-28).  torch 2.13 formats
the line lazily.  Registering every custom op's fallback as Inductor would (the layout constraint of its
tags) before any compilation skips that path; it costs the import of ``torch._inductor.lowering`` (about
1.5 s), paid when ``kernels`` is imported on an older torch.
"""

from __future__ import annotations

import torch

NAMESPACE = "maskdit"
LAZY_LOG_TORCH = (2, 13)  # the first torch known to format Inductor's implicit-fallback line lazily


def torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def custom_ops(namespace: str = NAMESPACE) -> list:
    """Every overload of the custom ops registered under ``namespace``."""
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith(f"{namespace}::"))
    packets = [getattr(getattr(torch.ops, namespace), name) for name in names]
    return [getattr(packet, overload) for packet in packets for overload in packet.overloads()]


def register_fallbacks(namespace: str = NAMESPACE) -> int:
    """Give every custom op of ``namespace`` without an Inductor lowering the fallback Inductor would create
    for it when met in a graph (same layout constraint); returns how many were registered."""
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    registered = 0
    for op in custom_ops(namespace):
        if op not in lowerings:
            constraint = tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            make_fallback(op, layout_constraint=constraint)
            registered += 1
    return registered


def register_fallbacks_if_needed() -> None:
    """``register_fallbacks()`` on a torch that formats the implicit-fallback line eagerly (< 2.13)."""
    if torch_version() < LAZY_LOG_TORCH:
        register_fallbacks()
