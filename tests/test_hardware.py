"""hardware.py: device and dtype resolution, and the opt-in CPU kernels, which must give
the model's results (to fp32 rounding) by another path."""
import ctypes
import os

import pytest
import torch

import hardware
from conftest import S, batch, tiny


def test_device_and_dtype_resolution():
    assert hardware.resolve_device('cpu') == 'cpu' and hardware.resolve_device('cuda:1') == 'cuda:1'
    assert hardware.resolve_device('auto') == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert hardware.resolve_dtype('auto', 'cpu') == torch.float32
    assert hardware.resolve_dtype('bfloat16', 'cpu') == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of float32"):
        hardware.resolve_dtype('fp8', 'cpu')
    with hardware.autocast('cpu', torch.bfloat16):
        assert torch.is_autocast_enabled('cpu')
    with hardware.autocast('cpu', torch.float32):
        assert not torch.is_autocast_enabled('cpu')


needs_onednn = pytest.mark.skipif(not hardware.ONEDNN_AVAILABLE, reason='oneDNN linear is used on x86-64 only')


@needs_onednn
@pytest.mark.parametrize('shape,bias,weight_trains', [((5, 7), True, True), ((3, 5, 7), False, True),
                                                      ((3, 5, 7), True, False), ((7,), True, True)])
def test_onednn_linear_matches_f_linear_forward_and_backward(shape, bias, weight_trains, monkeypatch):
    monkeypatch.setattr(hardware, 'ONEDNN_MIN_MACS', 0)  # these shapes are below it
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 11, bias=bias)
    layer.weight.requires_grad_(weight_trains)
    x = torch.randn(*shape, requires_grad=True)
    params = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]
    y_ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, params, dy)
    y = hardware.linear(x, layer.weight, layer.bias)
    assert y.grad_fn is not None and 'OneDNN' in type(y.grad_fn).__name__  # the oneDNN path ran
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(torch.autograd.grad(y, params, dy), grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_linear_leaves_small_gemms_to_f_linear_and_takes_big_ones():
    small_x, big_x = torch.randn(4, 128, requires_grad=True), torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, 256)
    assert 'OneDNN' not in type(hardware.linear(small_x, torch.randn(128, 128)).grad_fn).__name__
    assert 'OneDNN' in type(hardware.linear(big_x, w).grad_fn).__name__  # 64 x 256 x 256 = 4.2 million


def test_linear_falls_back_to_f_linear_off_the_fp32_cpu_path():
    w = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(hardware.linear(x, w), torch.nn.functional.linear(x, w))  # oneDNN has no fp64
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast casts for F.linear, not for oneDNN
        assert hardware.linear(x.float(), w.float()).dtype == torch.bfloat16


@needs_onednn
def test_every_linear_of_the_model_runs_on_onednn_with_the_same_result(monkeypatch):
    monkeypatch.setattr(hardware, 'ONEDNN_MIN_MACS', 0)  # the tiny model's linears are below it
    m = hardware.use_onednn_linears(tiny())
    m.set_phase(2, full_backbones=True)
    assert not [n for n, mod in m.named_modules() if type(mod) is torch.nn.Linear]
    assert sum(isinstance(mod, hardware.OneDNNLinear) for mod in m.modules()) > 20
    images, dec, labels, cond = batch()
    m.eval()

    def loss_and_grads():
        m.zero_grad()
        out = m(images, dec, labels, cond)
        (out['loss_gen'] + out['loss_aux']).backward()
        return out['loss_gen'], {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    monkeypatch.setattr(hardware, 'ONEDNN_AVAILABLE', False)
    loss_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) > 50
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-4, rtol=1e-3, msg=n)


def test_generate_cache_kwarg_follows_the_transformers_rename():
    assert [hardware.generate_cache_kwarg(v) for v in ('5.0.0', '5.23.0', '5.24.0', '5.26rc1', '5.24.0.dev0', '6.1')] \
        == ['past_key_values', 'past_key_values', 'cache', 'cache', 'cache', 'cache']


def test_cpu_kernels_give_the_same_beams_as_the_plain_model(monkeypatch):
    """The lean beam cache reorders the self-attention cache alone and the linears run on
    oneDNN: the beams and their scores are those of the plain model."""
    monkeypatch.setattr(hardware, 'ONEDNN_MIN_MACS', 0)  # the tiny model's linears are below it
    calls = dict(onednn=0, lean_cache=0)

    def counted(name, f):
        def call(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)
        return call
    monkeypatch.setattr(hardware, '_onednn_mm', counted('onednn', hardware._onednn_mm))
    monkeypatch.setattr(hardware, 'lean_beam_cache', counted('lean_cache', hardware.lean_beam_cache))
    plain, fast = tiny().eval(), hardware.use_cpu_kernels(tiny().eval())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, S, S, generator=g)
    kw = dict(num_beams=4, num_return_sequences=4, no_repeat_ngram_size=0, min_length=24, max_length=24,
              output_scores=True, return_dict_in_generate=True)
    theirs = plain.generate(images, [0], **kw)
    assert calls == dict(onednn=0, lean_cache=0)
    ours = fast.generate(images, [0], **kw)
    assert calls['lean_cache'] == 1 and (calls['onednn'] > 100) == hardware.ONEDNN_AVAILABLE  # both ran
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)


def resident_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


@pytest.mark.skipif(hardware.glibc() is None or not os.path.exists('/proc/self/statm'), reason='glibc on Linux')
def test_freed_memory_is_kept_until_released():
    """After keep_freed_memory, a freed 64 MB block stays in the process (glibc would otherwise
    unmap it at once); release_freed_memory hands it back to the OS."""
    libc, size = hardware.glibc(), 64 * 2**20
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert hardware.keep_freed_memory()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touched: its pages are resident now
    before = resident_mb()
    libc.free(block)
    kept = resident_mb()
    hardware.release_freed_memory()
    released = resident_mb()
    assert kept > before - 16, (before, kept)           # freed, but still the process's
    assert released < kept - 48, (kept, released)      # back to the OS


@needs_onednn
def test_the_opaque_onednn_op_torch_compile_sees_is_a_valid_custom_op():
    x, w, b = torch.randn(3, 5, 7), torch.randn(11, 7), torch.randn(11)
    torch.library.opcheck(hardware._onednn_mm_opaque, (x, w, b))
    torch.library.opcheck(hardware._onednn_mm_opaque, (x, w.t().contiguous().t(), None))  # a strided weight
    torch.testing.assert_close(hardware._onednn_mm_opaque(x, w, b), torch.nn.functional.linear(x, w, b))


@pytest.mark.slow
@needs_onednn
def test_torch_compile_of_a_model_on_cpu_kernels_gives_the_eager_loss_and_gradients(monkeypatch):
    """Under torch.compile the oneDNN linears go through the opaque op (Inductor's own fusion of
    mkldnn linears fails on trained weights); the step must be the eager one. About a minute."""
    monkeypatch.setattr(hardware, 'ONEDNN_MIN_MACS', 0)  # every linear on oneDNN, small as they are
    m = hardware.use_cpu_kernels(tiny())
    m.set_phase(2)
    m.eval()  # no dropout: the two runs must see the same function
    images, dec, labels, cond = batch()

    def loss_and_grads(f):
        m.zero_grad()
        out = f(images, dec, labels, cond)
        (out['loss_gen'] + out['loss_aux']).backward()
        return out['loss_gen'], {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    loss, grads = loss_and_grads(torch.compile(m))
    loss_ref, grads_ref = loss_and_grads(m)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-4, rtol=1e-3, msg=n)
