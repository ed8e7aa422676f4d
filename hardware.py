"""
Where the code runs: the device and precision a script asked for, and the CPU
speed-ups, which are opt-in and never imported by the model.

    dev = resolve_device('auto')                  # 'cuda' when there is one, else 'cpu'
    dtype = resolve_dtype('auto', dev)            # bf16 (or fp16) on CUDA, fp32 elsewhere
    with autocast(dev, dtype): ...                # a no-op in fp32
    if dev == 'cpu' and cpu_kernels:
        use_cpu_kernels(model)                    # oneDNN linears, kept freed memory, lean beam cache

The CPU speed-ups change kernels and memory policy, never weights or results
beyond fp32 rounding; bench.py measures each script's path with and without them.
"""
import os
import platform
import re
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def resolve_device(device):
    """'auto' -> 'cuda' when available, else 'cpu'; anything else as given ('cuda:1', 'mps')."""
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return device


def resolve_dtype(dtype, device):
    """The torch dtype for a dtype name. 'auto': bf16 on CUDA (fp16 where bf16 is not
    supported), fp32 on the CPU and elsewhere (bf16 matmuls are slower than fp32 on most CPUs)."""
    if dtype == 'auto':
        if device.startswith('cuda'):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def autocast(device, dtype):
    """Mixed precision for dtype on device; nothing at all in fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.split(':')[0], dtype=dtype)


def use_cpu_kernels(model):
    """All three CPU speed-ups below, for a model about to run on the CPU."""
    use_onednn_linears(model)
    keep_freed_memory()
    use_lean_beam_cache(model)
    return model


# -----------------------------------------------------------------------------
# oneDNN linear layers
#
# PyTorch's x86 builds send fp32 GEMMs to MKL, which runs its AVX2 code on AMD
# CPUs; oneDNN, also inside PyTorch, uses AVX-512 there, and is faster on most of
# the model's shapes (docs/performance.md). The results differ only by the rounding
# of another summation order.

ONEDNN_AVAILABLE = (platform.machine().lower() in ('x86_64', 'amd64') and torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, '_linear_pointwise'))


def _onednn_mm(x, weight, bias=None):
    """x (.., in) @ weight (out, in)ᵀ + bias, by oneDNN; strided views are fine."""
    if torch.compiler.is_compiling():  # torch.compile sees an opaque op: see _onednn_mm_opaque
        return _onednn_mm_opaque(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


# Under torch.compile, Inductor rewrites mkldnn._linear_pointwise followed by an add into
# its fused linear_binary, which needs the weight to be a frozen constant, and fails on a
# trained one ("weight must be a graph constant"). An opaque custom op keeps the GEMM on
# oneDNN and lets Inductor fuse what is around it. Eager calls skip it (no dispatch cost).
@torch.library.custom_op('chexquery::onednn_mm', mutates_args=())
def _onednn_mm_opaque(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')


@_onednn_mm_opaque.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)  # x only for dW
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(dy, weight.t())                              # (.., out) @ (out, in)
        dy2 = dy.reshape(-1, dy.shape[-1])                               # (M, out)
        if ctx.needs_input_grad[1]:
            dw = _onednn_mm(dy2.t(), x.reshape(-1, x.shape[-1]).t())     # (out, M) @ (M, in)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


# oneDNN costs more per call than F.linear, so it only pays on big enough GEMMs (the threshold
# is measured: docs/performance.md). The real size's smallest (4 beams x 768 x 768) stays on
# oneDNN; most of the tiny model's go to F.linear.
ONEDNN_MIN_MACS = 2**21


def linear(x, weight, bias=None):
    """F.linear, through oneDNN for fp32 CPU tensors outside autocast, at least
    ONEDNN_MIN_MACS multiply-adds big."""
    if not (ONEDNN_AVAILABLE and x.is_cpu and x.dtype == weight.dtype == torch.float32
            and x.numel() and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
            and not torch.is_autocast_enabled('cpu')):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return _onednn_mm(x, weight, bias)


class OneDNNLinear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model):
    """Turns every plain nn.Linear in model (Hugging Face's too) into a OneDNNLinear, in
    place: same weights and state_dict, another kernel. A no-op where oneDNN is missing."""
    if ONEDNN_AVAILABLE:
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = OneDNNLinear
    return model


# -----------------------------------------------------------------------------
# Freed memory
#
# glibc gives every block above 32 MB back to the OS when it is freed, and at the
# real size many activations are that big (SigLIP's MLP at batch 16: (16, 577, 3072),
# 113 MB). Each new one then costs page faults and the kernel zeroing it. Kept, they
# are reused, as a GPU caching allocator reuses its blocks; the price is a somewhat
# higher peak resident size, kept until the process exits (docs/performance.md).

def glibc():
    """The C library through ctypes when it is glibc (Linux), else None."""
    import ctypes
    try:
        if os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc'):
            return ctypes.CDLL(None)
    except (ValueError, OSError, AttributeError):
        pass
    return None


def keep_freed_memory():
    """Makes glibc keep freed memory in the process for the next tensors (no mmap, no
    trim). Returns whether it could (Linux with glibc)."""
    libc = glibc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory():
    """Hands freed heap pages back to the OS (glibc's malloc_trim); bench.py calls it
    before resetting the peak-memory mark, so each measurement has its own peak, and
    demo.py after a large upload. A no-op without glibc."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


# -----------------------------------------------------------------------------
# A lean beam-search cache
#
# Beam search reorders every cached key and value at every step. The decoder's
# cross-attention ones are equal across an image's beams (all read its visual
# tokens), so only the self-attention cache needs it: the same beams in less time
# (docs/performance.md).

def generate_cache_kwarg(version):
    """generate's name for the cache: transformers 5.24 renamed past_key_values to cache
    (the old name warns). Only the leading major.minor is read, so '5.26rc1' parses."""
    major_minor = tuple(map(int, re.match(r'(\d+)\.(\d+)', version).groups()))
    return 'cache' if major_minor >= (5, 24) else 'past_key_values'


def lean_beam_cache():
    """An encoder-decoder cache whose beam reordering touches self-attention only."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    cache.reorder_cache = cache.self_attention_cache.reorder_cache
    return cache


def use_lean_beam_cache(model):
    """Makes model.generate start each call with a lean_beam_cache()."""
    import transformers
    kwarg, generate = generate_cache_kwarg(transformers.__version__), model.generate

    def generate_with_lean_cache(*args, **kwargs):
        kwargs.setdefault(kwarg, lean_beam_cache())
        return generate(*args, **kwargs)
    model.generate = generate_with_lean_cache
    return model
