"""
Measures what users of CheXQuery care about, at the real size (SigLIP-base-patch16-384
+ Flan-T5-base shapes, random weights, nothing downloaded) and at the tiny size:

    python bench.py                       # both sizes, table + bench.json
    python bench.py --size=tiny           # seconds; what the tests run
    python bench.py --device_peak_tflops=312 --device_name='A100 bf16'   # projection target

1. training step time and images/s per phase, forward and backward apart; peak memory;
   analytic FLOPs per image; achieved FLOP/s against this machine's measured matmul peak (MFU)
2. generation: reports/s of batched beam search (4 beams, 128 new tokens) at batch 1 and 16
3. the data path: samples/s per worker to decode + augment one sample, from a prepared
   (448 px) image and from a full-size 2k x 2.5k PNG like IU X-ray's originals
4. our LoRA against peft's on the same modules, when peft is installed
5. the projected wall time of the methodology's three-phase schedule on IU X-ray
Targets are shown as met or missed. This is a measurement, never a timed test.
"""
import json
import os
import platform
import sys
import tempfile
import time

import torch

# -----------------------------------------------------------------------------
size = 'both'                 # 'tiny', 'real' or 'both'
batch_size = 8                # training batch per step (the peak-memory record is phase 2 at batch 8)
seq_len = 128                 # decoder tokens per report (IU reports are ~60-120 Flan-T5 tokens)
steps = 2                     # timed steps per measurement
warmup_steps = 3              # untimed first steps: see train_step
gen_new_tokens = 128
data_samples = 40             # samples timed per data-path measurement
device = 'auto'
out = 'bench.json'
device_peak_tflops = 312.0    # projection target: A100 bf16 dense peak
device_name = 'A100 bf16'
onednn_linear = True          # False: PyTorch's own F.linear (MKL on x86 CPUs), for comparison
iu_train_images = 0           # 0: 70% of IU X-ray's frontal images, counted from ../shared/iu_xray when present
# -----------------------------------------------------------------------------
SCHEDULE = ((1, 5), (2, 15), (3, 5))  # the methodology's (phase, epochs)
IU_FRONTAL_IMAGES = 3818              # frontal rows of indiana_projections.csv, when the table is absent


def fmt(x):
    return f"{x:.3g}" if isinstance(x, float) else str(x)


class Timer:
    def __init__(self, dev):
        self.dev = dev

    def now(self):
        if self.dev.startswith('cuda'):
            torch.cuda.synchronize()
        return time.perf_counter()


def reset_peak_memory(dev):
    if dev.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        return
    from chexquery import glibc
    libc = glibc()
    if libc is not None:  # hand freed pages back first, or keep_freed_memory carries the last peak over
        libc.malloc_trim(0)
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mb(dev):
    if dev.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2**20
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM'):
                return int(line.split()[1]) / 1024
    return float('nan')


def matmul_peak(dev, n=2048, reps=10):
    """This machine's fp32 matmul FLOP/s, the denominator of the MFU-style ratio: the
    best of torch.matmul (MKL on x86 CPUs) and, on the CPU, oneDNN as chexquery.linear
    runs it. Both are returned, {path: FLOP/s}."""
    import chexquery
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    paths = {'torch.matmul': lambda: a @ b}
    if chexquery.ONEDNN_LINEAR and dev == 'cpu':
        paths['oneDNN'] = lambda: chexquery.linear(a, b)
    t, out = Timer(dev), {}
    for name, f in paths.items():
        f()
        best = 0.0
        for _ in range(3):
            t0 = t.now()
            for _ in range(reps):
                f()
            best = max(best, reps * 2 * n ** 3 / (t.now() - t0))
        out[name] = best
    return out


# -----------------------------------------------------------------------------
# FLOPs, counted analytically (a multiply-add is 2 FLOPs)

