"""
Low-rank adaptation (LoRA, Hu et al. 2021), written out by hand.

A frozen linear layer W gets a trainable low-rank update:

    y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · (alpha / r)      A: (r, in), B: (out, r)

A starts Kaiming-uniform and B at zero, so a freshly injected model computes
exactly what the base model did. After training, merge() folds B·A into W for
inference at no extra cost; unmerge() takes it back out. Nothing merges by
itself in train() or eval(): the caller decides. The layout follows
microsoft/LoRA's loralib and minLoRA.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        # two thin matmuls, (.., in) -> (.., r) -> (.., out): never form the (out, in) product
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self):
        """B·A·scaling in fp32, the update merge() adds to W."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def inject_lora(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0):
    """Wraps every nn.Linear whose last name component is in targets (e.g. ('q_proj', 'v_proj')).
    Call it after the pretrained weights are loaded. Returns the wrapped module names."""
    targets = tuple(targets)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.split('.')[-1] in targets]
    if not found:
        raise ValueError(f"inject_lora: no nn.Linear in {type(model).__name__} is named any of {targets}")
    for name, linear in found:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r, alpha, dropout))
    return [name for name, _ in found]


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_as_trainable(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad_('lora_' in name)


def lora_state_dict(model: nn.Module):
    """The adapter alone: exactly the lora_A / lora_B tensors."""
    return {k: v for k, v in model.state_dict().items() if 'lora_' in k}


def check_state_dict(expected, given, source):
    """Raises one error listing every missing, unexpected and wrongly shaped key of the
    state dict `given` against `expected` (name -> tensor); `source` names where it came from."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    shapes = [f"{k}: {tuple(given[k].shape)} vs {tuple(v.shape)} expected" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the model:\n"
                         f"  missing ({len(missing)}): {missing[:10]}\n"
                         f"  unexpected ({len(unexpected)}): {unexpected[:10]}\n"
                         f"  shape mismatches ({len(shapes)}): {shapes[:10]}")


def load_lora_state_dict(model: nn.Module, state_dict, source='LoRA state dict'):
    """Loads an adapter, requiring exactly the model's LoRA keys with matching shapes."""
    check_state_dict(lora_state_dict(model), state_dict, source)
    model.load_state_dict(state_dict, strict=False)


def merge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()
