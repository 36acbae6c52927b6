"""The text encoder's linear layers on oneDNN, with weights packed once at load: the same float32 products, faster.

PyTorch's eager float32 `linear` calls MKL's sgemm, which on AMD CPUs (the project's CPU machine is an AMD EPYC)
does not take its AVX-512 path; oneDNN does, on every x86 CPU. With the weights reordered once into oneDNN's
blocked layout (what torch.compile's CPU freezing does, without compiling), all-MiniLM-L6-v2 runs about a
quarter faster on 2 cores (2026-11-23), in float32 throughout: no reduced precision, no quantization. Outputs
differ from MKL's only by the order of float additions (about 1e-6).

The ops are PyTorch's internal ones for this (`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`,
which torch.compile's freezing pass emits), so each layer is checked against `torch.nn.functional.linear` when
it is packed and left as it was when an op is missing or disagrees.
"""
from __future__ import annotations

import torch

CHECK_ATOL = 1e-4
"""Packed vs plain on a random [8, in] input with the layer's own weights (outputs of size ~1): a wrong layout
or op is off by whole units; float reordering by about 1e-6."""


class PackedLinear(torch.nn.Module):
    """An nn.Linear whose weight is packed once for oneDNN; forward is `linear` on any [..., in] input."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every float32 CPU nn.Linear in `model` (in place) by a PackedLinear that passes its check.
    Returns how many were replaced: 0 when oneDNN or its ops are missing in this PyTorch."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (type(child) is torch.nn.Linear and child.weight.device.type == "cpu"
                    and child.weight.dtype == torch.float32):
                continue
            try:
                packed = PackedLinear(child)
                with torch.no_grad():
                    x = torch.randn(8, child.in_features, generator=torch.Generator().manual_seed(0))
                    agrees = torch.allclose(packed(x), torch.nn.functional.linear(x, child.weight, child.bias),
                                            atol=CHECK_ATOL, rtol=0)
            except (RuntimeError, AttributeError):
                return replaced  # this PyTorch lacks the ops (or they refuse): keep the rest as they are
            if agrees:
                setattr(parent, name, packed)
                replaced += 1
    return replaced
