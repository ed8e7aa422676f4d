"""train.py end to end on the tiny phantom setup: it learns, the phases chain through
checkpoints with the right parameters training, a resumed run repeats the uninterrupted
one, torchrun with 2 gloo processes keeps the replicas equal, and NaN steps are skipped."""
import json
import os
import signal
import subprocess
import sys

import torch

from chexquery import load_checkpoint, read_checkpoint
from conftest import ROOT, run_script, tiny_train_args


def metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {m['iter']: m['loss'] for m in metrics(out_dir) if 'loss' in m}


def test_a_phantom_run_lowers_the_loss_and_saves_a_loadable_checkpoint(tiny_run):
    losses = list(train_losses(tiny_run).values())
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    with open(os.path.join(tiny_run, 'stdout.txt')) as f:
        out = f.read()
    assert 'decoder LoRA' in out and 'final validation' in out and 'ms/iter' in out and 'eta' in out
    model, meta = load_checkpoint(os.path.join(tiny_run, 'ckpt.safetensors'))
    assert meta['phase'] == 2 and meta['iter_num'] == 30 and meta['config']['max_iters'] == 30
    assert meta['config']['dataset'] == 'phantom' and meta['val_loss'] == meta['best_val_loss']
    val = [m for m in metrics(tiny_run) if 'val_loss' in m][-1]
    assert abs(val['val_loss'] - meta['val_loss']) < 1e-9 and 0 <= val['val_auc_macro'] <= 1


def changed(a, b, prefix, lora=None):
    """Names under prefix (LoRA only, non-LoRA only, or both) whose tensors differ between a and b."""
    names = [k for k in a if k.startswith(prefix) and '/' not in k and (lora is None or ('lora_' in k) == lora)]
    assert names, prefix
    return {k for k in names if not torch.equal(a[k], b[k])}, names


def test_phases_chain_through_checkpoints_with_the_right_parameters_training(phantom_dir, tmp_path):
    common = dict(max_iters=3, full_backbones=False, learning_rate=1e-2, warmup_iters=0, sample_reports=0)
    o1, o2, o3 = (str(tmp_path / f'p{i}') for i in (1, 2, 3))
    run_script(*tiny_train_args(phantom_dir, o1, phase=1, **common))
    run_script(*tiny_train_args(phantom_dir, o2, phase=2, init_from=f'{o1}/ckpt.safetensors',
                                label_smoothing=0.1, **common))
    r3 = run_script(*tiny_train_args(phantom_dir, o3, phase=3, init_from=f'{o2}/ckpt.safetensors',
                                     lambda_aux=0.0, **common))
    assert 'initializing from' in r3.stdout
    (c1, m1), (c2, m2), (c3, m3) = (read_checkpoint(f'{o}/ckpt.safetensors') for o in (o1, o2, o3))
    assert (m1['phase'], m2['phase'], m3['phase']) == (1, 2, 3)
    # phase 1: no LoRA trains, so every B is still zero
    assert all(not v.any() for k, v in c1.items() if k.endswith('lora_B'))
    # phase 2: LoRA on both backbones and the new modules train; the backbone weights themselves do not
    for prefix in ('vision.', 't5.'):
        diff, names = changed(c1, c2, prefix, lora=False)
        assert not diff, diff
        diff, names = changed(c1, c2, prefix, lora=True)
        assert diff == set(names)
    for prefix in ('condition_queries', 'anatomical_queries', 'cross_attention.', 'fusion.', 'aux_head.'):
        assert changed(c1, c2, prefix)[0]
    # phase 3: the vision side and the aux head are frozen; decoder LoRA and the queries still train
    assert not changed(c2, c3, 'vision.')[0] and not changed(c2, c3, 'aux_head.')[0]
    assert not changed(c2, c3, 't5.', lora=False)[0] and changed(c2, c3, 't5.', lora=True)[0]
    assert changed(c2, c3, 'condition_queries')[0] and changed(c2, c3, 'cross_attention.')[0]


