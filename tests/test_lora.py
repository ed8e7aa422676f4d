import pytest
import torch
import torch.nn as nn

import lora


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.q_proj(x) * self.k_proj(x) + self.v_proj(x)


def block_with_lora(r=4):
    torch.manual_seed(0)
    m = Block()
    names = lora.inject_lora(m, ('q_proj', 'v_proj'), r=r, alpha=8)
    return m, names


def test_inject_replaces_targets_and_is_identity_at_init():
    torch.manual_seed(0)
    base = Block()
    x = torch.randn(3, 16)
    y0 = base(x)
    names = lora.inject_lora(base, ('q_proj', 'v_proj'), r=4, alpha=8)
    assert names == ['q_proj', 'v_proj']
    assert isinstance(base.q_proj, lora.LoRALinear) and isinstance(base.k_proj, nn.Linear)
    assert torch.equal(base(x), y0)  # B = 0: no change at all


def test_inject_raises_when_nothing_matches():
    with pytest.raises(ValueError, match='no nn.Linear'):
        lora.inject_lora(mlp(), ('q_proj',), r=4, alpha=8)


def perturb(m):
    with torch.no_grad():
        for layer in lora.lora_layers(m):
            layer.lora_B.normal_()


def test_merge_equals_unmerged_and_unmerge_restores():
    m, _ = block_with_lora()
    perturb(m)
    m.eval()
    x = torch.randn(5, 16)
    w0 = m.q_proj.base.weight.clone()
    y = m(x)
    lora.merge_lora(m)
    assert m.q_proj.merged and not torch.equal(m.q_proj.base.weight, w0)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora(m)
    torch.testing.assert_close(m.q_proj.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_train_and_eval_never_merge():
    m, _ = block_with_lora()
    m.eval(); m.train()
    assert not any(layer.merged for layer in lora.lora_layers(m))


def test_only_lora_trainable_and_adapter_state_dict():
    m, _ = block_with_lora()
    lora.mark_only_lora_as_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {'q_proj.lora_A', 'q_proj.lora_B', 'v_proj.lora_A', 'v_proj.lora_B'}
    assert set(lora.lora_state_dict(m)) == trainable


def test_a_and_b_both_get_gradients():
    m, _ = block_with_lora()
    lora.mark_only_lora_as_trainable(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 16)
    for _ in range(2):  # at init B = 0, so A's gradient is exactly zero until B moves
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    for layer in lora.lora_layers(m):
        assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
        assert layer.base.weight.grad is None


def test_forward_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 3)
    layer = lora.LoRALinear(base, r=2, alpha=6)
    perturb(layer)
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * 3.0
    torch.testing.assert_close(layer(x), expected)


def test_load_adapter_checks_keys_and_shapes():
    m, _ = block_with_lora()
    perturb(m)
    sd = lora.lora_state_dict(m)
    m2, _ = block_with_lora()
    lora.load_lora_state_dict(m2, sd)
    x = torch.randn(2, 16)
    torch.testing.assert_close(m2(x), m(x))
    with pytest.raises(ValueError, match=r"missing \(2\): \['v_proj"):
        lora.load_lora_state_dict(m2, {k: v for k, v in sd.items() if 'v_proj' not in k})
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['extra'\]"):
        lora.load_lora_state_dict(m2, dict(sd, extra=torch.zeros(1)))
    m3, _ = block_with_lora(r=2)
    with pytest.raises(ValueError, match=r'shape mismatches \(4\)'):
        lora.load_lora_state_dict(m3, sd)


def test_autocast_bf16():
    m, _ = block_with_lora()
    perturb(m)
    x = torch.randn(4, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(x), atol=0.1, rtol=0.05)
