"""hardware.py: device and dtype resolution, and the opt-in CPU kernels, which must give
the model's results (to fp32 rounding) by another path."""
import pytest
import torch

import hardware
from chexquery import CheXQuery, tiny_config

S, V = 64, 64


def tiny():
    torch.manual_seed(0)
    return CheXQuery(tiny_config(vocab_size=V, image_size=S))


def batch(B=2, T=10):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, S, S, generator=g)
    tokens = torch.randint(3, V, (B, T), generator=g)
    decoder_input_ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens[:, :-1]], 1)
    return images, decoder_input_ids, tokens, torch.randint(0, 2, (B, 14), generator=g).float()


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


def test_cpu_kernels_give_the_same_beams_as_the_plain_model():
    """The lean beam cache reorders the self-attention cache alone and the linears run on
    oneDNN: the beams and their scores are those of the plain model."""
    plain, fast = tiny().eval(), hardware.use_cpu_kernels(tiny().eval())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, S, S, generator=g)
    kw = dict(num_beams=4, num_return_sequences=4, no_repeat_ngram_size=0, min_length=24, max_length=24,
              output_scores=True, return_dict_in_generate=True)
    ours, theirs = fast.generate(images, [0], **kw), plain.generate(images, [0], **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, atol=1e-4, rtol=1e-4)


def test_freed_memory_switches_report_whether_glibc_took_them():
    """What they do to the process's memory is bench.py's to measure; here only that they run."""
    assert hardware.keep_freed_memory() == (hardware.glibc() is not None)
    hardware.release_freed_memory()


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
