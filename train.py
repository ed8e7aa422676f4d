"""
Trains CheXQuery, one phase per run. Single process:

    python train.py config/phase1.py
    python train.py config/phantom.py --max_iters=40 --out_dir=out-smoke

Several GPUs (or CPU processes, with gloo) through torchrun:

    torchrun --standalone --nproc_per_node=4 train.py config/phase2.py    # several nodes: see the README

The phases (the methodology's tables, set by CheXQuery.set_phase):
 1. queries, cross-attention, fusion and aux head train; both backbones frozen
 2. the same plus LoRA on SigLIP and on the T5 decoder, with label smoothing
 3. SigLIP fully frozen and no aux loss; generation polish
"""
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group

# -----------------------------------------------------------------------------
# default config: the methodology's phase 1 on IU X-ray. config/*.py and --key=value override.
# I/O
out_dir = 'out-phase1'
eval_interval = 200           # iterations (optimizer steps) between validations
log_interval = 10             # also how often torchrun's processes agree on a Ctrl-C
eval_iters = 0                # validation batches per evaluation; 0 = the whole split
sample_reports = 3            # decoded validation reports printed at each evaluation
always_save_checkpoint = False  # also overwrite ckpt.safetensors when val loss did not improve
init_from = 'scratch'         # 'scratch', 'resume' (out_dir/last.safetensors), or an earlier phase's checkpoint
overwrite = False             # True: a new run may replace the checkpoints (and metrics.jsonl) in out_dir
wandb_log = False
wandb_project = 'chexquery'
# data
dataset = 'iu_xray'           # 'iu_xray', 'mimic_cxr' or 'phantom' (generated on first use)
data_dir = 'data/iu_xray'     # prepared by prepare.py
tokenizer = ''                # hub name or local dir; '': text_model's own (the tiny model: data_dir's tokenizer.json)
target = 'both'               # the report to write: 'both' sections, 'findings' or 'impression' only
context = False               # the study's indication ahead of the report prompt ("Indication: ... Findings:")
context_dropout = 0.0         # the share of training samples whose indication is dropped (one model, both ways)
diagnosis_prompt = False      # the aux head's decisions in words ahead of the section prompt ("Seen: edema. Findings:")
own_diagnosis = 0.0           # ... in training, the share of samples given the head's decisions, not the reference's
finding_weight = 1.0          # the loss weight of the report's finding sentences (DiseaseT5: 5); 1: every token alike
max_len = 256                 # decoder tokens, prompt (indication, diagnosis) included
uncertain = 'positive'        # uncertain CheXpert labels count as positive in the aux targets
augment = True
cache_features = False        # phase 1: keep SigLIP's outputs after the first epoch (turns augmentation off)
num_workers = 2
# model (a checkpoint in init_from brings its own architecture: the settings below that describe it are then its)
model_size = 'base'           # 'base': the pretrained backbones below; 'tiny': small random ones (phantom)
vision_model = 'google/siglip-base-patch16-384'
text_model = 'google/flan-t5-base'
query_init = 'dmis-lab/biobert-v1.1'  # or 'random' (Xavier), the ablation of name-initialized queries
n_anatomical_queries = 6      # 0: condition queries only (an ablation)
learned_gate = True           # False: a fixed 0.5 mix of global token and queries (an ablation)
anatomical_prior = 'none'     # the anatomical queries' cross-attention: 'none', 'soft' or 'strict'
anatomical_atlas = ''         # a JSON file {region: [x0, y0, x1, y1]} (image fractions); '': chexpert.ATLAS (phantom)
image_size = 384
full_backbones = False        # train whole backbones, not just LoRA: only for random ones (phantom)
dropout = None                # every dropout in the model at this rate (0: none); None: init_from's, else T5's 0.1, ...
# optimization
phase = 1
epochs = 5
max_iters = 0                 # 0: derived from epochs
batch_size = 16               # per process and micro-step
gradient_accumulation_steps = 2  # in total; split across processes. 16 x 2 x 1 GPU = 32 effective
learning_rate = 1e-4
min_lr = 0.0                  # cosine decay ends here
warmup_iters = 200
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0               # 0: no clipping
label_smoothing = 0.0
lambda_gen = 1.0
lambda_aux = 0.5
max_bad_steps = 10            # consecutive non-finite steps before the run stops
# system
device = 'auto'               # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                # 'auto': bf16 (or fp16) on CUDA, fp32 on CPU, where bf16 is slower
compile = False               # torch.compile the training forward and backward (see "compile" below)
seed = 1337
cpu_kernels = False           # True: hardware.py's CPU speed-ups (oneDNN linears, kept freed memory, lean beam cache)
# -----------------------------------------------------------------------------
if __name__ != '__main__':
    raise ImportError('train.py is a script: run it, do not import it')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from configurator import configure  # noqa: E402
