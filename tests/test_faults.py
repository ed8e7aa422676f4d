"""Faults, one at a time, each reproduced and its handling checked (docs/faults.md has the
table): an interrupted run resumed (Ctrl-C, kill -9 in a save, torchrun), paths in the
source data that lead outside their directory, a source image gone on a re-run, a
tokenizer that does not fit the checkpoint, zero and negative settings, and the .tmp files
an interrupted save leaves. Subprocess runs are marked slow."""
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import prepare
from checkpoint import read_checkpoint, save_checkpoint
from chexquery import CheXQuery, tiny_config
from conftest import ROOT, iu_fixture, read_metrics, run_script, tiny_train_args, train_in_process, train_losses, \
    write_csv

QUICK = dict(max_iters=1, eval_iters=1, sample_reports=0)  # one step and one validation batch

pytestmark = pytest.mark.usefixtures('one_thread')


# --- paths in the source data ----------------------------------------------------------
@pytest.mark.parametrize('name', ['../../x/escaped.png', '/tmp/chexquery-absolute.png', '', 'a/../../b.png'])
def test_iu_projection_file_names_must_stay_in_the_image_directory(tmp_path, name):
    src = iu_fixture(tmp_path / 'raw', n=5)
    rows = [('1', '1_IM-1.dcm.png', 'Frontal'), ('1', name, 'Frontal'), ('2', '2_IM-1.dcm.png', 'Frontal')]
    write_csv(src / 'indiana_projections.csv', ['uid', 'filename', 'projection'], rows)
    (src / 'x').mkdir()
    shutil.copy(src / 'images' / 'images_normalized' / '1_IM-1.dcm.png', src / 'x' / 'escaped.png')
    with pytest.raises(ValueError, match=r'indiana_projections\.csv, row 2\b'):
        prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1)
    # nothing written anywhere; before, the first name wrote a copy of raw/x/escaped.png to x/escaped.png
    assert not (tmp_path / 'x').exists() and not (tmp_path / 'iu').exists()


def test_mimic_ids_must_not_make_paths_outside_the_download(tmp_path):
    src = tmp_path / 'mimic'
    src.mkdir()
    write_csv(src / 'mimic-cxr-2.0.0-metadata.csv', ['dicom_id', 'subject_id', 'study_id', 'ViewPosition'],
              [('d1', '10', '100', 'PA'), ('../../../../escaped', '10', '100', 'PA')])
    write_csv(src / 'mimic-cxr-2.0.0-chexpert.csv', ['subject_id', 'study_id'] + list(data.CONDITIONS),
              [('10', '100') + ('',) * len(data.CONDITIONS)])
    write_csv(src / 'mimic-cxr-2.0.0-split.csv', ['dicom_id', 'study_id', 'subject_id', 'split'],
              [('d1', '100', '10', 'train')])
    with pytest.raises(ValueError, match=r'metadata\.csv, row 2\b'):
        prepare.mimic_records(str(src))


