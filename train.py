"""
Trains CheXQuery, one phase per run. Single process:

    python train.py config/phase1.py
    python train.py config/phantom.py --max_iters=40 --out_dir=out-smoke

Several GPUs (or CPU processes, with gloo) through torchrun:

    torchrun --standalone --nproc_per_node=4 train.py config/phase2.py

Several nodes: on each node, with the master's address,
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 --master_addr=IP --master_port=29500 train.py \
        config/phase2.py --batch_size=4 --gradient_accumulation_steps=8    # 4 x 1 x 8 processes = 32

The phases (the methodology's tables, set by CheXQuery.set_phase):
 1. queries, cross-attention, fusion and aux head train; both backbones frozen
 2. the same plus LoRA on SigLIP and on the T5 decoder, with label smoothing
 3. SigLIP fully frozen and no aux loss; generation polish
"""
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed import init_process_group, destroy_process_group

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
wandb_log = False
wandb_project = 'chexquery'
# data
dataset = 'iu_xray'           # 'iu_xray', 'mimic_cxr' or 'phantom' (generated on first use)
data_dir = 'data/iu_xray'     # prepared by prepare.py
tokenizer = ''                # hub name or local dir; '': text_model's own (the tiny model: data_dir's tokenizer.json)
target = 'both'               # the report to write: 'both' sections, 'findings' or 'impression' only
context = False               # the study's indication ahead of the report prompt ("Indication: ... Findings:")
context_dropout = 0.0         # the share of training samples whose indication is dropped (one model, both ways)
max_len = 256                 # decoder tokens, prompt (and indication) included
uncertain = 'positive'        # uncertain CheXpert labels count as positive in the aux targets
augment = True
cache_features = False        # phase 1: keep SigLIP's outputs after the first epoch (turns augmentation off)
num_workers = 2
# model (a checkpoint in init_from brings its own: model_size, image_size and the backbones below are then its)
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
from chexpert import read_atlas  # noqa: E402
from checkpoint import load_weights, param_table, read_checkpoint, save_checkpoint  # noqa: E402
from chexquery import ANATOMICAL_PRIORS, CheXQuery, CheXQueryConfig, tiny_config  # noqa: E402
from metrics import auc_per_condition, clinical_scores  # noqa: E402

# the values, checked before anything divides by them -----------------------------
for key in ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'epochs', 'max_len',
            'max_bad_steps', 'image_size'):
    if config[key] < 1:
        raise ValueError(f"{key} must be at least 1, got {config[key]}")
for key in ('max_iters', 'eval_iters', 'sample_reports', 'num_workers', 'warmup_iters', 'min_lr', 'weight_decay',
            'grad_clip', 'label_smoothing', 'lambda_gen', 'lambda_aux'):
    if config[key] < 0:
        raise ValueError(f"{key} must be 0 or more, got {config[key]}")
if not learning_rate > 0 or min_lr > learning_rate:
    raise ValueError(f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got min_lr={min_lr}, "
                     f"learning_rate={learning_rate}")
if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and label_smoothing < 1):
    raise ValueError(f"beta1, beta2 and label_smoothing must be in [0, 1), got {beta1}, {beta2}, {label_smoothing}")
if lambda_gen == lambda_aux == 0:
    raise ValueError("lambda_gen and lambda_aux are both 0: there would be no loss to train on")
if model_size not in ('base', 'tiny'):
    raise ValueError(f"model_size must be 'base' or 'tiny', got {model_size!r}")
if anatomical_prior not in ANATOMICAL_PRIORS:
    raise ValueError(f"anatomical_prior must be 'none', 'soft' or 'strict', got {anatomical_prior!r}")
atlas = read_atlas(anatomical_atlas) if anatomical_atlas and init_from == 'scratch' else None  # a bad file fails now

# distributed setup -------------------------------------------------------------
ddp = int(os.environ.get('RANK', -1)) != -1
device = hardware.resolve_device(device)
world_size = int(os.environ['WORLD_SIZE']) if ddp else 1
if gradient_accumulation_steps % world_size:  # before the rendezvous, which would wait for the others
    raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must divide by the "
                     f"{world_size} processes, so the effective batch stays the same")