config = configure(globals(), sys.argv[1:])

import data  # noqa: E402
import hardware  # noqa: E402
import resume  # noqa: E402
import startup  # noqa: E402
from checkpoint import load_weights, param_table, read_checkpoint, save_checkpoint  # noqa: E402
from chexpert import read_atlas  # noqa: E402
from chexquery import CheXQuery, CheXQueryConfig  # noqa: E402
from shutdown import CtrlC, exit_without_shutdown, replica_difference  # noqa: E402
import validation  # noqa: E402

# checks, before anything is written (under torchrun, before the rendezvous: every process fails alike)
ddp = int(os.environ.get('RANK', -1)) != -1
world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
startup.check_settings(config, world_size)
startup.check_out_dir(out_dir, init_from, overwrite)
atlas = read_atlas(anatomical_atlas) if anatomical_atlas and init_from == 'scratch' else None  # a bad file fails now

# distributed setup -------------------------------------------------------------
device = hardware.resolve_device(device)
rank, local_rank = (int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])) if ddp else (0, 0)
if ddp:
    init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
master = rank == 0
accum = gradient_accumulation_steps // world_size
device_type = device.split(':')[0]
ptdtype = hardware.resolve_dtype(dtype, device)
# one code path for every precision: autocast does nothing in fp32, the scaler nothing unless fp16
autocast = hardware.autocast(device, ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
log = print if master else (lambda *a, **k: None)
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
if master:
    os.makedirs(out_dir, exist_ok=True)
    for name in resume.remove_interrupted_saves(out_dir):
        log(f"removed {out_dir}/{name}, left by an interrupted save")
    if init_from != 'resume' and os.path.exists(metrics_path):  # a new run's log holds its own lines only
        os.remove(metrics_path)
        log(f"removed {metrics_path} of an earlier run")

# the checkpoint to start from, which decides the architecture ---------------------
init_path = os.path.join(out_dir, 'last.safetensors') if init_from == 'resume' else init_from
tensors, init_meta = read_checkpoint(init_path) if init_from != 'scratch' else ({}, None)
if init_meta is not None:
    model_cfg = CheXQueryConfig(**init_meta['model_config'])
    # the data, the tokenizer and the saved config follow it
    for key, value in startup.settings_from_checkpoint(model_cfg, config).items():
        log(f"{key}={value!r} from {init_path} (init_from wins over the configured {config[key]!r})")
        globals()[key] = config[key] = value
    if anatomical_atlas:
        log(f"anatomical_atlas={anatomical_atlas!r} is not used: {init_path} brings its own atlas")
    model_cfg = replace(model_cfg, query_init='random')  # the queries come from the file
    data.check_diagnosis(diagnosis_prompt, init_meta['config'], init_path)  # its decoder learned with it, or not
if init_from == 'resume':
    startup.check_resumable(init_meta, config, world_size, init_path)
thresholds = init_meta.get('thresholds') if init_meta else None  # per condition, chosen on val at each evaluation

# data and tokenizer ----------------------------------------------------------------
if dataset == 'phantom':
    import phantom
    if master:
        phantom.ensure_phantom(data_dir)
    if ddp:
        torch.distributed.barrier()  # the others wait until rank 0 has written it
feature_cache = data.FeatureCache() if cache_features else None
if cache_features:  # a cached feature is one fixed view of each image: augmenting the first epoch would be wasted
    log("cache_features: SigLIP's outputs are cached in the first epoch and reused; image augmentation is off")
    augment = False
tok = data.run_tokenizer(config)
texts = dict(target=target, context=context, max_len=max_len, uncertain=uncertain, diagnosis=diagnosis_prompt,
             finding_weight=finding_weight)  # the val loss is the training objective
train_set = data.ReportDataset(data_dir, 'train', tok, image_size, train=augment, context_dropout=context_dropout,
                               own_diagnosis=own_diagnosis, **texts)
val_set = data.ReportDataset(data_dir, 'val', tok, image_size, own_diagnosis=1.0, **texts)
if train_set.left_out or val_set.left_out:
    log(f"target={target}: left out {train_set.left_out} train and {val_set.left_out} val studies whose {target} "
        f"section is empty")
iters_per_epoch = startup.iters_per_epoch(len(train_set), len(val_set), batch_size * gradient_accumulation_steps,
                                          data_dir)
max_iters = max_iters or epochs * iters_per_epoch


def loader(dataset, generator_seed, **kw):
    return resume.seeded_loader(dataset, batch_size, num_workers, generator_seed, data.collate, **kw)


def batches(epoch, start=0):
    """This process's micro-batches of an epoch, from micro-batch `start` on."""
    train_set.cached = set(feature_cache.features) if cache_features else set()  # encoded: not decoded again
    sampler = resume.EpochSampler(len(train_set), seed, epoch, rank, world_size, start * batch_size)
    return iter(loader(resume.SeededSamples(train_set, seed), seed + 7919 * epoch + rank, drop_last=True,
                       sampler=sampler, pin_memory=device_type == 'cuda'))


# model -----------------------------------------------------------------------------
if init_meta is None:
    model_cfg = startup.model_config(config, len(tok), atlas)
torch.manual_seed(seed + rank)  # the model's initialization and dropout draw from here; nothing else does
model = CheXQuery(startup.with_dropout(model_cfg, dropout))
# a token id past the embedding's rows would fail deep inside torch.embedding
data.check_tokenizer(tok, model.t5.config, init_path if init_meta else 'the decoder',
                     init_meta.get('tokenizer') if init_meta else None)
if init_meta is not None:
    load_weights(model, {k: v for k, v in tensors.items() if '/' not in k}, init_path)
    if init_from != 'resume':
        log(f"initializing from {init_from} (phase {init_meta.get('phase')}, iter {init_meta.get('iter_num')})")
# Exactly the phase's parameters train; with no aux loss the aux head has no
# gradient, so it freezes too (DDP runs with find_unused_parameters=False).
model.set_phase(phase, aux=lambda_aux > 0, full_backbones=full_backbones, gen=lambda_gen > 0)
model.to(device)
if device_type == 'cpu' and cpu_kernels:
    hardware.use_cpu_kernels(model)
log(param_table(model, full_backbones))
log(f"{len(train_set)} train / {len(val_set)} val samples; effective batch {batch_size} x {accum} x "
    f"{world_size} processes = {batch_size * accum * world_size}; {iters_per_epoch} iterations per epoch, "
    f"{max_iters} in all; {device}, {dtype}")

# optimizer: weight decay on weight matrices (LoRA's too), none on biases, norms or queries (their BioBERT start)
params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
decay = [p for n, p in params if p.dim() >= 2 and 'queries' not in n]
no_decay = [p for n, p in params if not (p.dim() >= 2 and 'queries' not in n)]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')

iter_num, epoch, batch_in_epoch, best_val_loss = 0, 0, 0, float('inf')
if init_from == 'resume':  # the optimizer, the scaler, every process's random state and where the run was
    iter_num, epoch, batch_in_epoch, best_val_loss = resume.restore(init_meta, tensors, optimizer, scaler, rank, device)
    if master and (dropped := resume.drop_metrics_after(metrics_path, iter_num)):
        log(f"metrics.jsonl: dropped {dropped} records after iteration {iter_num}, which are logged again")
    log(f"resuming at iteration {iter_num} (epoch {epoch}, step {batch_in_epoch})")
del tensors  # the checkpoint's copies: the model and optimizer have theirs
raw_model = model
if compile:
    # The training forward and backward as TorchInductor kernels, compiled at the first step and the
    # first new decoder length (then dynamic). Checkpoints are the same; evaluation and generation stay
    # eager (raw_model). Inductor draws its own dropout masks: the losses differ from eager mode's.
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=False)