def test_resuming_after_ctrl_c_repeats_the_uninterrupted_run(phantom_dir, tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    args = dict(max_iters=12, sample_reports=0)
    run_script(*tiny_train_args(phantom_dir, a, **args))
    p = subprocess.Popen([sys.executable, '-u'] + tiny_train_args(phantom_dir, b, **args), cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith('iter 5/12'):
            p.send_signal(signal.SIGINT)  # Ctrl-C: finish the iteration, save last.safetensors, exit
    assert p.wait(timeout=300) == 0, ''.join(out)
    stopped = [line for line in out if line.startswith('interrupted at iteration')]
    assert stopped, ''.join(out)
    k = int(stopped[0].split()[3].rstrip(':'))
    assert 5 <= k < 12 and not os.path.exists(f'{b}/ckpt.safetensors')
    r = run_script(*tiny_train_args(phantom_dir, b, init_from='resume', **args))
    assert f'resuming at iteration {k}' in r.stdout
    la, lb = train_losses(a), train_losses(b)
    assert sorted(lb) == sorted(la) == list(range(1, 13))
    # same data order, augmentation, dropout and optimizer state: equal to float rounding (bitwise here)
    for it in la:
        assert abs(la[it] - lb[it]) <= 1e-6 * abs(la[it]), (it, la[it], lb[it])
    ta, tb = read_checkpoint(f'{a}/last.safetensors')[0], read_checkpoint(f'{b}/last.safetensors')[0]
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta if k.startswith(('cross', 'aux'))) <= 1e-5


def test_torchrun_two_gloo_processes_keep_the_parameters_identical(phantom_dir, tmp_path):
    out = str(tmp_path / 'ddp')
    args = tiny_train_args(phantom_dir, out, max_iters=3, gradient_accumulation_steps=2, sample_reports=0)
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args)
    assert 'effective batch 8 x 1 x 2 processes = 16' in r.stdout
    assert 'parameters across 2 processes: max difference 0' in r.stdout, r.stdout[-2000:]
    assert r.stdout.count('final validation') == 1  # only rank 0 logs
    assert len(train_losses(out)) == 3 and read_checkpoint(f'{out}/ckpt.safetensors')[1]['world_size'] == 2


def test_a_nan_batch_is_skipped(phantom_dir, tmp_path):
    out = str(tmp_path / 'nan')
    r = run_script(*tiny_train_args(phantom_dir, out, max_iters=5, debug_nan_iter=2, sample_reports=0))
    assert 'iter 2: non-finite loss or gradients' in r.stderr and 'step skipped (1 in a row)' in r.stderr
    losses = train_losses(out)
    assert losses[3] != losses[3] and all(v == v for i, v in losses.items() if i != 3)  # NaN only at iter 2 (logged as 3)
    tensors, _ = read_checkpoint(f'{out}/ckpt.safetensors')
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_too_many_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(phantom_dir, tmp_path):
    out = str(tmp_path / 'nan')
    r = run_script(*tiny_train_args(phantom_dir, out, max_iters=10, eval_interval=2, debug_nan_iter=3,
                                    debug_nan_steps=100, max_bad_steps=3, sample_reports=0), check=False)
    assert r.returncode == 1 and 'stopping: 3 non-finite steps in a row' in r.stdout
    model, meta = load_checkpoint(f'{out}/ckpt.safetensors')
    assert meta['iter_num'] == 4  # evaluated after the first skipped step (iter 3), before the stop at 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_phase1_feature_cache_matches_the_uncached_run(phantom_dir, tmp_path):
    """12 iterations per epoch: the second epoch reads every feature from the cache."""
    args = dict(phase=1, full_backbones=False, max_iters=24, sample_reports=0)
    a, b = str(tmp_path / 'cached'), str(tmp_path / 'plain')
    r = run_script(*tiny_train_args(phantom_dir, a, cache_features=True, **args))
    assert 'image augmentation is off' in r.stdout
    run_script(*tiny_train_args(phantom_dir, b, augment=False, **args))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == list(range(1, 25))
    for it in la:  # equal up to the float16 storage of the features
        assert abs(la[it] - lb[it]) <= 2e-3 * lb[it], (it, la[it], lb[it])
    r = run_script(*tiny_train_args(phantom_dir, a, cache_features=True, phase=2), check=False)
    assert r.returncode != 0 and 'cache_features=True needs phase 1' in r.stderr


def test_cached_samples_are_not_decoded(phantom_dir):
    import data
    ds = data.ReportDataset(phantom_dir, 'train', data.load_tokenizer(phantom_dir), 64)
    ds.cached = {ds.records[1]['id']}
    b = data.collate([ds[0], ds[1], ds[2]])
    assert b['has_image'] == [True, False, True] and b['image'].shape[0] == 2 and len(b['ids']) == 3


def test_torchrun_accumulation_that_does_not_divide_stops_with_the_reason(phantom_dir, tmp_path):
    args = tiny_train_args(phantom_dir, str(tmp_path / 'ddp'), max_iters=3, gradient_accumulation_steps=3)
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args, check=False)
    assert r.returncode != 0
    assert 'gradient_accumulation_steps=3 must divide by the 2 processes' in r.stdout + r.stderr
    assert not os.path.exists(tmp_path / 'ddp' / 'ckpt.safetensors')