if ddp:
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    rank, local_rank = 0, 0
master = rank == 0
accum = gradient_accumulation_steps // world_size
device_type = device.split(':')[0]
ptdtype = hardware.resolve_dtype(dtype, device)
# one code path for every precision: autocast does nothing in fp32, the scaler nothing unless fp16
autocast = hardware.autocast(device, ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
log = print if master else (lambda *a, **k: None)

if master:
    os.makedirs(out_dir, exist_ok=True)
    # A save killed half-way leaves its temporary file beside the intact one it was replacing:
    # save_checkpoint's name.tmp, or safetensors' own (0.8 writes .tmpXXXXXX, then renames it).
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(('.safetensors.tmp', '.json.tmp')) or re.fullmatch(r'\.tmp[A-Za-z0-9]{6}', name):
            os.remove(os.path.join(out_dir, name))
            log(f"removed {out_dir}/{name}, left by an interrupted save")

# the checkpoint to start from, which decides the model ---------------------------
init_path = os.path.join(out_dir, 'last.safetensors') if init_from == 'resume' else init_from
tensors, init_meta = read_checkpoint(init_path) if init_from != 'scratch' else ({}, None)
if init_meta is not None:
    model_cfg = CheXQueryConfig(**dict(init_meta['model_config'], query_init='random'))
    # the checkpoint's architecture wins over the config's; the data and the tokenizer follow it
    own = dict(model_size='tiny' if model_cfg.text_config is not None else 'base', image_size=model_cfg.image_size,
               anatomical_prior=model_cfg.anatomical_prior)
    if own['model_size'] == 'base':
        own.update(vision_model=model_cfg.vision_model, text_model=model_cfg.text_model)
    for key, value in own.items():
        if config[key] != value:
            log(f"{key}={value!r} from {init_path} (init_from wins over the configured {config[key]!r})")
            globals()[key] = config[key] = value
    if anatomical_atlas:
        log(f"anatomical_atlas={anatomical_atlas!r} is not used: {init_path} brings its own atlas")
if init_from == 'resume':
    # the data position and the optimizer's state mean something only for the same run
    was = dict(init_meta['config'], world_size=init_meta.get('world_size'),
               aux=init_meta['config'].get('lambda_aux', 0) > 0)
    now = dict(config, world_size=world_size, aux=lambda_aux > 0)
    differ = [f"{k}={was.get(k)!r} there, {now[k]!r} here" for k in ('phase', 'full_backbones', 'aux', 'batch_size',
                                                                    'seed', 'world_size') if was.get(k) != now[k]]
    if differ:
        raise ValueError(f"cannot resume {init_path} exactly: {'; '.join(differ)}. Resume with its settings "
                         f"(world_size is the number of processes), or start a new run from its weights with "
                         f"--init_from={init_path}")

# data and tokenizer ----------------------------------------------------------------
if dataset == 'phantom':
    import phantom
    if master:
        phantom.ensure_phantom(data_dir)
    if ddp:
        torch.distributed.barrier()  # the others wait until rank 0 has written it
if cache_features:
    if phase != 1 or full_backbones:
        raise ValueError("cache_features=True needs phase 1 with frozen backbones: in phases 2 and 3 "
                         "SigLIP's outputs change as it trains (phase 3: its input augmentation does)")
    # a cached feature is one fixed view of each image, so augmenting the first epoch would be wasted
    log("cache_features: SigLIP's outputs are cached in the first epoch and reused; image augmentation is off")
    augment = False
tok = data.run_tokenizer(config)

# model -----------------------------------------------------------------------------
if init_meta is None:
    variant = dict(n_anatomical_queries=n_anatomical_queries, learned_gate=learned_gate,
                   anatomical_prior=anatomical_prior, atlas=atlas)
    if model_size == 'tiny':
        model_cfg = tiny_config(vocab_size=len(tok), image_size=image_size, **variant)
    else:
        model_cfg = CheXQueryConfig(vision_model=vision_model, text_model=text_model, image_size=image_size,
                                    query_init=query_init, **variant)
torch.manual_seed(seed + rank)  # the model's initialization and dropout draw from here; nothing else does
model = CheXQuery(model_cfg)
# a token id past the embedding's rows would fail deep inside torch.embedding
data.check_tokenizer(tok, model.t5.config, init_path if init_meta else 'the decoder',
                     init_meta.get('tokenizer') if init_meta else None)
if init_meta is not None:
    load_weights(model, {k: v for k, v in tensors.items() if '/' not in k}, init_path)
    if init_from != 'resume':
        log(f"initializing from {init_from} (phase {init_meta.get('phase')}, iter {init_meta.get('iter_num')})")
# Exactly the phase's parameters train; with no aux loss the aux head has no
# gradient, so it freezes too (DDP runs with find_unused_parameters=False).
model.set_phase(phase, aux=lambda_aux > 0, full_backbones=full_backbones)
model.to(device)
if device_type == 'cpu' and cpu_kernels:
    hardware.use_cpu_kernels(model)
log(param_table(model, full_backbones))

train_set = data.ReportDataset(data_dir, 'train', tok, image_size, train=augment, target=target, context=context,
                               context_dropout=context_dropout, max_len=max_len, uncertain=uncertain)
val_set = data.ReportDataset(data_dir, 'val', tok, image_size, train=False, target=target, context=context,
                             max_len=max_len, uncertain=uncertain)
if train_set.left_out or val_set.left_out:
    log(f"target={target}: left out {train_set.left_out} train and {val_set.left_out} val studies whose {target} "
        f"section is empty")
if not len(val_set):
    raise ValueError(f"{data_dir}/val.jsonl has no records: validation needs some")


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded permutation of the epoch, from a start
    position, so a resumed run sees exactly the samples it would have seen.
    Yields (epoch, index) keys, which SeededSamples turns into samples."""

    def __init__(self, n, epoch, start=0):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        order = order[:len(order) - len(order) % world_size]  # every process the same count
        self.keys = [(epoch, i) for i in order[rank::world_size][start:]]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class SeededSamples(torch.utils.data.Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index): the same sample
    gets the same augmentation whichever worker loads it, so resuming is exact. The
    seed goes into a fork of the CPU generator, so the loading process's own stream
    (with num_workers=0, the one dropout draws from) is left as it was."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed * 1_000_003 + epoch * 100_003 + i)  # the CPU one only
            return self.dataset[i]


def loader(dataset, generator_seed, **kw):
    """A DataLoader with its own generator: each iterator draws its workers' base seed from
    it, and from the global generator without one, which would shift dropout on a resume."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=data.collate,
                                       generator=torch.Generator().manual_seed(generator_seed), **kw)


