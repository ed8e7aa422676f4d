"""
How fast CheXQuery trains and writes reports, at the real size (SigLIP-base-patch16-384
+ Flan-T5-base shapes, random weights, nothing downloaded) and the tiny size. On the CPU
every row is measured twice, side by side: plain PyTorch, and with
hardware.use_cpu_kernels (what the scripts' --cpu_kernels=True switches on there).

    python bench.py                       # both sizes; a table and bench.json
    python bench.py --size=tiny           # under a minute
    python bench.py --compile=True        # adds phase 2 under torch.compile (minutes of compiling)
    python bench.py --kernels=cpu         # one column only ('plain' or 'cpu')

Rows: a training step (batch_size images, seq_len decoder tokens) in phases 1, 2 and 3 and
in phase 1 from cached SigLIP features; beam search (4 beams, gen_new_tokens tokens) at
batch 1 and 16. Each: its time, its FLOPs (counted analytically; tests check them against
torch's FLOP counter), the FLOP rate, MFU against this machine's fp32 matmul peak measured
in the same run (the better of torch.matmul and oneDNN), and its peak memory. Then each
speed ratio beside its FLOP ratio, the ratio it would have if both sides ran at one FLOP
rate; the data path; our LoRA against peft's. It measures: nothing passes or fails here.
docs/performance.md says how it measures and what limits each row.
"""
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

import hardware

# -----------------------------------------------------------------------------
size = 'both'                 # 'tiny', 'real' or 'both'
kernels = 'both'              # on the CPU: 'both' columns, 'plain' or 'cpu' (hardware.use_cpu_kernels)
compile = False               # True: phase 2 again under torch.compile, in each column
batch_size = 8                # training images per step
seq_len = 128                 # decoder tokens per report (IU reports are ~60-120 Flan-T5 tokens)
steps = 2                     # timed training steps per row: their mean
warmup_steps = 3              # untimed first steps: see train_step
gen_new_tokens = 128
data_samples = 40             # samples timed per data-path measurement
device = 'auto'
out = 'bench.json'
device_peak_tflops = 312.0    # the projection's device: A100 bf16 dense peak
device_name = 'A100 bf16'
iu_train_images = 0           # 0: 70% of IU X-ray's frontal images (from $CHEXQUERY_IU_TABLES when set)
# -----------------------------------------------------------------------------
COLUMNS = {'plain': 'plain PyTorch', 'cpu': 'use_cpu_kernels'}
TRAINING = (('phase1', 1, False), ('phase2', 2, False), ('phase3', 3, False), ('phase1_cached', 1, True))
GENERATION_BATCHES = (1, 16)
SCHEDULE = ((1, 5), (2, 15), (3, 5))  # the methodology's (phase, epochs)
IU_FRONTAL_IMAGES = 3818              # frontal rows of indiana_projections.csv, when the table is absent
# The backbones at the real sizes, built with random weights exactly as google/siglip-base-patch16-384
# and google/flan-t5-base are shaped (also the slow test of the model's dimension table)
SIGLIP_BASE_384 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=384, patch_size=16,
                       hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
FLAN_T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                    num_decoder_layers=12, num_heads=12, feed_forward_proj='gated-gelu',
                    dropout_rate=0.1, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


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
    # keep_freed_memory keeps the last row's pages resident: hand them back first, or the
    # next row's peak starts from the last one's
    hardware.release_freed_memory()
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_memory_mb(dev):
    if dev.startswith('cuda'):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float('nan')


class CPUShare:
    """The share of the cores this process's threads got between start() and stop(): its CPU
    seconds over wall seconds x threads. Well below 1 over timed steps, other processes took
    the cores, and the time says more about them than about the row."""

    def start(self):
        self.cpu, self.wall = sum(os.times()[:2]), time.perf_counter()
        return self

    def stop(self):
        return (sum(os.times()[:2]) - self.cpu) / ((time.perf_counter() - self.wall) * torch.get_num_threads())


def matmul_peak(dev, n=2048, reps=10):
    """{path: FLOP/s} of an n x n fp32 matmul: torch.matmul (MKL on x86 CPUs) and, on an
    x86 CPU, oneDNN as hardware.linear runs it. The best is the MFU denominator."""
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    paths = {'torch.matmul': lambda: a @ b}
    if hardware.ONEDNN_AVAILABLE and dev == 'cpu':
        paths['oneDNN'] = lambda: hardware.linear(a, b)
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


