"""train.py on the tiny phantom setup, run in this process: it learns, the phases chain
through checkpoints with the right parameters training, a resumed run repeats the
uninterrupted one bit for bit whatever num_workers, non-finite steps are skipped and too
many stop the run, and the phase 1 feature cache equals the uncached run. The slow tests
run it as people do: torchrun with 2 gloo processes, and torch.compile."""
import os
import signal

import pytest
import torch

import chexquery
from checkpoint import load_checkpoint, read_checkpoint
from conftest import read_metrics, run_script, tiny_train_args, train_in_process, train_losses

pytestmark = pytest.mark.usefixtures('one_thread')


def train(data_dir, out_dir, **overrides):
    code, printed = train_in_process(data_dir, out_dir, **overrides)
    assert code == 0, printed[-3000:]
    return printed


def on_training_forward(monkeypatch, act):
    """Calls act(n, out) after the n-th training forward (n from 0; evaluation's are not
    counted), whose output it may change: one forward per iteration without accumulation."""
    forward, calls = chexquery.CheXQuery.forward, []

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            act(len(calls), out)
            calls.append(1)
        return out
    monkeypatch.setattr(chexquery.CheXQuery, 'forward', patched)


def test_a_phantom_run_lowers_the_loss_and_saves_a_loadable_checkpoint(tiny_run):
    records = read_metrics(tiny_run)
    losses = [m['loss'] for m in records if 'loss' in m]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    model, meta = load_checkpoint(os.path.join(tiny_run, 'ckpt.safetensors'))
    assert meta['phase'] == 2 and meta['iter_num'] == 30 and meta['config']['max_iters'] == 30
    assert meta['config']['dataset'] == 'phantom' and meta['val_loss'] == meta['best_val_loss']
    val = [m for m in records if 'val_loss' in m][-1]
    assert abs(val['val_loss'] - meta['val_loss']) < 1e-9 and 0 <= val['val_auc_macro'] <= 1


def changed(a, b, prefix, lora=None):
    """Names under prefix (LoRA only, non-LoRA only, or both) whose tensors differ between a and b."""
    names = [k for k in a if k.startswith(prefix) and '/' not in k and (lora is None or ('lora_' in k) == lora)]
    assert names, prefix
    return {k for k in names if not torch.equal(a[k], b[k])}, names


def test_phases_chain_through_checkpoints_with_the_right_parameters_training(phantom_dir, tmp_path):
    common = dict(max_iters=3, full_backbones=False, learning_rate=1e-2, warmup_iters=0, sample_reports=0,
                  eval_iters=1)
    o1, o2, o3 = (str(tmp_path / f'p{i}') for i in (1, 2, 3))
    train(phantom_dir, o1, phase=1, **common)
    train(phantom_dir, o2, phase=2, init_from=f'{o1}/ckpt.safetensors', label_smoothing=0.1, **common)
    train(phantom_dir, o3, phase=3, init_from=f'{o2}/ckpt.safetensors', lambda_aux=0.0, **common)
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


def test_phase1_on_the_aux_loss_alone_trains_the_queries_and_leaves_the_report_side_as_it_was(
        phantom_dir, tmp_path, monkeypatch):
    common = dict(phase=1, max_iters=3, full_backbones=False, learning_rate=1e-2, warmup_iters=0, eval_iters=1)
    o1, o2 = str(tmp_path / 'with-report'), str(tmp_path / 'aux-alone')
    train(phantom_dir, o1, sample_reports=0, **common)
    # no reports sampled from a decoder this run does not train
    monkeypatch.setattr(chexquery.CheXQuery, 'generate', lambda *a, **k: pytest.fail('reports were sampled'))
    train(phantom_dir, o2, init_from=f'{o1}/ckpt.safetensors', lambda_gen=0.0, sample_reports=2, **common)
    (c1, _), (c2, _) = (read_checkpoint(f'{o}/ckpt.safetensors') for o in (o1, o2))
    for prefix in ('condition_queries', 'cross_attention.', 'aux_head.'):
        assert changed(c1, c2, prefix)[0], prefix
    for prefix in ('anatomical_queries', 'fusion.', 't5.'):  # only what the aux loss reaches moves
        assert not changed(c1, c2, prefix)[0], prefix
    val = [m for m in read_metrics(o2) if 'val_loss' in m][-1]
    assert val['val_loss_gen'] != val['val_loss_gen']  # NaN: not computed
    assert abs(val['val_loss'] - 0.5 * val['val_loss_aux']) < 1e-6  # lambda_aux 0.5 times the aux loss, as in training