def forward_flops(model, T):
    """Forward FLOPs per image by part, for a decoder reading T tokens at once."""
    vc, tc, cfg = model.vision.config, model.t5.config, model.cfg
    D, N = vc.hidden_size, (vc.image_size // vc.patch_size) ** 2
    Q, P, F = cfg.n_queries, cfg.n_pool_queries, cfg.ffn_dim
    r_v, r_t = cfg.vision_lora_r, cfg.text_lora_r
    f = {}
    # SigLIP: patch embedding, layers (attention projections, scores, MLP), pooling head
    f['embed'] = 2 * N * 3 * vc.patch_size ** 2 * D
    f['layers'] = vc.num_hidden_layers * (2 * N * 4 * D * D + 2 * 2 * N * N * D + 2 * N * 2 * D * vc.intermediate_size)
    f['head'] = 2 * N * 2 * D * D + 2 * 2 * D * D + 2 * 2 * D * vc.intermediate_size
    f['vis_lora'] = vc.num_hidden_layers * 2 * 2 * N * r_v * 2 * D
    # queries over patches: q/o on 20 queries, k/v on the N patches, scores, FFN
    f['kv_patches'] = cfg.n_cross_layers * 2 * N * 2 * D * D
    xattn = cfg.n_cross_layers * (2 * Q * 2 * D * D + 2 * 2 * Q * N * D + 2 * Q * 2 * D * F) + f['kv_patches']
    fusion = 2 * 2 * D * D + 2 * D + 2 * (P + 2 * Q) * 2 * D * D + 2 * 2 * P * Q * D
    aux = 2 * 14 * (D * cfg.aux_hidden + cfg.aux_hidden)
    f['new'] = xattn + fusion + aux
    # T5 decoder: self-attention, cross-attention over 11 tokens, gated FFN, lm_head
    d, inner, L = tc.d_model, tc.num_heads * tc.d_kv, tc.num_decoder_layers
    ffn = (3 if tc.is_gated_act else 2) * d * tc.d_ff
    f['self_attn'] = 2 * T * 4 * d * inner + 2 * 2 * T * T * inner
    f['cross_kv'] = L * 2 * 11 * 2 * d * inner  # keys and values of the 11 visual tokens
    f['dec'] = L * (f['self_attn'] + 2 * T * 2 * d * inner + 2 * 2 * T * 11 * inner + 2 * T * ffn) \
        + f['cross_kv'] + 2 * T * d * tc.vocab_size
    f['dec_lora'] = L * 2 * 4 * 2 * r_t * (T * (d + inner) // 2) + L * 2 * 2 * r_t * 11 * (d + inner)
    return f


def flops_per_image(model, T, phase, cached=False):
    """(forward, backward) FLOPs per image for a training step of `phase`.
    Backward costs 2x forward where weights train (input and weight gradients),
    1x where only the input gradient is needed (a frozen module that gradients
    flow through), 0 where nothing upstream trains (frozen SigLIP under no_grad;
    in phase 1 the decoder's first self-attention, which sees no visual token).
    cached: phase 1 from cached SigLIP outputs, which runs no SigLIP at all."""
    f = forward_flops(model, T)
    vision = f['embed'] + f['layers'] + f['head'] + f['vis_lora']
    fwd = (0 if cached else vision) + f['new'] + f['dec'] + f['dec_lora']
    if phase == 2:  # input gradients through SigLIP (not into the pixels), LoRA weight gradients
        vis_bwd = f['layers'] + f['head'] + 2 * f['vis_lora']
    else:           # frozen: nothing flows into SigLIP, nor into the patches
        vis_bwd = -f['kv_patches'] // 2
    dec_bwd = f['dec'] + (2 * f['dec_lora'] if phase > 1 else f['dec_lora'] - f['self_attn'])
    return fwd, vis_bwd + 2 * f['new'] + dec_bwd


def generation_flops_per_report(model, beams, new_tokens):
    """FLOPs of one report by beam search with LoRA folded in: encoding the image once,
    then each of the beams decodes new_tokens one at a time over its growing cache (the
    prompt's start token first). The same for every batch size: batching shares no work."""
    f, tc = forward_flops(model, 1), model.t5.config
    inner, L = tc.num_heads * tc.d_kv, tc.num_decoder_layers
    encode = f['embed'] + f['layers'] + f['head'] + f['new']
    per_token = f['dec'] - f['cross_kv'] - L * 2 * 2 * inner  # cross k/v: once per hypothesis; 1x1 scores: below
    # token t (1-based) attends over t cached positions: 2 * 2 * t * inner per layer
    attention = L * 2 * 2 * inner * new_tokens * (new_tokens + 1) // 2
    return encode + beams * (f['cross_kv'] + new_tokens * per_token + attention)


def schedule_flops(model, n_train):
    """FLOPs of the methodology's three phases over n_train images, at seq_len tokens."""
    return sum(epochs * n_train * sum(flops_per_image(model, seq_len, phase)) for phase, epochs in SCHEDULE)


# -----------------------------------------------------------------------------
# measurements

def build(which, dev):
    from chexquery import CheXQuery, CheXQueryConfig, SIGLIP_BASE_384, FLAN_T5_BASE, tiny_config
    torch.manual_seed(0)
    cfg = (CheXQueryConfig(vision_config=SIGLIP_BASE_384, text_config=FLAN_T5_BASE, query_init='random')
           if which == 'real' else tiny_config())
    return CheXQuery(cfg).to(dev)


def batch(model, B, dev):
    S, V = model.cfg.image_size, model.t5.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (B, seq_len), generator=g)
    return dict(images=torch.randn(B, 3, S, S, generator=g).to(dev), decoder_input_ids=ids.to(dev),
                labels=ids.roll(-1, 1).to(dev), cond_labels=(torch.rand(B, 14, generator=g) > 0.8).float().to(dev))


def train_step(model, phase, B, dev, from_features=False):
    """Mean seconds of forward, backward and optimizer step of one training step."""
    model.set_phase(phase, aux=phase != 3)
    model.train()
    b = batch(model, B, dev)
    features = None
    if from_features:  # phase 1 with the frozen encoder's outputs cached
        with torch.no_grad():
            features = model.vision_features(b['images'])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t, times = Timer(dev), []
    for i in range(warmup_steps + steps):
        t0 = t.now()
        out = model(None if from_features else b['images'], b['decoder_input_ids'], b['labels'], b['cond_labels'],
                    label_smoothing=0.1 if phase > 1 else 0.0, features=features)
        loss = out['loss_gen'] + (0.3 * out['loss_aux'] if phase != 3 else 0)
        t1 = t.now()
        loss.backward()
        t2 = t.now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = t.now()
        # The first steps warm up kernels and the allocator: glibc maps fresh pages for every
        # tensor above its mmap threshold, which it raises only as big blocks are freed. At the
        # real size, phase 2's second step spent 8 s in page faults; its fourth, 0.3 s.
        if i >= warmup_steps:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    return [sum(x) / len(x) for x in zip(*times)]


def bench_training(model, dev, peak):
    rows = {}
    for name, phase, cached in (('phase1', 1, False), ('phase2', 2, False), ('phase3', 3, False),
                                ('phase1_cached', 1, True)):
        reset_peak_memory(dev)
        fwd, bwd, opt = train_step(model, phase, batch_size, dev, from_features=cached)
        f, b = flops_per_image(model, seq_len, phase, cached)
        step = fwd + bwd + opt
        rows[name] = dict(forward_s=fwd, backward_s=bwd, optimizer_s=opt, step_s=step,
                          images_per_s=batch_size / step, flops_per_image=f + b,
                          achieved_gflops=(f + b) * batch_size / step / 1e9,
                          mfu=(f + b) * batch_size / step / peak, peak_memory_mb=peak_memory_mb(dev))
    return rows


def bench_generation(model, dev):
    """Reports/s of beam search (4 beams) writing exactly gen_new_tokens tokens, with LoRA
    folded into the weights as sample.py and eval.py run it."""
    import lora
    model.eval()
    lora.merge_lora(model)
    out, t = {}, Timer(dev)
    flops = generation_flops_per_report(model, 4, gen_new_tokens)  # per report, at any batch size
    for B in (1, 16):
        images = batch(model, B, dev)['images']
        n = gen_new_tokens + 1  # the start token, then exactly gen_new_tokens new ones
        kw = dict(num_beams=4, no_repeat_ngram_size=3, min_length=n, max_length=n)
        model.generate(images[:1], [0], **dict(kw, min_length=4, max_length=4))  # warm-up
        dt = float('inf')
        for _ in range(2):  # the better of two: this shared machine's noise only ever adds time
            t0 = t.now()
            ids = model.generate(images, [0], **kw)
            dt = min(dt, t.now() - t0)
        out[f'batch{B}'] = dict(seconds=dt, reports_per_s=B / dt, new_tokens=ids.shape[1] - 1,
                                flops_per_report=flops, achieved_gflops=flops * B / dt / 1e9)
    out['speedup_16_vs_1'] = out['batch16']['reports_per_s'] / out['batch1']['reports_per_s']
    lora.unmerge_lora(model)
    return out


def bench_data(tmpdir):
    """Training samples/s on one core: decode + augment at 384 px, from a prepared (448 px
    short side) PNG and from a full-size 2000 x 2500 PNG like IU X-ray's originals."""
    import numpy as np
    from PIL import Image
    import data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a data worker is one process on one core
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2500, 0:2000]
    full = (128 + 60 * np.sin(xx / 37) * np.cos(yy / 53) + rng.normal(0, 12, (2500, 2000))).clip(0, 255).astype(np.uint8)
    paths = {'prepared 448 px': os.path.join(tmpdir, 'prepared.png'), 'full size 2000x2500': os.path.join(tmpdir, 'full.png')}
    Image.fromarray(full).save(paths['full size 2000x2500'])
    data.resize_copy((paths['full size 2000x2500'], paths['prepared 448 px'], 448))  # what data.py writes
    transform, out = data.train_transform(384), {}
    for name, path in paths.items():
        n = data_samples if 'prepared' in name else max(3, data_samples // 10)
        transform(data.load_image(path))
        t0 = time.perf_counter()
        for _ in range(n):
            transform(data.load_image(path))
        out[name] = dict(samples_per_s_per_core=n / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    return out


def bench_lora_vs_peft(dev):
    """Our LoRA against peft's on SigLIP-base's q_proj and v_proj (r 8, alpha 16): the same
    outputs after copying the adapters across, and the step-time ratio."""
    try:
        import peft
    except ImportError:
        return None
    import copy
    from transformers import SiglipVisionConfig, SiglipVisionModel
    import lora
    from chexquery import SIGLIP_BASE_384
    torch.manual_seed(0)
    base = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_BASE_384)).to(dev).eval()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    lora.inject_lora(ours, ('q_proj', 'v_proj'), r=8, alpha=16)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=['q_proj', 'v_proj']))
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(0, 0.02)  # non-zero B, so the comparison tests the adapter path too
                p = theirs.get_submodule('base_model.model.' + name)
                p.lora_A['default'].weight.copy_(m.lora_A)
                p.lora_B['default'].weight.copy_(m.lora_B)
    lora.mark_only_lora_as_trainable(ours)
    x = torch.randn(2, 3, 384, 384, device=dev)
    with torch.no_grad():
        diff = (ours(pixel_values=x).last_hidden_state - theirs(pixel_values=x).last_hidden_state).abs().max().item()
    t, times = Timer(dev), {}
    for name, m in (('ours', ours), ('peft', theirs), ('ours ', ours), ('peft ', theirs)):  # interleaved, twice
        m.train()
        best = float('inf')
        for _ in range(steps + 3):
            t0 = t.now()
            m(pixel_values=x).last_hidden_state.float().pow(2).mean().backward()
            best = min(best, t.now() - t0)
        times[name.strip()] = min(best, times.get(name.strip(), float('inf')))
    return dict(max_abs_diff=diff, ours_step_s=times['ours'], peft_step_s=times['peft'],
                time_ratio=times['ours'] / times['peft'])


