"""Putting a model on its device: channels_last, with the layers oneDNN miscomputes on a CPU kept in NCHW."""
from __future__ import annotations

import torch

# A oneDNN bug guard. The oneDNN of PyTorch 2.14.1's CPU build (v3.12) corrupts the heap ("double free or
# corruption", SIGSEGV, SIGABRT) in the weight gradient of a 1x1 convolution with stride > 1 in channels_last
# when the input has fewer channels per group than one SIMD vector holds (its jit_1x1 backward-weights kernel, the
# strided "reduce to unit stride" path). On an AVX-512 CPU: 15 input channels or fewer, whatever the output
# channels; 16, 32, 64 never did. It hangs instead under ONEDNN_MAX_CPU_ISA=AVX2 (7 channels or fewer). It
# depends on the batch and image size (odd batches at 32x32, nearly all at 64x64), so it may also corrupt
# memory silently. The reproducer (exit 139 on AVX-512):
#     m = nn.Conv2d(8, 16, 1, 2, bias=False).to(memory_format=torch.channels_last)
#     x = torch.randn(32, 8, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
#     for _ in range(5): m(x).pow(2).mean().backward()
# preactresnet18_w8 has such a layer (layer2.0.shortcut). The guard detects nothing at run time, so it holds on
# every CPU: such a layer computes in NCHW on CPU, where oneDNN is correct (NCHW, or channels_last with oneDNN
# off, never failed); every other layer keeps channels_last. 16 channels covers AVX-512, the widest fp32 vector.
ONEDNN_NARROW_CHANNELS = 16


def onednn_unsafe(module: torch.nn.Module) -> bool:
    """A convolution that the oneDNN bug above can hit in channels_last on CPU."""
    return (isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.in_channels // module.groups < ONEDNN_NARROW_CHANNELS)


def _is_nchw(t: torch.Tensor) -> bool:
    # By strides, not is_contiguous(): a 1x1 weight, or an input of 1x1 pixels, is "contiguous" in both formats,
    # and PyTorch's choice of layout reads the strides.
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.insert(0, step)
        step *= size
    return list(t.stride()) == expected


def _nchw_on_cpu(conv: torch.nn.Conv2d, args: tuple):
    """Forward pre-hook of a guarded convolution: on CPU, its weight and input in NCHW, so that oneDNN takes its
    NCHW path forward and backward (the copy's backward turns the gradient back to channels_last)."""
    x = args[0]
    if x.device.type != "cpu":
        return None
    if not _is_nchw(conv.weight):  # the model was put in channels_last again after place_model
        conv.to(memory_format=torch.contiguous_format)
    return (x if _is_nchw(x) else x.clone(memory_format=torch.contiguous_format), *args[1:])


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # channels_last: faster convolutions on CUDA and, measured here, 1.7x on CPU for the narrow model; the layers
    # that the oneDNN bug above can hit stay in NCHW on CPU, whichever device the model later moves to.
    model = model.to(device).to(memory_format=torch.channels_last)
    for module in model.modules():
        if onednn_unsafe(module) and _nchw_on_cpu not in module._forward_pre_hooks.values():
            if torch.device(device).type == "cpu":
                module.to(memory_format=torch.contiguous_format)
            module.register_forward_pre_hook(_nchw_on_cpu)
    return model
