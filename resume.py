"""
Exact resume: what train.py keeps beyond the weights, so that a run stopped and continued
with --init_from=resume repeats the uninterrupted run bit for bit, whatever num_workers.

- the data order: EpochSampler, a seeded permutation of each epoch from a position, and
  SeededSamples, each sample's augmentation seeded by (seed, epoch, index);
- every process's random state (dropout): rng_states, restore_rng;
- the optimizer's state as checkpoint tensors: optimizer_tensors, optimizer_state;
  restore puts the optimizer, the scaler and the random state back;
- metrics.jsonl cut back to the checkpoint's iteration: drop_metrics_after;
- and the temporary files a killed save leaves: remove_interrupted_saves.
"""
import json
import os
import re

import torch


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded permutation of the epoch, from a start position,
    so a resumed run sees exactly the samples it would have seen. Yields (epoch, index)
    keys, which SeededSamples turns into samples."""

    def __init__(self, n, seed, epoch, rank=0, world_size=1, start=0):
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        order = order[:len(order) - len(order) % world_size]  # every process the same count
        self.keys = [(epoch, i) for i in order[rank::world_size][start:]]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class SeededSamples(torch.utils.data.Dataset):
    """Seeds each sample's augmentation from (seed, epoch, index): the same sample gets the
    same augmentation whichever worker loads it. The seed goes into a fork of the CPU
    generator, so the loading process's own stream (with num_workers=0, the one dropout
    draws from) is left as it was."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed * 1_000_003 + epoch * 100_003 + i)  # the CPU one only
            return self.dataset[i]


def seeded_loader(dataset, batch_size, num_workers, generator_seed, collate_fn, **kw):
    """A DataLoader with its own generator: each iterator draws its workers' base seed from it,
    and from the global generator without one, which would shift dropout on a resume."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                                       generator=torch.Generator().manual_seed(generator_seed), **kw)


def rng_states(device):
    """Every process's random state, as checkpoint tensors 'rng/torch/{rank}' (and
    'rng/cuda/{rank}'). A collective under torchrun: all processes call it."""
    mine = {'torch': torch.get_rng_state()}
    if device.startswith('cuda'):
        mine['cuda'] = torch.cuda.get_rng_state(device)
    states = {}
    for kind, state in mine.items():
        parts = [state]
        if torch.distributed.is_initialized():  # rank r's state lands at parts[r]
            state = state.to(device)
            parts = [torch.empty_like(state) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, state)
        states.update({f'rng/{kind}/{r}': p.cpu() for r, p in enumerate(parts)})
    return states


def restore_rng(tensors, rank, device):
    """Each process continues its own random streams (dropout differs across processes)."""
    state = tensors.get(f'rng/torch/{rank}', tensors.get('rng/torch') if rank == 0 else None)  # 'rng/torch': older files
    if state is not None:
        torch.set_rng_state(state)
    if device.startswith('cuda') and f'rng/cuda/{rank}' in tensors:
        torch.cuda.set_rng_state(tensors[f'rng/cuda/{rank}'], device)


def optimizer_tensors(optimizer):
    """The optimizer's per-parameter state as checkpoint tensors 'optim/{index}/{name}'."""
    return {f'optim/{i}/{k}': v for i, s in optimizer.state_dict()['state'].items() for k, v in s.items()}


def optimizer_state(param_groups, tensors):
    """The optimizer state dict again, from its param_groups and optimizer_tensors."""
    state = dict(param_groups=param_groups, state={})
    for k, v in tensors.items():
        if k.startswith('optim/'):
            _, idx, name = k.split('/')
            state['state'].setdefault(int(idx), {})[name] = v
    return state


def restore(meta, tensors, optimizer, scaler, rank, device):
    """Puts a checkpoint's optimizer, scaler and random state back; returns where the run was:
    (iter_num, epoch, batch_in_epoch, best_val_loss)."""
    optimizer.load_state_dict(optimizer_state(meta['optimizer_param_groups'], tensors))
    scaler.load_state_dict(meta['scaler'])
    restore_rng(tensors, rank, device)
    return meta['iter_num'], meta['epoch'], meta['batch_in_epoch'], meta['best_val_loss']


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


def remove_interrupted_saves(out_dir):
    """Removes the temporary files a save killed half-way leaves beside the intact file it was
    replacing: save_checkpoint's name.tmp, or safetensors' own .tmpXXXXXX (renamed when done).
    Returns their names."""
    gone = []
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(('.safetensors.tmp', '.json.tmp')) or re.fullmatch(r'\.tmp[A-Za-z0-9]{6}', name):
            os.remove(os.path.join(out_dir, name))
            gone.append(name)
    return gone


def broadcast(value):
    """Rank 0's value (any picklable object) on every process: a collective under torchrun."""
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