def batches(epoch, start=0):
    """This process's micro-batches of an epoch, from micro-batch `start` on."""
    train_set.cached = set(feature_cache)  # images already encoded are not decoded again (workers fork below)
    return iter(loader(SeededSamples(train_set), seed + 7919 * epoch + rank, drop_last=True,
                       sampler=EpochSampler(len(train_set), epoch, start * batch_size),
                       pin_memory=device_type == 'cuda'))


iters_per_epoch = len(train_set) // world_size // batch_size // accum
if iters_per_epoch == 0:
    raise ValueError(f"{len(train_set)} training samples are fewer than one step of "
                     f"{batch_size} x {gradient_accumulation_steps} samples")
if max_iters == 0:
    max_iters = epochs * iters_per_epoch
log(f"{len(train_set)} train / {len(val_set)} val samples; effective batch {batch_size} x {accum} x "
    f"{world_size} processes = {batch_size * accum * world_size}; {iters_per_epoch} iterations per epoch, "
    f"{max_iters} in all; {device}, {dtype}")

# optimizer: weight decay on weight matrices (LoRA A/B included), none on biases,
# norms and the query vectors, whose BioBERT start decay would pull toward zero
params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
decay = [p for n, p in params if p.dim() >= 2 and 'queries' not in n]
no_decay = [p for n, p in params if not (p.dim() >= 2 and 'queries' not in n)]
optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                               {'params': no_decay, 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device_type == 'cuda')