def cpu_name(cpuinfo=None):
    """'AMD EPYC (AuthenticAMD family 26 model 2, AVX-512)' from /proc/cpuinfo, which names
    the microarchitecture where lscpu's model name ('AMD EPYC') does not."""
    if cpuinfo is None:
        try:
            with open('/proc/cpuinfo') as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine()
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    if 'model name' not in fields:
        return platform.processor() or platform.machine()
    simd = 'AVX-512' if 'avx512f' in fields.get('flags', '').split() else 'no AVX-512'
    return (f"{fields['model name']} ({fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {simd})")


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


# -----------------------------------------------------------------------------
# measurements

def build(which, dev):
    """The real- or tiny-size model, seeded: every column starts from the same weights."""
    from chexquery import CheXQuery, CheXQueryConfig, tiny_config
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


def train_step(model, phase, B, dev, from_features=False, compiled=False):
    """Seconds of forward, backward and optimizer step in the fastest of `steps` timed steps
    (noise on a shared machine only ever adds time), the first step's seconds (compiling
    included under torch.compile), and the timed steps' CPU share."""
    model.set_phase(phase, aux=phase != 3)
    model.train()
    b = batch(model, B, dev)
    features = None
    if from_features:  # phase 1 with the frozen encoder's outputs cached
        with torch.no_grad():
            features = model.vision_features(b['images'])
    if compiled:
        torch._dynamo.reset()  # compile afresh for this model and its kernels
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t, times, first = Timer(dev), [], None
    torch.manual_seed(0)  # the same dropout masks in every column
    for i in range(warmup_steps + steps):
        if i == warmup_steps:
            cpu = CPUShare().start()
        t0 = t.now()
        out = run(None if from_features else b['images'], b['decoder_input_ids'], b['labels'], b['cond_labels'],
                  label_smoothing=0.1 if phase > 1 else 0.0, lambda_aux=0.3 if phase != 3 else 0.0, features=features)
        loss = out['loss']
        t1 = t.now()
        loss.backward()
        t2 = t.now()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = t.now()
        first = t3 - t0 if first is None else first
        # The first steps warm up kernels and the allocator: by default glibc maps fresh pages
        # for every tensor above its mmap threshold, which it raises only as big blocks are
        # freed (docs/performance.md).
        if i >= warmup_steps:
            times.append((t1 - t0, t2 - t1, t3 - t2))
    share = cpu.stop()
    del out, loss, opt
    fwd, bwd, step = min(times, key=sum)
    return dict(forward_s=fwd, backward_s=bwd, optimizer_s=step, first_step_s=first, cpu_share=share)


def bench_training(model, dev, rows, log):
    """The training rows: one step of batch_size images each."""
    todo = TRAINING + ((('phase2_compiled', 2, False),) if compile else ())
    for name, phase, cached in todo:
        reset_peak_memory(dev)
        r = train_step(model, phase, batch_size, dev, from_features=cached, compiled=name.endswith('compiled'))
        f, b = flops_per_image(model, seq_len, phase, cached)
        r.update(seconds=r['forward_s'] + r['backward_s'] + r['optimizer_s'], images=batch_size,
                 flops=(f + b) * batch_size, peak_memory_mb=peak_memory_mb(dev), load_average=os.getloadavg()[0])
        rows[name] = r
        log(name, r)
    if compile:
        torch._dynamo.reset()  # drop the compiled graphs and what they hold


def bench_generation(model, dev, rows, log):
    """Beam search (4 beams) writing exactly gen_new_tokens tokens per report, image encoding
    included, with LoRA folded into the weights as sample.py and eval.py run it; the better
    of two calls, as this shared machine's noise only ever adds time."""
    import lora
    model.eval()
    lora.merge_lora(model)
    t = Timer(dev)
    per_report = generation_flops_per_report(model, 4, gen_new_tokens)  # at any batch size
    n = gen_new_tokens + 1  # the start token, then exactly gen_new_tokens new ones
    kw = dict(num_beams=4, no_repeat_ngram_size=3, min_length=n, max_length=n)
    for B in GENERATION_BATCHES:
        images = batch(model, B, dev)['images']
        reset_peak_memory(dev)
        model.generate(images[:1], [0], **dict(kw, min_length=4, max_length=4))  # warm-up
        dt, cpu = float('inf'), CPUShare().start()
        for _ in range(2):
            t0 = t.now()
            ids = model.generate(images, [0], **kw)
            dt = min(dt, t.now() - t0)
        rows[f'generate_b{B}'] = r = dict(seconds=dt, images=B, new_tokens=ids.shape[1] - 1, flops=per_report * B,
                                          peak_memory_mb=peak_memory_mb(dev), load_average=os.getloadavg()[0],
                                          cpu_share=cpu.stop())
        log(f'generate_b{B}', r)
    lora.unmerge_lora(model)