@pytest.mark.parametrize('image', ['../outside.png', '/etc/hostname', 'images/../../outside.png', ''])
def test_split_records_must_name_images_inside_the_data_directory(phantom_dir, tmp_path, image):
    records = data.read_split(phantom_dir, 'val')[:3]
    records[1]['image'] = image
    (tmp_path / 'val.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    with pytest.raises(ValueError, match=r'val\.jsonl:2:'):
        data.ReportDataset(str(tmp_path), 'val', data.load_tokenizer(phantom_dir), 64)


# --- a source image gone on a re-run ------------------------------------------------------
def test_a_source_image_that_vanished_since_the_last_preparation_is_reported_and_skipped(tmp_path, capsys):
    src, out = iu_fixture(tmp_path / 'raw', n=6), tmp_path / 'iu'
    prepare.prepare_iu(str(src), str(out), seed=0, n_workers=1)
    (src / 'images' / 'images_normalized' / '5_IM-1.dcm.png').unlink()  # its copy stays in out
    capsys.readouterr()
    m = prepare.prepare_iu(str(src), str(out), seed=0, n_workers=1)
    assert '5_IM-1.dcm.png' in capsys.readouterr().out
    kept = [json.loads(line)['uid'] for s in ('train', 'val', 'test') for line in open(out / f'{s}.jsonl')]
    assert sorted(kept) == ['1', '2', '6']
    assert sum(v for k, v in m['dropped'].items() if 'image missing' in k) == 1


# --- a tokenizer that does not fit the checkpoint --------------------------------------------
def tiny_checkpoint(path, vocab_size, tokenizer=None, **overrides):
    torch.manual_seed(0)
    model = CheXQuery(tiny_config(vocab_size=vocab_size, image_size=64, **overrides))
    meta = dict(phase=2, iter_num=5, config={}, **({'tokenizer': tokenizer} if tokenizer else {}))
    save_checkpoint(path, model, meta)
    return str(path)


def test_a_checkpoint_with_fewer_embedding_rows_than_the_tokenizer_has_tokens(phantom_dir, tmp_path):
    n = len(data.load_tokenizer(phantom_dir))
    ckpt = tiny_checkpoint(tmp_path / 'small.safetensors', vocab_size=64)
    with pytest.raises(ValueError, match=rf'small\.safetensors.*{n} tokens.*64 rows'):
        train_in_process(phantom_dir, str(tmp_path / 'out'), init_from=ckpt, **QUICK)
    assert not (tmp_path / 'out' / 'metrics.jsonl').exists()  # stopped before training


def test_a_checkpoint_trained_with_another_tokenizer_of_the_same_size(phantom_dir, tmp_path):
    tok = data.load_tokenizer(phantom_dir)
    other = dict(data.tokenizer_meta(tok), vocab_sha256='0123456789abcdef', eos_token_id=2)
    ckpt = tiny_checkpoint(tmp_path / 'other.safetensors', vocab_size=len(tok), tokenizer=other)
    with pytest.raises(ValueError, match='vocab_sha256') as e:
        train_in_process(phantom_dir, str(tmp_path / 'out'), init_from=ckpt, **QUICK)
    assert 'eos_token_id' in str(e.value)
    # the tokenizer it was trained with passes, and is saved for the next phase to check
    ckpt = tiny_checkpoint(tmp_path / 'same.safetensors', vocab_size=len(tok), tokenizer=data.tokenizer_meta(tok))
    code, _ = train_in_process(phantom_dir, str(tmp_path / 'out'), init_from=ckpt, **QUICK)
    assert code == 0
    assert read_checkpoint(tmp_path / 'out' / 'ckpt.safetensors')[1]['tokenizer'] == data.tokenizer_meta(tok)


def test_init_from_wins_over_model_size_and_image_size(phantom_dir, tmp_path):
    """A tiny checkpoint with the configured model_size='base' (whose tokenizer, Flan-T5's,
    is not available offline) and another image size: the checkpoint's are used and saved."""
    tok = data.load_tokenizer(phantom_dir)
    ckpt = tiny_checkpoint(tmp_path / 'tiny.safetensors', vocab_size=len(tok))
    code, _ = train_in_process(phantom_dir, str(tmp_path / 'out'), init_from=ckpt, model_size='base',
                               image_size=96, **QUICK)
    assert code == 0
    config = read_checkpoint(tmp_path / 'out' / 'ckpt.safetensors')[1]['config']
    assert config['model_size'] == 'tiny' and config['image_size'] == 64


def test_init_from_wins_over_every_architecture_setting_and_the_saved_config_agrees(phantom_dir, tmp_path):
    """A checkpoint without anatomical queries and with the fixed gate, configured with 6 and the
    learned one: the checkpoint's are used, said so, and the new checkpoint's config matches its model."""
    ckpt = tiny_checkpoint(tmp_path / 'ablation.safetensors', vocab_size=len(data.load_tokenizer(phantom_dir)),
                           n_anatomical_queries=0, learned_gate=False)
    code, printed = train_in_process(phantom_dir, str(tmp_path / 'out'), init_from=ckpt, n_anatomical_queries=6,
                                     learned_gate=True, **QUICK)
    assert code == 0, printed[-3000:]
    assert 'n_anatomical_queries=0' in printed and 'learned_gate=False' in printed
    meta = read_checkpoint(tmp_path / 'out' / 'ckpt.safetensors')[1]
    for key in ('n_anatomical_queries', 'learned_gate', 'image_size', 'anatomical_prior'):
        assert meta['config'][key] == meta['model_config'][key], key
    assert meta['model_config']['n_anatomical_queries'] == 0 and meta['model_config']['learned_gate'] is False


# --- a new run into another run's out_dir -------------------------------------------------
def files(d):
    """{name: bytes} of a directory's files: what a refused run must leave as it was."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def earlier_run(phantom_dir, tmp_path):
    """out_dir of a finished run (ckpt, last, metrics.jsonl), plus a stale temporary file a start would remove."""
    out = tmp_path / 'earlier'
    assert train_in_process(phantom_dir, str(out), **QUICK)[0] == 0
    (out / 'last.safetensors.tmp').write_bytes(b'half a checkpoint')
    return out


@pytest.mark.parametrize('how', ['scratch', 'init_from its own checkpoint', 'torchrun rank 0', 'torchrun rank 1'])
def test_a_new_run_into_an_out_dir_holding_checkpoints_stops_before_writing(phantom_dir, earlier_run, monkeypatch,
                                                                             how):
    before = files(earlier_run)
    settings = dict(QUICK, learning_rate=0.5)
    if how == 'init_from its own checkpoint':
        settings['init_from'] = str(earlier_run / 'ckpt.safetensors')
    if how.startswith('torchrun'):  # as torchrun sets them; no rendezvous may start, or a rank would wait
        for k, v in dict(RANK=how[-1], LOCAL_RANK=how[-1], WORLD_SIZE='2').items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv('MASTER_ADDR', raising=False)
        settings['gradient_accumulation_steps'] = 2
    with pytest.raises(FileExistsError, match=r'ckpt\.safetensors.*--init_from=resume.*--out_dir.*--overwrite=True'):
        train_in_process(phantom_dir, str(earlier_run), **settings)
    assert files(earlier_run) == before


def test_init_from_a_checkpoint_inside_its_own_out_dir_stops_before_writing(phantom_dir, earlier_run, tmp_path):
    out = tmp_path / 'new'
    out.mkdir()
    shutil.copy(earlier_run / 'ckpt.safetensors', out / 'start.safetensors')
    with pytest.raises(FileExistsError, match=r'start\.safetensors.*inside.*--overwrite=True'):
        train_in_process(phantom_dir, str(out), init_from=str(out / 'start.safetensors'), **QUICK)
    assert files(out) == {'start.safetensors': (earlier_run / 'ckpt.safetensors').read_bytes()}


def test_overwrite_replaces_the_checkpoints_and_starts_metrics_afresh(phantom_dir, earlier_run):
    code, printed = train_in_process(phantom_dir, str(earlier_run), overwrite=True, **dict(QUICK, max_iters=2))
    assert code == 0, printed[-3000:]
    assert [m['iter'] for m in read_metrics(earlier_run)] == [1, 2, 2]  # loss 1, loss 2, val 2: the new run's only
    assert read_checkpoint(earlier_run / 'ckpt.safetensors')[1]['iter_num'] == 2
    # and a resume of it needs no overwrite
    code, printed = train_in_process(phantom_dir, str(earlier_run), init_from='resume', **dict(QUICK, max_iters=3))
    assert code == 0, printed[-3000:]
    assert [m['iter'] for m in read_metrics(earlier_run)] == [1, 2, 2, 3, 3]


# --- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize('setting', ['batch_size=0', 'gradient_accumulation_steps=0', 'eval_interval=0',
                                     'log_interval=0', 'max_iters=-1', 'epochs=0', 'eval_iters=-1',
                                     'num_workers=-1', 'max_len=0', 'max_bad_steps=0', 'learning_rate=0.0',
                                     'warmup_iters=-5', 'grad_clip=-1.0', 'label_smoothing=1.0', 'beta2=1.0',
                                     'own_diagnosis=1.5', 'context_dropout=-0.1', 'dropout=1.0',
                                     "dropout='half'"])
def test_zero_and_negative_settings_are_errors_naming_the_setting(phantom_dir, tmp_path, setting):
    key, value = setting.split('=')
    with pytest.raises(ValueError, match=key):
        train_in_process(phantom_dir, str(tmp_path / 'out'), **{key: value})
    assert not (tmp_path / 'out').exists()  # checked before anything is written


def test_resume_with_settings_that_change_the_run_is_an_error(phantom_dir, tmp_path):
    out = str(tmp_path / 'out')
    assert train_in_process(phantom_dir, out, **QUICK)[0] == 0
    for change in (dict(batch_size=4), dict(phase=1), dict(seed=1), dict(dropout=0.2)):
        with pytest.raises(ValueError, match=f"{next(iter(change))}=.*--init_from="):
            train_in_process(phantom_dir, out, init_from='resume', **dict(QUICK, **change))


@pytest.mark.parametrize('setting', ['workers=-1', 'short_side=0'])
def test_prepare_py_settings(tmp_path, monkeypatch, setting):
    monkeypatch.setattr(sys, 'argv', ['prepare.py', '--dataset=iu_xray', f'--src={tmp_path}', f'--{setting}'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, 'prepare.py'), run_name='__main__')
    assert setting.split('=')[0] in str(e.value.code)


# --- interrupted saves ------------------------------------------------------------------
def test_stale_tmp_files_of_an_interrupted_save_are_removed_at_the_next_start(phantom_dir, tmp_path, monkeypatch):
    """Gone before the first step: a save would replace them too, but only if it comes."""
    out = tmp_path / 'out'
    out.mkdir()
    for name in ('ckpt.safetensors.tmp', 'last.safetensors.tmp', 'last.json.tmp', '.tmpKt1Opu'):  # the last: safetensors'
        (out / name).write_bytes(b'half a checkpoint')
    (out / 'notes.tmp').write_text('not ours')
    at_first_step = []
    forward = CheXQuery.forward

    def look(self, *args, **kwargs):
        if self.training and not at_first_step:
            at_first_step.append(sorted(p.name for p in out.iterdir() if 'tmp' in p.name))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(CheXQuery, 'forward', look)
    assert train_in_process(phantom_dir, str(out), **QUICK)[0] == 0
    assert at_first_step == [['notes.tmp']]


SAVE_LOOP = """
import sys, torch
sys.path.insert(0, {root!r})
from checkpoint import save_checkpoint
from chexquery import CheXQuery, tiny_config
torch.manual_seed(0)
model = CheXQuery(tiny_config(vocab_size=512, image_size=64))
extra = {{'optim/0/exp_avg': torch.randn(8_000_000)}}  # 32 MB more, so that a save takes a while
for i in range(1, 10**6):
    print('saving', i, flush=True)
    save_checkpoint({path!r}, model, dict(iter_num=i), extra)
    print('saved', i, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves_leaves_every_checkpoint_loadable(tmp_path):
    path = str(tmp_path / 'ckpt.safetensors')
    rng, inside_save, partial_files, kills = random.Random(0), 0, set(), 0
    # at least 12 kills, and more (at most 40) until one lands while a file is being written: on a
    # quiet machine the writing is a short part of each save, and 12 random kills can all miss it
    for trial in range(40):
        if trial >= 12 and partial_files:
            break
        p = subprocess.Popen([sys.executable, '-c', SAVE_LOOP.format(root=ROOT, path=path)], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, HF_HUB_OFFLINE='1'))
        while not p.stdout.readline().startswith('saved'):  # one save done in this process
            pass
        time.sleep(rng.uniform(0.0, 0.3))
        p.kill()  # SIGKILL: no handler, no cleanup
        p.wait()
        kills += 1
        last = p.stdout.read().split('\n')[-2]
        inside_save += last.startswith('saving')
        partial_files |= {p.name for p in tmp_path.iterdir() if 'tmp' in p.name}  # ours, or safetensors' .tmpXXXXXX
        tensors, meta = read_checkpoint(path)
        assert meta['iter_num'] >= int(last.split()[1]) - 1 and tensors['optim/0/exp_avg'].numel() == 8_000_000
        with open(str(tmp_path / 'ckpt.json')) as f:
            assert json.load(f)['iter_num'] >= 1
    print(f"{kills} kills: {inside_save} inside save_checkpoint, {len(partial_files)} partial files left")
    assert inside_save >= 6, inside_save  # most kills land in a save; the test means little otherwise
    assert partial_files  # some landed while the file was being written; train.py removes these (test above)


# --- Ctrl-C and resume, in separate processes ----------------------------------------------
def interrupt_after(args, line_start, group=False):
    """Runs args (python ...) until a line starting with line_start is printed, then sends
    SIGINT: to the process, or with group=True to its whole process group, as a terminal's
    Ctrl-C does (torchrun and its workers). Returns the exit code and the output."""
    p = subprocess.Popen([sys.executable, '-u', *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE='1'), start_new_session=group)
    out, sent = [], False
    for line in p.stdout:
        out.append(line)
        if line.startswith(line_start) and not sent:
            os.killpg(p.pid, signal.SIGINT) if group else p.send_signal(signal.SIGINT)
            sent = True
    return p.wait(timeout=600), ''.join(out)


def same_run(a, b, iters):
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, iters + 1))
    assert [la[i] for i in sorted(la)] == [lb[i] for i in sorted(la)], (la, lb)  # bit for bit
    ta, tb = read_checkpoint(f'{a}/last.safetensors')[0], read_checkpoint(f'{b}/last.safetensors')[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_ctrl_c_then_resume_with_a_loader_worker_equals_the_uninterrupted_run(phantom_dir, tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    args = dict(max_iters=8, eval_interval=4, eval_iters=2, sample_reports=0, num_workers=1)
    run_script(*tiny_train_args(phantom_dir, a, **args))
    code, out = interrupt_after(tiny_train_args(phantom_dir, b, **args), 'iter 2/')
    assert code == 0, out[-2000:]
    k = read_checkpoint(f'{b}/last.safetensors')[1]['iter_num']
    assert 2 <= k < 8
    run_script(*tiny_train_args(phantom_dir, b, init_from='resume', **args))
    same_run(a, b, 8)


@pytest.mark.slow
def test_torchrun_ctrl_c_then_resume_equals_the_uninterrupted_run(phantom_dir, tmp_path):
    """2 gloo processes, each with its own dropout stream, which the checkpoint keeps for each."""
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    args = dict(max_iters=8, eval_interval=4, eval_iters=2, sample_reports=0, batch_size=4,
                gradient_accumulation_steps=2, num_workers=1)
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    run_script(*torchrun, *tiny_train_args(phantom_dir, a, **args))
    code, out = interrupt_after(torchrun + tiny_train_args(phantom_dir, b, **args), 'iter 2/', group=True)
    tensors, meta = read_checkpoint(f'{b}/last.safetensors')  # torchrun itself exits 1 on a Ctrl-C
    assert 2 <= meta['iter_num'] < 8 and {'rng/torch/0', 'rng/torch/1'} <= tensors.keys(), out[-3000:]
    assert not torch.equal(tensors['rng/torch/0'], tensors['rng/torch/1'])
    run_script(*torchrun, *tiny_train_args(phantom_dir, b, init_from='resume', **args))
    same_run(a, b, 8)
    assert [m['replica_max_difference'] for m in read_metrics(b) if 'replica_max_difference' in m][-1] == 0