def drop_metrics_after(path, it):
    """Keeps the records of path up to iteration it: a run killed after its last save logged
    more (and maybe half a line), which the resumed run logs again. Returns how many went."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        records = f.readlines()
    kept = []
    for line in records:
        try:
            if json.loads(line)['iter'] <= it:
                kept.append(line.rstrip('\n') + '\n')
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) < len(records):
        with open(path, 'w') as f:
            f.writelines(kept)
    return len(records) - len(kept)


iter_num, epoch, batch_in_epoch, best_val_loss = 0, 0, 0, float('inf')
if init_from == 'resume':
    iter_num, epoch, batch_in_epoch = init_meta['iter_num'], init_meta['epoch'], init_meta['batch_in_epoch']
    best_val_loss = init_meta['best_val_loss']
    opt_state = dict(param_groups=init_meta['optimizer_param_groups'], state={})
    for k, v in tensors.items():
        if k.startswith('optim/'):
            _, idx, name = k.split('/')
            opt_state['state'].setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict(opt_state)
    scaler.load_state_dict(init_meta['scaler'])
    # every process continues its own random streams (dropout differs across processes)
    state = tensors.get(f'rng/torch/{rank}', tensors.get('rng/torch') if master else None)  # 'rng/torch': older files
    if state is not None:
        torch.set_rng_state(state)
    if device_type == 'cuda' and f'rng/cuda/{rank}' in tensors:
        torch.cuda.set_rng_state(tensors[f'rng/cuda/{rank}'], device)
    if master:
        dropped = drop_metrics_after(os.path.join(out_dir, 'metrics.jsonl'), iter_num)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} records after iteration {iter_num}, which are logged again")
    log(f"resuming at iteration {iter_num} (epoch {epoch}, step {batch_in_epoch})")
del tensors  # the checkpoint's copies: the model and optimizer have theirs
raw_model = model
if compile:
    # The training forward and backward run as TorchInductor kernels. The first step waits for the
    # compilation, the first new decoder length for one more, after which the length is dynamic
    # (tiny model, 2 busy CPU cores: 55 s and 38 s). Checkpoints are the same; evaluation and
    # generation stay eager (raw_model). Inductor draws its own dropout masks, so the losses
    # differ from eager mode's from the first step (6.0736 vs 6.0890); a compiled run repeats itself.
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None, find_unused_parameters=False)


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def to_device(b):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


# phase 1 feature cache: id -> (global (D,), patches (N, D)). Stored in float16 on the
# host to halve the memory (IU X-ray at 384 px: about 2.4 GB).
feature_cache = {}


def cached_features(b):
    """The frozen encoder's outputs for a batch: computed for the images it carries (ones
    not seen before), read from the cache for the rest."""
    if b['image'] is not None:
        with torch.no_grad(), autocast:
            g, p = raw_model.vision_features(b['image'])
        new = [k for k, has in zip(b['ids'], b['has_image']) if has]
        for i, k in enumerate(new):
            feature_cache[k] = (g[i].half().cpu(), p[i].half().cpu())
    g, p = zip(*(feature_cache[k] for k in b['ids']))
    return torch.stack(g).to(device).float(), torch.stack(p).to(device).float()  # (B, D), (B, N, D)


def compute_loss(m, b):
    features = cached_features(b) if cache_features else None
    out = m(b['image'], b['decoder_input_ids'], b['labels'], b['cond_labels'], label_smoothing=label_smoothing,
            lambda_gen=lambda_gen, lambda_aux=lambda_aux, features=features)
    return out['loss'], out


@torch.no_grad()
def evaluate():
    """Validation losses, the aux head's macro AUC and F1, and a few decoded reports."""
    raw_model.eval()
    sums, n, probs, targets = torch.zeros(2, device=device), 0, [], []
    for i, b in enumerate(loader(val_set, seed)):
        if b is None:
            continue
        if eval_iters and i >= eval_iters:
            break
        b = to_device(b)
        with autocast:
            out = raw_model(b['image'], b['decoder_input_ids'], b['labels'], b['cond_labels'])
        k = len(b['ids'])
        sums += torch.stack([out['loss_gen'], out['loss_aux']]).float() * k
        n += k
        probs.append(out['cond_logits'].float().sigmoid().cpu())
        targets.append(b['cond_labels'].cpu())
    if n == 0:
        raise ValueError(f"no readable validation image in {data_dir}/val.jsonl (see the warnings above)")
    gen, aux = (sums / n).tolist()
    probs, targets = torch.cat(probs), torch.cat(targets)
    aucs = [a for a in auc_per_condition(targets.numpy(), probs.numpy()) if a == a]  # NaN: one class only
    result = dict(val_loss_gen=gen, val_loss_aux=aux, val_loss=lambda_gen * gen + lambda_aux * aux,
                  val_auc_macro=sum(aucs) / max(1, len(aucs)),
                  val_f1_macro=clinical_scores(targets.numpy() > 0.5, probs.numpy() > 0.5)['macro14']['f1'])
    if sample_reports:
        items = [val_set[i] for i in range(min(sample_reports, len(val_set)))]
        items = [x for x in items if x is not None]
        images = torch.stack([x['image'] for x in items]).to(device)
        by_id = {r['id']: r for r in val_set.records}
        prompts, mask = data.prompt_batch(tok, val_set.prompt, [by_id[x['id']].get('indication', '') if context else ''
                                                                 for x in items])
        with autocast:
            ids = raw_model.generate(images, prompts.to(device), prompt_mask=mask, num_beams=1, min_length=1,
                                     max_length=max_len)
        for x, hyp in zip(items, data.decode_reports(tok, ids, prompts.shape[1], val_set.prompt)):
            ref = data.target_text(by_id[x['id']], target)
            log(f"  [{x['id']}] ref: {ref}\n  [{x['id']}] gen: {hyp}")
    raw_model.train()
    return result