def iu_train_count():
    if iu_train_images:
        return iu_train_images
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'iu_xray', 'indiana_projections.csv')
    n = IU_FRONTAL_IMAGES
    if os.path.exists(path):
        import csv
        with open(path, newline='') as f:
            n = sum(r['projection'] == 'Frontal' for r in csv.DictReader(f))
    return round(0.7 * n)


def targets(r):
    """(target, measured, met?) rows of the issue's targets, for the real size."""
    t, rows = r['training'], []
    rows.append(('phase-2 step >= 60% of the matmul peak', f"{t['phase2']['mfu']:.0%}", t['phase2']['mfu'] >= 0.6))
    # Beside each speed ratio, its FLOP ratio: a target past it asks the faster side to run at a
    # higher FLOP rate than the other (0.45x against FLOPs of 0.62x: 1.4x phase 2's rate).
    flops = {k: v['flops_per_image'] for k, v in t.items()}
    ratio = t['phase1']['step_s'] / t['phase2']['step_s']
    rows.append(('phase-1 step <= 0.45x phase-2 step',
                 f"{ratio:.2f}x (FLOPs {flops['phase1'] / flops['phase2']:.2f}x)", ratio <= 0.45))
    speed = t['phase1']['step_s'] / t['phase1_cached']['step_s']
    rows.append(('cached phase-1 epochs >= 5x faster',
                 f"{speed:.1f}x (FLOPs {flops['phase1'] / flops['phase1_cached']:.1f}x)", speed >= 5))
    d = r['data']['prepared 448 px']['samples_per_s_per_core']
    rows.append(('data path >= 100 samples/s/core (prepared)', f"{d:.0f}/s", d >= 100))
    g = r['generation']
    rows.append(('generation batch 16 >= 4x batch 1 reports/s',  # a report costs the same FLOPs at any batch
                 f"{g['speedup_16_vs_1']:.1f}x (FLOPs 1.0x; {g['batch1']['achieved_gflops']:.0f} vs "
                 f"{g['batch16']['achieved_gflops']:.0f} GFLOP/s)", g['speedup_16_vs_1'] >= 4))
    if r.get('lora_vs_peft'):
        lp = r['lora_vs_peft']
        rows.append(('our LoRA within 5% of peft, diff <= 1e-5', f"{lp['time_ratio']:.3f}x, {lp['max_abs_diff']:.1e}",
                     lp['time_ratio'] <= 1.05 and lp['max_abs_diff'] <= 1e-5))
    rows.append((f'peak memory, phase 2, batch {batch_size}, fp32 (no target)', f"{t['phase2']['peak_memory_mb']:.0f} MB", None))
    return rows