def get_lr(it):  # linear warmup, then cosine decay to min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def own_text(b):
    """diagnosis_prompt: what forward calls with the condition logits to put the aux head's decisions
    into the slot of the batch's samples marked 'own'; None when there are none."""
    return partial(data.own_diagnosis_tokens, tok, train_set.prompt, b, max_len, thresholds,
                   finding_weight=finding_weight) if any(b.get('own', [])) else None


def evaluate():
    """Validation losses, the aux head's macro AUC and F1, its per-condition thresholds, and a few decoded reports."""
    raw_model.eval()
    with autocast:
        result, chosen = validation.validate(raw_model, loader(val_set, seed), eval_iters, lambda_gen, lambda_aux,
                                             f"{data_dir}/val.jsonl", own_text)
        for id_, ref, hyp in validation.sample_reports(raw_model, val_set, tok, sample_reports * (lambda_gen > 0),
                                                       max_len, context, target, diagnosis_prompt, chosen):
            log(f"  [{id_}] ref: {ref}\n  [{id_}] gen: {hyp}")
    raw_model.train()
    return result, chosen


def save(name, rng, val_loss=None):
    """Weights, optimizer, scaler and every process's RNG in out_dir/<name>.safetensors, the rest in its header."""
    meta = dict(config=config, phase=phase, iter_num=iter_num, epoch=epoch, batch_in_epoch=batch_in_epoch,
                best_val_loss=best_val_loss, val_loss=val_loss, thresholds=thresholds, scaler=scaler.state_dict(),
                optimizer_param_groups=optimizer.state_dict()['param_groups'], world_size=world_size,
                tokenizer=data.tokenizer_meta(tok))
    save_checkpoint(os.path.join(out_dir, f'{name}.safetensors'), raw_model, meta,
                    dict(resume.optimizer_tensors(optimizer), **rng))