def rng_states():
    """Every process's random state, as checkpoint tensors 'rng/torch/{rank}' (and
    'rng/cuda/{rank}'). A collective under torchrun: all processes call it."""
    mine = {'torch': torch.get_rng_state()}
    if device_type == 'cuda':
        mine['cuda'] = torch.cuda.get_rng_state(device)
    states = {}
    for kind, state in mine.items():
        parts = [state]
        if ddp:  # rank r's state lands at parts[r]
            state = state.to(device)
            parts = [torch.empty_like(state) for _ in range(world_size)]
            torch.distributed.all_gather(parts, state)
        states.update({f'rng/{kind}/{r}': p.cpu() for r, p in enumerate(parts)})
    return states


def save(name, rng, val_loss=None):
    """Weights, optimizer, scaler and every process's RNG in out_dir/<name>.safetensors, the rest in its header."""
    extra = {f'optim/{i}/{k}': v for i, s in optimizer.state_dict()['state'].items() for k, v in s.items()}
    meta = dict(config=config, phase=phase, iter_num=iter_num, epoch=epoch, batch_in_epoch=batch_in_epoch,
                best_val_loss=best_val_loss, val_loss=val_loss, scaler=scaler.state_dict(),
                optimizer_param_groups=optimizer.state_dict()['param_groups'], world_size=world_size,
                tokenizer=data.tokenizer_meta(tok))
    save_checkpoint(os.path.join(out_dir, f'{name}.safetensors'), raw_model, meta, dict(extra, **rng))


def log_metrics(record):
    with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


if master and wandb_log:
    try:
        import wandb
        wandb.init(project=wandb_project, config=config)
    except ImportError:
        print("wandb_log=True but wandb is not installed: logging to metrics.jsonl only")
        wandb_log = False