def measure(which, column, dev, log=lambda name, row: None):
    """(parameters, rows): every row of one column at one size, on a freshly built model."""
    model = build(which, dev)
    if column == 'cpu':
        hardware.use_cpu_kernels(model)
    params, rows = sum(p.numel() for p in model.parameters()), {}
    bench_training(model, dev, rows, log)
    bench_generation(model, dev, rows, log)
    del model
    gc.collect()
    return params, rows


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
    data.resize_copy((paths['full size 2000x2500'], paths['prepared 448 px'], 448))  # what prepare.py writes
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
    """Our LoRA against peft's on SigLIP-base's q_proj and v_proj (r 8, alpha 16), both on
    plain F.linear: the same outputs after copying the adapters across, and the step-time
    ratio. None without peft."""
    try:
        import peft
    except ImportError:
        return None
    import copy
    from transformers import SiglipVisionConfig, SiglipVisionModel
    import lora
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
    for name, m in (('ours', ours), ('peft', theirs), ('ours', ours), ('peft', theirs)):  # interleaved, twice
        m.train()
        best = float('inf')
        for _ in range(steps + 3):
            t0 = t.now()
            m(pixel_values=x).last_hidden_state.float().pow(2).mean().backward()
            best = min(best, t.now() - t0)
        times[name] = min(best, times.get(name, float('inf')))
    return dict(max_abs_diff=diff, ours_step_s=times['ours'], peft_step_s=times['peft'],
                time_ratio=times['ours'] / times['peft'])


def iu_train_count():
    if iu_train_images:
        return iu_train_images
    path = os.path.join(os.environ.get('CHEXQUERY_IU_TABLES', ''), 'indiana_projections.csv')
    n = IU_FRONTAL_IMAGES
    if os.path.isfile(path):
        import csv
        with open(path, newline='') as f:
            n = sum(r['projection'] == 'Frontal' for r in csv.DictReader(f))
    return round(0.7 * n)


# -----------------------------------------------------------------------------
# from measurements to the report

def add_rates(rows, peak):
    """Each row's FLOP rate and MFU, against the run's best matmul peak (FLOP/s)."""
    for r in rows.values():
        r['gflops_per_s'] = r['flops'] / r['seconds'] / 1e9
        r['mfu'] = r['flops'] / r['seconds'] / peak


def ratios(columns):
    """[{what, measured: {column: ratio}, flop_ratio}]: each speed ratio beside the ratio it
    would have if both sides ran at the same FLOP rate. A ratio past its FLOP ratio asks one side
    for a higher FLOP rate than the other; one at it means equal efficiency."""
    out = []

    def pair(what, a, b, throughput=False):
        """a's time over b's; throughput=True: b's images/s over a's."""
        present = {c: rows for c, rows in columns.items() if a in rows and b in rows}
        if not present:
            return
        if throughput:  # seconds per image, and FLOPs per image
            a_s, b_s = ({c: r[k]['seconds'] / r[k]['images'] for c, r in present.items()} for k in (a, b))
            f = next(iter(present.values()))
            flops = (f[a]['flops'] / f[a]['images']) / (f[b]['flops'] / f[b]['images'])
        else:
            a_s, b_s = ({c: r[k]['seconds'] for c, r in present.items()} for k in (a, b))
            f = next(iter(present.values()))
            flops = f[a]['flops'] / f[b]['flops']
        out.append(dict(what=what, measured={c: a_s[c] / b_s[c] for c in present}, flop_ratio=flops))

    pair('phase-1 step / phase-2 step (time)', 'phase1', 'phase2')
    pair('phase-3 step / phase-2 step (time)', 'phase3', 'phase2')
    pair('cached phase-1 speed-up (phase 1 / cached)', 'phase1', 'phase1_cached')
    pair('phase-2 speed-up from torch.compile', 'phase2', 'phase2_compiled')
    pair('reports/s, batch 16 / batch 1', 'generate_b1', 'generate_b16', throughput=True)
    if 'plain' in columns and 'cpu' in columns:  # the same FLOPs on either path
        for name in columns['cpu']:
            if name in columns['plain']:
                out.append(dict(what=f'use_cpu_kernels speed-up, {name}', flop_ratio=1.0,
                                measured={'cpu': columns['plain'][name]['seconds'] / columns['cpu'][name]['seconds']}))
    return out