def run(which, dev, peak, data_speed):
    t0 = time.time()
    model = build(which, dev)
    r = dict(size=which, params=sum(p.numel() for p in model.parameters()), batch_size=batch_size, seq_len=seq_len)
    if which == 'real':
        r['data'] = data_speed
    r['training'] = bench_training(model, dev, peak)
    r['generation'] = bench_generation(model, dev)
    n = iu_train_count()
    flops = schedule_flops(model, n)
    r['projection'] = dict(iu_train_images=n, schedule_flops=flops, device=device_name, device_peak_tflops=device_peak_tflops,
                           mfu=r['training']['phase2']['mfu'],
                           hours=flops / (r['training']['phase2']['mfu'] * device_peak_tflops * 1e12) / 3600,
                           hours_this_machine=flops / (r['training']['phase2']['mfu'] * peak) / 3600)
    if which == 'real':
        r['lora_vs_peft'] = bench_lora_vs_peft(dev)
        r['targets'] = [dict(target=a, measured=b, met=c) for a, b, c in targets(r)]
    r['seconds'] = time.time() - t0
    return r


def report(r):
    print(f"\n== {r['size']} size: {r['params']:,} parameters, batch {r['batch_size']}, {r['seq_len']} decoder tokens")
    print(f"{'':<14}{'fwd s':>8}{'bwd s':>8}{'opt s':>8}{'step s':>8}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'MFU':>6}{'peak MB':>9}")
    for k, v in r['training'].items():
        extra = (f"{v['flops_per_image'] / 1e9:>11.1f}{v['achieved_gflops']:>9.1f}{v['mfu']:>6.0%}{v['peak_memory_mb']:>9.0f}"
                 if 'mfu' in v else '')
        print(f"{k:<14}{v['forward_s']:>8.3f}{v['backward_s']:>8.3f}{v['optimizer_s']:>8.3f}{v['step_s']:>8.3f}"
              f"{v['images_per_s']:>8.2f}" + extra)
    g = r['generation']
    print(f"generation (4 beams, {gen_new_tokens} new tokens, {g['batch1']['flops_per_report'] / 1e9:.1f} GFLOP per "
          f"report): batch 1 {g['batch1']['reports_per_s']:.3f} reports/s ({g['batch1']['achieved_gflops']:.1f} GFLOP/s), "
          f"batch 16 {g['batch16']['reports_per_s']:.3f} reports/s ({g['batch16']['achieved_gflops']:.1f} GFLOP/s): "
          f"{g['speedup_16_vs_1']:.1f}x")
    p = r['projection']
    print(f"three-phase schedule on IU X-ray ({p['iu_train_images']} train images, 5+15+5 epochs): "
          f"{p['schedule_flops'] / 1e15:.1f} PFLOP; at this MFU ({p['mfu']:.0%}) on {p['device']} "
          f"({p['device_peak_tflops']:.0f} TFLOP/s): {p['hours']:.2f} h; on this machine: {p['hours_this_machine']:.0f} h")
    for name, v in r.get('data', {}).items():
        print(f"data path, {name}: {v['samples_per_s_per_core']:.1f} samples/s per core")
    if r.get('lora_vs_peft'):
        lp = r['lora_vs_peft']
        print(f"LoRA vs peft (SigLIP q/v, batch 2): ours {lp['ours_step_s']:.3f}s, peft {lp['peft_step_s']:.3f}s "
              f"({lp['time_ratio']:.3f}x), max |diff| {lp['max_abs_diff']:.1e}")
    for t in r.get('targets', []):
        status = '-' if t['met'] is None else 'met' if t['met'] else 'MISSED'
        print(f"  [{status:>6}] {t['target']:<50} {t['measured']}")