# Ctrl-C: finish the iteration, save, exit. Another Ctrl-C more than a second later stops
# at once; one sooner is the same Ctrl-C again (torchrun forwards the terminal's to its
# processes, which have it already).
stop_requested = 0.0  # when Ctrl-C came (time.time()), 0: it did not


def request_stop(signum, frame):
    global stop_requested
    if stop_requested and time.time() - stop_requested > 1:
        raise KeyboardInterrupt
    stop_requested = stop_requested or time.time()


signal.signal(signal.SIGINT, request_stop)


def agreed_stop():
    """Whether to stop now: under torchrun, when any process had a Ctrl-C (a collective)."""
    if not ddp:
        return bool(stop_requested)
    flag = torch.tensor(float(bool(stop_requested)), device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() > 0


# the loop ---------------------------------------------------------------------------
# Nothing waits for the device inside a step but the skip decision (one host sync per
# step): the losses add up on the device and are read only when logged.
raw_model.train()
train_iter = batches(epoch, batch_in_epoch)
bad_steps, stop, last_val, skipped, saved_last_at = 0, False, None, 0, -1
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
        b = to_device(b)
        samples_seen += len(b['ids'])
        # gradients are synced across processes only on the last micro-step
        sync = not ddp or micro_step == accum - 1
        with (nullcontext() if sync else model.no_sync()), autocast:
            loss, out = compute_loss(model, b)
        scaler.scale(loss / accum).backward()
        losses += torch.stack([loss, out['loss_gen'], out['loss_aux']]).detach().float() / accum
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
    stop = agreed_stop() if (log_now or eval_now or not ddp) else False

    if log_now:
        loss_v, gen_v, aux_v = losses.tolist()
        elapsed = time.time() - t0
        dt = elapsed / iters_since_log
        imgs = samples_seen * world_size / elapsed
        t0, samples_seen, iters_since_log = time.time(), 0, 0
        eta = (max_iters - iter_num) * dt
        log(f"iter {iter_num}/{max_iters} (epoch {epoch}) | loss {loss_v:.4f} gen {gen_v:.4f} aux {aux_v:.4f} | "
            f"lr {lr:.2e} | {dt * 1000:.0f} ms/iter, {imgs:.1f} img/s | eta {eta / 60:.1f} min"
            + (f" | {skipped} bad images skipped" if skipped else ''))
        if master:
            log_metrics(dict(iter=iter_num, epoch=epoch, loss=loss_v, loss_gen=gen_v, loss_aux=aux_v,
                             lr=lr, ms_per_iter=dt * 1000, images_per_s=imgs, grad_norm=grad_norm.item(),
                             skipped_images=skipped))

    if eval_now:
        if master:
            last_val = evaluate()
            log(f"val @ {iter_num}: " + ', '.join(f"{k} {v:.4f}" for k, v in last_val.items()))
            log_metrics(dict(iter=iter_num, epoch=epoch, **last_val))
            improved = last_val['val_loss'] < best_val_loss
            best_val_loss = min(best_val_loss, last_val['val_loss'])
        rng = rng_states()
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
    rng = rng_states()
    if master:
        save('last', rng)
if stop:
    log(f"interrupted at iteration {iter_num}: saved {out_dir}/last.safetensors; continue with --init_from=resume")
elif last_val is not None:
    log("final validation: " + json.dumps({k: round(v, 4) for k, v in last_val.items()}))
if ddp:
    # DDP keeps replicas equal only if every process took the same steps: check it
    sums = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).cpu()
    gathered = [torch.zeros_like(sums) for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, sums)
    drift = max((g - gathered[0]).abs().max().item() for g in gathered)
    log(f"parameters across {world_size} processes: max difference {drift:.3g}")
    if master:
        log_metrics(dict(iter=iter_num, replica_max_difference=drift))
    destroy_process_group()
    # After a finished gloo run, torch 2.14 sometimes aborts while the interpreter shuts
    # down ("terminate called without an active exception"): here 11 of 80 two-process
    # runs exited -6 after writing everything, and torchrun then reports the run failed.
    # All files are closed by now, so leave without the shutdown.
    if wandb_log and master:
        wandb.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