def schedule(model_rows, n_train, peak):
    """The methodology's three phases over n_train images at each phase's measured FLOP rate
    (hours here), and at the same MFU on device_name (a projection, not a measurement)."""
    flops = sum(epochs * n_train * model_rows[f'phase{p}']['flops'] / batch_size for p, epochs in SCHEDULE)
    seconds = sum(epochs * n_train / batch_size * model_rows[f'phase{p}']['seconds'] for p, epochs in SCHEDULE)
    mfu = flops / seconds / peak
    return dict(iu_train_images=n_train, flops=flops, hours=seconds / 3600, mfu=mfu, device=device_name,
                device_hours=flops / (mfu * device_peak_tflops * 1e12) / 3600)


def label(name):
    if name.startswith('generate_b'):
        B = int(name[len('generate_b'):])
        return f"generate, batch {B}"
    return {'phase1': 'phase 1 step', 'phase2': 'phase 2 step', 'phase3': 'phase 3 step',
            'phase1_cached': 'phase 1, cached', 'phase2_compiled': 'phase 2, compiled'}[name]


def report(run):
    cols = run['columns']
    names = list(next(iter(cols.values())))
    print(f"\n== {run['size']} size: {run['params']:,} parameters; training batch {batch_size}, {seq_len} decoder "
          f"tokens; generation 4 beams, {gen_new_tokens} new tokens")
    print(f"{'':<20}{'':>9}" + ''.join(f" | {COLUMNS[c]:<36}" for c in cols))
    print(f"{'':<20}{'GFLOP':>9}" + f" | {'s':>9}{'GFLOP/s':>8}{'MFU':>5}{'peak MB':>9}{'CPU':>5}" * len(cols)
          + (f" | {'speed-up':>8}" if len(cols) == 2 else ''))
    for name in names:
        line = f"{label(name):<20}{cols[next(iter(cols))][name]['flops'] / 1e9:>9.1f}"
        for c in cols:
            r = cols[c].get(name)
            line += (f" | {r['seconds']:>9.3f}{r['gflops_per_s']:>8.1f}{r['mfu']:>5.0%}{r['peak_memory_mb']:>9.0f}"
                     f"{r['cpu_share']:>5.0%}" if r else f" | {'':>36}")
        if len(cols) == 2 and all(name in cols[c] for c in cols):
            line += f" | {cols['plain'][name]['seconds'] / cols['cpu'][name]['seconds']:>7.2f}x"
        print(line)
    print("  GFLOP: one training step of the batch, or one generate call of the batch (counted analytically);\n"
          "  CPU: the share of the cores this process got in the timed steps (well below 100%: others took them);\n"
          "  speed-up: plain / use_cpu_kernels time, the same FLOPs (1.00x at equal FLOP rate)")
    for c, rows in cols.items():
        if 'phase2_compiled' in rows:
            print(f"  {COLUMNS[c]}: torch.compile's first phase-2 step {rows['phase2_compiled']['first_step_s']:.0f} s "
                  f"(compiling), then {rows['phase2_compiled']['seconds']:.3f} s against {rows['phase2']['seconds']:.3f} s")
    print(f"{'ratio':<46}" + ''.join(f"{COLUMNS[c]:>18}" for c in cols) + f"{'at equal FLOP rate':>20}")
    for r in run['ratios']:
        if r['what'].startswith('use_cpu_kernels'):
            continue  # in the table's last column
        print(f"{r['what']:<46}" + ''.join(f"{r['measured'][c]:>17.2f}x" if c in r['measured'] else f"{'':>18}"
                                           for c in cols) + f"{r['flop_ratio']:>19.2f}x")
    for c, p in run.get('schedule', {}).items():
        print(f"three-phase schedule on IU X-ray, {COLUMNS[c]} ({p['iu_train_images']} images, 5+15+5 epochs, "
              f"{p['flops'] / 1e15:.1f} PFLOP): {p['hours']:.1f} h here at {p['mfu']:.0%} MFU; at that MFU on "
              f"{p['device']}, {p['device_hours']:.2f} h (a projection)")