def test_dropout_reaches_the_checkpoint_and_the_next_phase_keeps_it(phantom_dir, tmp_path):
    common = dict(max_iters=1, full_backbones=False, sample_reports=0, eval_iters=1)
    o1, o2 = str(tmp_path / 'p1'), str(tmp_path / 'p2')
    train(phantom_dir, o1, phase=1, dropout=0, **common)
    train(phantom_dir, o2, phase=2, init_from=f'{o1}/ckpt.safetensors', **common)  # no --dropout: phase 1's
    model, _ = load_checkpoint(o2)
    assert model.t5.config.dropout_rate == 0
    assert all(not isinstance(m, torch.nn.Dropout) or m.p == 0 for m in model.modules())
    assert all(getattr(m, 'dropout', 0) == 0 for m in model.modules() if isinstance(getattr(m, 'dropout', 0), float))


def test_ctrl_c_then_resume_repeats_the_uninterrupted_run_bit_for_bit(phantom_dir, tmp_path, monkeypatch):
    """The three parts load with 0, 1 and 2 workers: neither the workers nor the Ctrl-C change a loss."""
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    args = dict(max_iters=6, eval_interval=4, eval_iters=1, sample_reports=0)
    train(phantom_dir, a, num_workers=0, **args)
    with monkeypatch.context() as m:  # Ctrl-C during the third iteration
        on_training_forward(m, lambda n, out: n == 2 and os.kill(os.getpid(), signal.SIGINT))
        train(phantom_dir, b, num_workers=1, **args)
    meta = read_checkpoint(f'{b}/last.safetensors')[1]
    assert meta['iter_num'] == 3 and not os.path.exists(f'{b}/ckpt.safetensors')
    with open(f'{b}/metrics.jsonl', 'a') as f:  # as a kill -9 after iteration 4 would leave them
        f.write('{"iter": 4, "loss": 1.0}\n{"iter": 5, "lo')
    train(phantom_dir, b, num_workers=2, init_from='resume', **args)
    assert [m['iter'] for m in read_metrics(b) if 'loss' in m] == list(range(1, 7))  # each logged once
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert [la[i] for i in la] == [lb[i] for i in la]  # same data, augmentation, dropout, optimizer: exactly
    ta, tb = read_checkpoint(f'{a}/last.safetensors')[0], read_checkpoint(f'{b}/last.safetensors')[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(phantom_dir, tmp_path, monkeypatch):
    """A NaN loss at iteration 2 alone, then at every iteration from 5 on: the first is
    skipped, the third in a row of the others stops the run; no NaN reaches a weight."""
    out = str(tmp_path / 'nan')

    def poison(n, result):
        if n == 2 or n >= 5:
            result['loss'] = result['loss'] * float('nan')
    on_training_forward(monkeypatch, poison)
    code, printed = train_in_process(phantom_dir, out, max_iters=20, eval_interval=2, eval_iters=1,
                                     sample_reports=0, max_bad_steps=3)
    assert code == 1, printed[-2000:]
    losses = train_losses(out)  # iteration n is logged as n + 1
    assert sorted(losses) == list(range(1, 8))
    nan = [i for i, v in losses.items() if v != v]
    assert nan == [3, 6, 7]  # the stop at the third bad step in a row (iteration 7) is not logged
    _, meta = read_checkpoint(f'{out}/ckpt.safetensors')
    assert meta['iter_num'] in (2, 4, 6)
    for name in ('ckpt', 'last'):
        tensors, _ = read_checkpoint(f'{out}/{name}.safetensors')
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_phase1_feature_cache_matches_the_uncached_run(phantom_dir, tmp_path):
    """12 iterations per epoch: the 13th reads every feature from the cache."""
    args = dict(phase=1, full_backbones=False, max_iters=13, sample_reports=0, eval_iters=1)
    a, b = str(tmp_path / 'cached'), str(tmp_path / 'plain')
    train(phantom_dir, a, cache_features=True, **args)
    train(phantom_dir, b, augment=False, **args)
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == list(range(1, 14))
    for it in la:  # equal up to the float16 storage of the features
        assert abs(la[it] - lb[it]) <= 2e-3 * lb[it], (it, la[it], lb[it])
    with pytest.raises(ValueError, match='cache_features'):
        train_in_process(phantom_dir, str(tmp_path / 'phase2'), cache_features=True, phase=2)
    assert not (tmp_path / 'phase2').exists()  # checked before anything is written


def test_cached_samples_are_not_decoded(phantom_dir):
    import data
    ds = data.ReportDataset(phantom_dir, 'train', data.load_tokenizer(phantom_dir), 64)
    ds.cached = {ds.records[1]['id']}
    b = data.collate([ds[0], ds[1], ds[2]])
    assert b['has_image'] == [True, False, True] and b['image'].shape[0] == 2 and len(b['ids']) == 3


def test_accumulation_that_does_not_divide_by_the_processes_stops_before_the_rendezvous(
        phantom_dir, tmp_path, monkeypatch):
    for k, v in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2').items():
        monkeypatch.setenv(k, v)  # as torchrun sets them; no other process is coming
    with pytest.raises(ValueError, match='gradient_accumulation_steps=3'):
        train_in_process(phantom_dir, str(tmp_path / 'ddp'), gradient_accumulation_steps=3)
    assert not os.path.exists(tmp_path / 'ddp')


# --- as people run it: separate processes ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('lambda_gen', [1.0, 0.0])
def test_torchrun_two_gloo_processes_keep_the_parameters_identical(phantom_dir, tmp_path, lambda_gen):
    """lambda_gen 0: the aux loss alone, which leaves the report's modules without a gradient; DDP
    (find_unused_parameters=False) fails unless they are frozen."""
    out = str(tmp_path / 'ddp')
    args = tiny_train_args(phantom_dir, out, max_iters=3, gradient_accumulation_steps=2, sample_reports=0,
                           lambda_gen=lambda_gen)
    run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args)
    assert len(train_losses(out)) == 3
    assert [m['replica_max_difference'] for m in read_metrics(out) if 'replica_max_difference' in m] == [0]
    _, meta = read_checkpoint(f'{out}/ckpt.safetensors')
    assert meta['world_size'] == 2 and meta['config']['batch_size'] == 8


@pytest.mark.slow
def test_compile_trains_on_the_cpu(phantom_dir, tmp_path):
    """torch.compile at the tiny size: it trains (2 compilations: the first decoder length, then any
    length) and saves the same checkpoint as eager mode, which loads without it."""
    a, b = str(tmp_path / 'eager'), str(tmp_path / 'compiled')
    args = dict(max_iters=4, sample_reports=0, eval_iters=1)
    run_script(*tiny_train_args(phantom_dir, a, **args))
    run_script(*tiny_train_args(phantom_dir, b, compile=True, **args))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 5))
    assert all(v == v for v in lb.values()) and lb[4] < 0.9 * lb[1]
    ta, tb = read_checkpoint(f'{a}/last.safetensors')[0], read_checkpoint(f'{b}/last.safetensors')[0]
    assert ta.keys() == tb.keys()
    model, meta = load_checkpoint(f'{b}/last.safetensors')
    assert meta['config']['compile'] is True and all(torch.isfinite(p).all() for p in model.parameters())