def main():
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    import chexquery
    if dev == 'cpu':
        chexquery.keep_freed_memory()  # as train.py and sample.py do
    peaks = matmul_peak(dev)  # the machine's peak: with oneDNN wherever it is available
    peak = max(peaks.values())
    chexquery.ONEDNN_LINEAR = chexquery.ONEDNN_LINEAR and onednn_linear
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(), device=dev,
                   cuda=torch.cuda.get_device_name() if dev.startswith('cuda') else None,
                   load_average=os.getloadavg(), matmul_peak_gflops=peak / 1e9, onednn_linear=chexquery.ONEDNN_LINEAR,
                   matmul_gflops={k: v / 1e9 for k, v in peaks.items()})
    print(f"{machine['processor']}, {machine['cpus']} CPUs, torch {machine['torch']} on {dev}; "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s ("
          + ', '.join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + f"); linear layers on "
          f"{'oneDNN' if chexquery.ONEDNN_LINEAR else 'F.linear'}; load average {machine['load_average'][0]:.2f}")
    results = dict(machine=machine, runs=[])
    with tempfile.TemporaryDirectory() as tmpdir:
        # The data path first, in a process that has run no model yet, as a data worker is.
        data_speed = bench_data(tmpdir) if size in ('real', 'both') else None
        for which in (('tiny', 'real') if size == 'both' else (size,)):
            r = run(which, dev, peak, data_speed)
            report(r)
            results['runs'].append(r)
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