def main():
    if kernels not in ('both', 'plain', 'cpu'):
        raise ValueError(f"kernels must be 'both', 'plain' or 'cpu', got {kernels!r}")
    dev = hardware.resolve_device(device)
    columns = ('plain', 'cpu') if kernels == 'both' else (kernels,)
    if dev != 'cpu':
        columns = ('plain',)  # the CPU kernels are for the CPU
    sizes = ('tiny', 'real') if size == 'both' else (size,)
    peaks = matmul_peak(dev)
    machine = dict(cpu=cpu_name(), cpus=os.cpu_count(), threads=torch.get_num_threads(), platform=platform.platform(),
                   torch=torch.__version__, transformers=__import__('transformers').__version__, device=dev,
                   cuda=torch.cuda.get_device_name() if dev.startswith('cuda') else None,
                   load_average_start=os.getloadavg(), matmul_gflops_start={k: v / 1e9 for k, v in peaks.items()})
    print(f"{machine['cpu']}, {machine['cpus']} CPUs, {machine['threads']} threads, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, on {dev}; load average {machine['load_average_start'][0]:.2f}; "
          f"fp32 matmul " + ', '.join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()) + " GFLOP/s")
    results = dict(machine=machine, settings=dict(batch_size=batch_size, seq_len=seq_len, steps=steps,
                                                  warmup_steps=warmup_steps, gen_new_tokens=gen_new_tokens),
                   runs={s: dict(size=s, columns={}) for s in sizes})
    if 'real' in sizes:
        with tempfile.TemporaryDirectory() as tmpdir:
            # first, in a process that has run no model yet, as a data worker is
            results['data'] = bench_data(tmpdir)
        results['lora_vs_peft'] = bench_lora_vs_peft(dev)

    def log(name, r):
        print(f"  {name:<16} {r['seconds']:8.3f} s   (load average {r['load_average']:.2f}, "
              f"CPU share {r['cpu_share']:.0%})", flush=True)

    # Column by column, plain first: keep_freed_memory changes glibc for the rest of the
    # process and cannot be undone, so no plain row may run after a use_cpu_kernels one.
    for c in columns:
        for s in sizes:
            print(f"{s} size, {COLUMNS[c]}:", flush=True)
            results['runs'][s]['params'], results['runs'][s]['columns'][c] = measure(s, c, dev, log)
    end = matmul_peak(dev)
    machine.update(load_average_end=os.getloadavg(), matmul_gflops_end={k: v / 1e9 for k, v in end.items()})
    peak = max(max(peaks.values()), max(end.values()))
    machine['matmul_peak_gflops'] = peak / 1e9
    print(f"\nfp32 matmul peak, the MFU denominator: {peak / 1e9:.0f} GFLOP/s (at the end: "
          + ', '.join(f"{k} {v / 1e9:.0f}" for k, v in end.items()) + f"); load average at the end "
          f"{machine['load_average_end'][0]:.2f}")
    n_train = iu_train_count()
    for s in sizes:
        run = results['runs'][s]
        for rows in run['columns'].values():
            add_rates(rows, peak)
        run['ratios'] = ratios(run['columns'])
        if s == 'real':
            run['schedule'] = {c: schedule(rows, n_train, peak) for c, rows in run['columns'].items()}
    for s in sizes:
        report(results['runs'][s])
    for name, v in results.get('data', {}).items():
        print(f"data path, {name}: {v['samples_per_s_per_core']:.1f} samples/s per core")
    lp = results.get('lora_vs_peft')
    if lp:
        print(f"LoRA vs peft (SigLIP q/v, batch 2): ours {lp['ours_step_s']:.3f} s, peft {lp['peft_step_s']:.3f} s "
              f"({lp['time_ratio']:.3f}x), max |diff| {lp['max_abs_diff']:.1e}")
    elif 'real' in sizes:
        print("LoRA vs peft: peft is not installed")
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")


if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