def log_metrics(record):
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


if master and wandb_log:
    import wandb  # optional: pip install wandb
    wandb.init(project=wandb_project, config=config)

# the loop ---------------------------------------------------------------------------
# one host sync per step (the skip decision): the losses add up on the device, read when logged
ctrl_c = CtrlC()  # Ctrl-C: finish the iteration, save last.safetensors, stop
raw_model.train()
train_iter = batches(epoch, batch_in_epoch)
bad_steps, stop, last_val, skipped, saved_last_at = 0, False, None, 0, -1
nan = torch.tensor(float('nan'), device=device)  # a loss not computed: lambda_gen=0 runs no decoder
t0, samples_seen, iters_since_log = time.time(), 0, 0
while iter_num < max_iters and not stop:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr
    losses = torch.zeros(3, device=device)  # this iteration's loss, gen and aux
    for micro_step in range(accum):
        b = None
        while b is None:  # None: every sample of the batch was unreadable (already warned)
            try:
                b = next(train_iter)
                batch_in_epoch += 1
                skipped += batch_size if b is None else b['skipped']
            except StopIteration:
                epoch, batch_in_epoch = epoch + 1, 0
                train_iter = batches(epoch)
        b = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        samples_seen += len(b['ids'])
        # gradients are synced across processes only on the last micro-step
        sync = not ddp or micro_step == accum - 1
        with (nullcontext() if sync else model.no_sync()), autocast:
            features = feature_cache(b, raw_model.vision_features, device) if cache_features else None
            out = model(b['image'], b['decoder_input_ids'], b['labels'], b['cond_labels'],
                        label_smoothing=label_smoothing, lambda_gen=lambda_gen, lambda_aux=lambda_aux,
                        features=features, text_from_logits=own_text(b), token_weights=b['weights'])
        scaler.scale(out['loss'] / accum).backward()
        losses += torch.stack([out.get(k, nan) for k in ('loss', 'loss_gen', 'loss_aux')]).detach().float() / accum
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    # the all-reduced gradient norm is the same on every process, so all skip together
    if torch.isfinite(grad_norm):
        scaler.step(optimizer)
        bad_steps = 0
    else:
        bad_steps += 1
        warnings.warn(f"iter {iter_num}: non-finite loss or gradients (loss {losses[0].item():.4g}); step skipped "
                      f"({bad_steps} in a row)")
        if bad_steps >= max_bad_steps and not scaler.is_enabled():
            log(f"stopping: {bad_steps} non-finite steps in a row. The last good checkpoint in {out_dir} "
                f"is kept; try a lower learning_rate or dtype='float32'.")
            sys.exit(1)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    iters_since_log += 1
    log_now = iter_num % log_interval == 0 or iter_num == max_iters
    eval_now = iter_num % eval_interval == 0 or iter_num == max_iters
    # A Ctrl-C reaches torchrun's processes at different moments: they agree at log and eval
    # iterations, which all of them reach together, so all stop after the same iteration.
    stop = ctrl_c.agreed(device) if (log_now or eval_now or not ddp) else False

    if log_now:
        loss_v, gen_v, aux_v = losses.tolist()
        elapsed = time.time() - t0
        dt, imgs = elapsed / iters_since_log, samples_seen * world_size / elapsed
        t0, samples_seen, iters_since_log = time.time(), 0, 0
        log(f"iter {iter_num}/{max_iters} (epoch {epoch}) | loss {loss_v:.4f} gen {gen_v:.4f} aux {aux_v:.4f} | "
            f"lr {lr:.2e} | {dt * 1000:.0f} ms/iter, {imgs:.1f} img/s | eta {(max_iters - iter_num) * dt / 60:.1f} min"
            + (f" | {skipped} bad images skipped" if skipped else ''))
        if master:
            log_metrics(dict(iter=iter_num, epoch=epoch, loss=loss_v, loss_gen=gen_v, loss_aux=aux_v,
                             lr=lr, ms_per_iter=dt * 1000, images_per_s=imgs, grad_norm=grad_norm.item(),
                             skipped_images=skipped))

    if eval_now:
        if master:
            last_val, thresholds = evaluate()
            log(f"val @ {iter_num}: " + ', '.join(f"{k} {v:.4f}" for k, v in last_val.items()))
            log_metrics(dict(iter=iter_num, epoch=epoch, **last_val))
            improved = last_val['val_loss'] < best_val_loss
            best_val_loss = min(best_val_loss, last_val['val_loss'])
        if ddp and diagnosis_prompt:  # every process puts the same decisions into the slot
            thresholds = resume.broadcast(thresholds)
        rng = resume.rng_states(device)  # a collective: every process's random state
        if master:
            if improved or always_save_checkpoint:
                save('ckpt', rng, last_val['val_loss'])
                log(f"saved {out_dir}/ckpt.safetensors (best val loss {best_val_loss:.4f})")
            save('last', rng, last_val['val_loss'])
        saved_last_at = iter_num
        if ddp:
            torch.distributed.barrier()
        t0 = time.time()  # evaluation time is not training time

if stop and saved_last_at != iter_num:
    rng = resume.rng_states(device)
    if master:
        save('last', rng)
if stop:
    log(f"interrupted at iteration {iter_num}: saved {out_dir}/last.safetensors; continue with --init_from=resume")
elif last_val is not None:
    log("final validation: " + json.dumps({k: round(v, 4) for k, v in last_val.items()}))
if wandb_log and master:
    wandb.finish()
if ddp:
    drift = replica_difference(raw_model)
    log(f"parameters across {world_size} processes: max difference {drift:.3g}")
    if master:
        log_metrics(dict(iter=iter_num, replica_max_difference=drift))
    exit_without_shutdown()
