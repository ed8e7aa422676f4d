"""data.py: text cleaning, the patient split, IU X-ray and MIMIC-CXR preparation from
fixtures in their real layouts (and the real IU tables when present), images of every
mode, every kind of bad input, transforms, tokens and batches."""
import csv
import gzip
import hashlib
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
from chexpert import CONDITIONS
from conftest import IU_TABLES, ROOT, iu_fixture, needs_iu_tables, write_csv

pytestmark = pytest.mark.usefixtures('one_thread')


# --- text and split ------------------------------------------------------------------
@pytest.mark.parametrize('raw, clean', [
    ('The heart is normal.There is no effusion.', 'The heart is normal. There is no effusion.'),
    ('Heart normal. There are no XXXX of a pleural effusion. Lungs clear.', 'Heart normal. Lungs clear.'),
    ('  Stable  XXXX  sternotomy.\n Lungs\tclear.  ', 'Lungs clear.'),
    ('Normal chest x-XXXX.', ''),
    ('XXXX', ''),
    ('', ''),
    (None, ''),
    ('A 1.5 cm nodule.No change.', 'A 1.5 cm nodule. No change.'),  # decimals untouched
])
def test_clean_text(raw, clean):
    assert data.clean_text(raw) == clean


def test_patient_split_is_stable_exact_and_seeded():
    uids = [str(i) for i in range(1, 1001)]
    split = data.patient_split(uids, 1337)
    counts = {s: sum(v == s for v in split.values()) for s in ('train', 'val', 'test')}
    assert counts == {'train': 700, 'val': 150, 'test': 150}
    assert data.patient_split(list(reversed(uids)) + uids[:10], 1337) == split  # order and repeats don't matter
    assert data.patient_split(uids, 1) != split
    # golden value: the same seed must give the same split on any machine and version
    fingerprint = hashlib.sha256(json.dumps(sorted(split.items())).encode()).hexdigest()[:16]
    assert fingerprint == GOLDEN_SPLIT, fingerprint


GOLDEN_SPLIT = '9db9ab9d6bc7e42d'  # recorded when the split was written; never change it


# --- IU X-ray in the Kaggle layout ------------------------------------------------------
def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_prepare_iu_fixture(tmp_path, capsys):
    src, out = iu_fixture(tmp_path / 'raw'), tmp_path / 'iu'
    (src / 'images' / 'images_normalized' / '6_IM-1.dcm.png').unlink()                           # missing
    (src / 'images' / 'images_normalized' / '7_IM-1.dcm.png').write_bytes(b'not a png at all')     # corrupt
    m = data.prepare_iu(str(src), str(out), seed=0, short_side=448, n_workers=2)
    printed = capsys.readouterr().out
    assert '6_IM-1.dcm.png' in printed and '7_IM-1.dcm.png' in printed  # problems name the file
    records = {r['uid']: r for s in ('train', 'val', 'test') for r in read_jsonl(out / f'{s}.jsonl')}
    assert sorted(records, key=int) == [str(i) for i in range(1, 21) if i not in (3, 4, 6, 7)]
    assert m['dropped'] == {'study: findings and impression both empty after cleaning': 1,
                            'study: no frontal image': 1, **{k: v for k, v in m['dropped'].items() if ':' in k
                                                             and k.split(':')[0] in ('train', 'val', 'test')}}
    assert sum(v for k, v in m['dropped'].items() if 'image missing' in k) == 2
    r1 = records['1']
    assert r1['findings'] == 'The heart is normal. Lungs are clear.' and r1['impression'] == 'No acute disease.'
    assert r1['report'] == 'Findings: The heart is normal. Lungs are clear. | Impression: No acute disease.'
    assert r1['indication'] == 'Cough.' and len(r1['labels']) == 14 and r1['label_source'] == 'rule-based labeler'
    assert records['2']['report'] == 'Findings:  | Impression: Cardiomegaly.'  # the empty-section policy
    assert records['2']['labels'][CONDITIONS.index('Cardiomegaly')] == 1
    assert all('Lateral' not in r['image'] and r['image'].endswith('IM-1.dcm.png') for r in records.values())
    with Image.open(out / r1['image']) as im:
        assert min(im.size) == 448 and im.size == (448, round(700 * 448 / 600))
    # a re-run skips the unchanged copies
    before = os.path.getmtime(out / r1['image'])
    data.prepare_iu(str(src), str(out), seed=0, short_side=448, n_workers=1)
    assert os.path.getmtime(out / r1['image']) == before


@needs_iu_tables
def test_real_iu_tables():
    splits, dropped = data.iu_records(os.path.join(IU_TABLES, 'indiana_reports.csv'),
                                      os.path.join(IU_TABLES, 'indiana_projections.csv'))
    counts = {k: len(v) for k, v in splits.items()}
    patients = {k: {r['uid'] for r in v} for k, v in splits.items()}
    print(f"\nIU X-ray: images {counts}, patients { {k: len(v) for k, v in patients.items()} }, dropped {dict(dropped)}")
    for recs in splits.values():
        for r in recs:
            for key in ('findings', 'impression', 'report', 'indication'):
                assert 'XXXX' not in r[key].upper(), (r['uid'], key, r[key])
            assert r['findings'] or r['impression']
            assert not any(f'.{c}' in r['report'] for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ')
    assert not patients['train'] & patients['val'] and not patients['train'] & patients['test'] \
        and not patients['val'] & patients['test']
    n = sum(len(v) for v in patients.values())
    assert n > 3500
    for k, frac in (('train', 0.7), ('val', 0.15), ('test', 0.15)):
        assert abs(len(patients[k]) / n - frac) < 0.002
    assert sum(counts.values()) >= n  # one record per frontal image


# --- MIMIC-CXR in the MIMIC-CXR-JPG layout -----------------------------------------------
def mimic_fixture(root):
    studies = [('10', '100', 'train', 'PA'), ('10', '101', 'validate', 'AP'), ('11', '110', 'test', 'PA'),
               ('11', '111', 'train', 'LATERAL'), ('12', '120', 'train', 'PA')]  # 120: report has no sections
    meta = [(f'd{s}', p, s, v) for p, s, _, v in studies]
    write_csv(root / 'mimic-cxr-2.0.0-metadata.csv', ['dicom_id', 'subject_id', 'study_id', 'ViewPosition'], meta)
    with gzip.open(root / 'mimic-cxr-2.0.0-split.csv.gz', 'wt', newline='') as f:  # the real files are gzipped
        w = csv.writer(f)
        w.writerow(['dicom_id', 'study_id', 'subject_id', 'split'])
        w.writerows((f'd{s}', s, p, sp) for p, s, sp, _ in studies)
    labels = [[p, s] + ['1.0' if c == 'Cardiomegaly' else '-1.0' if c == 'Edema' else '' for c in CONDITIONS]
              for p, s, _, _ in studies]
    write_csv(root / 'mimic-cxr-2.0.0-chexpert.csv', ['subject_id', 'study_id'] + list(CONDITIONS), labels)
    for p, s, _, _ in studies:
        rep = root / 'mimic-cxr-reports' / 'files' / f'p{p[:2]}' / f'p{p}'
        rep.mkdir(parents=True, exist_ok=True)
        text = ('EXAMINATION: CHEST\n\nINDICATION: ___F with\n  shortness of breath.\n\n'
                'FINDINGS:\n Enlarged heart.\n No effusion.\n\nIMPRESSION: \n Cardiomegaly.\n'
                if s != '120' else 'WET READ: none\n')
        (rep / f's{s}.txt').write_text(text)
        img = root / 'files' / f'p{p[:2]}' / f'p{p}' / f's{s}'
        img.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((900, 1000), 128, np.uint8)).save(img / f'd{s}.jpg')
    return root


def test_prepare_mimic_fixture(tmp_path):
    src = tmp_path / 'mimic'
    src.mkdir()
    mimic_fixture(src)
    out = tmp_path / 'prepared'
    m = data.prepare_mimic(str(src), str(out), short_side=448, n_workers=1)
    assert m['counts'] == {'train': 1, 'val': 1, 'test': 1}
    assert m['dropped']['image: not a frontal (PA/AP) view'] == 1
    assert m['dropped']['image: report has neither FINDINGS nor IMPRESSION'] == 1
    val = read_jsonl(out / 'val.jsonl')[0]
    assert val['id'] == 'd101' and val['uid'] == '10'
    assert val['report'] == 'Findings: Enlarged heart. No effusion. | Impression: Cardiomegaly.'
    assert val['labels'][CONDITIONS.index('Cardiomegaly')] == 1 and val['labels'][CONDITIONS.index('Edema')] == -1
    assert val['labels'][CONDITIONS.index('Pneumonia')] is None
    assert val['indication'] == '___F with shortness of breath.'  # the report's INDICATION, cleaned
    with Image.open(out / val['image']) as im:
        assert im.size == (round(1000 * 448 / 900), 448)


@pytest.mark.parametrize('report, want', [
    # (findings, impression, indication): the first non-empty of INDICATION, HISTORY, REASON FOR EXAMINATION
    ('INDICATION:  ___M with cough,\n  fever.\nFINDINGS: Clear.\nIMPRESSION: Normal.',
     ('Clear.', 'Normal.', '___M with cough, fever.')),
    ('HISTORY: Fall.\nINDICATION: Rib pain.\nFINDINGS: No fracture.', ('No fracture.', '', 'Rib pain.')),
    ('INDICATION:\n\nHISTORY: Fall.\n\nFINDINGS: No fracture.', ('No fracture.', '', 'Fall.')),  # empty: the next
    ('REASON FOR EXAMINATION: Evaluate for pneumonia.\nHISTORY:  \nIMPRESSION: No pneumonia.',
     ('', 'No pneumonia.', 'Evaluate for pneumonia.')),
    ('                FINAL REPORT\n EXAMINATION: CHEST PA AND LAT\n TECHNIQUE: two views\n FINDINGS: Clear.',
     ('Clear.', '', '')),                                                   # none of the three: empty
    ('CLINICAL HISTORY: Cough.\nFINDINGS: Clear.', ('Clear.', '', '')),   # not one of the three headers
    ('', ('', '', '')),
])
def test_mimic_report_sections_and_indication(report, want):
    assert data.report_sections(report) == want


# --- bad tables -----------------------------------------------------------------------
def test_csv_errors_name_the_file_and_columns(tmp_path):
    p = tmp_path / 'indiana_reports.csv'
    write_csv(p, ['uid', 'findings'], [('1', 'x')])
    with pytest.raises(ValueError, match=r"indiana_reports\.csv.*'impression', 'indication'"):
        data.read_csv(str(p), data.IU_REPORT_COLUMNS)
    p.write_text('')  # empty, then a header without rows
    with pytest.raises(ValueError, match=r'indiana_reports\.csv'):
        data.read_csv(str(p), data.IU_REPORT_COLUMNS)
    p.write_text('uid,findings,impression,indication\n')
    with pytest.raises(ValueError, match=r'indiana_reports\.csv'):
        data.read_csv(str(p), data.IU_REPORT_COLUMNS)
    with pytest.raises(FileNotFoundError, match='nowhere.csv'):
        data.read_csv(str(tmp_path / 'nowhere.csv'), ('uid',))


def test_bad_split_file_names_file_and_line(tmp_path):
    (tmp_path / 'train.jsonl').write_text('{"id": "a", "image": "a.png", "report": "r", "labels": []}\n')
    with pytest.raises(ValueError, match=r'train\.jsonl:1: .*14 labels'):
        data.read_split(str(tmp_path), 'train')
    (tmp_path / 'val.jsonl').write_text('\n{not json\n')
    with pytest.raises(ValueError, match=r'val\.jsonl:2:'):
        data.read_split(str(tmp_path), 'val')
    with pytest.raises(FileNotFoundError, match=r'test\.jsonl.*data\.py'):  # how to make it
        data.read_split(str(tmp_path), 'test')


# --- images ---------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['L', 'I;16', 'I', 'F', 'RGB', 'RGBA', 'LA', 'P'])
def test_load_image_any_mode(tmp_path, mode):
    gray = np.tile(np.linspace(0, 255, 40, dtype=np.float64), (30, 1))  # dark left, bright right
    if mode == 'I;16':
        im = Image.fromarray((gray * 16).astype(np.uint16))  # 12-bit values, as many radiographs store them
    elif mode in ('I', 'F'):
        im = Image.fromarray(gray.astype(np.int32 if mode == 'I' else np.float32))
    else:
        im = Image.fromarray(gray.astype(np.uint8)).convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('I', 'F') else 'png'}"
    im.save(path)
    rgb = data.load_image(str(path))
    assert rgb.mode == 'RGB' and rgb.size == (40, 30)
    a = np.asarray(rgb).astype(int)
    assert a[:, -1].mean() > 240 and a[:, 0].mean() < 15  # the full range survives, not clipped or flattened


def test_bad_images_are_errors_naming_the_file(tmp_path, monkeypatch):
    cases = {'missing.png': None, 'empty.png': b'', 'text.png': b'just some text, not an image'}
    good = tmp_path / 'good.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    cases['truncated.png'] = good.read_bytes()[:200]
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            data.load_image(str(tmp_path / name))
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 64x64 = 4096 px is a "bomb" now
    with pytest.raises(ValueError, match='good.png.*(decompression|pixels)'):
        data.load_image(str(good))


def lopsided_image(path, size=96):
    a = np.zeros((size, size), np.uint8)
    a[:, : size // 2] = 230  # bright on the image's left only
    Image.fromarray(a).save(path)


def test_train_transform_never_flips(tmp_path):
    t = data.train_transform(64)
    names = [type(x).__name__ for x in t.transforms]
    assert names == ['Resize', 'RandomRotation', 'RandomAffine', 'ColorJitter', 'ToTensor', 'Normalize']
    lopsided_image(tmp_path / 'a.png')
    im = data.load_image(str(tmp_path / 'a.png'))
    for s in range(200):
        torch.manual_seed(s)
        x = t(im)
        assert x[:, :, :24].mean() > x[:, :, -24:].mean() + 1.0  # the bright side stays on the left


def test_eval_transform_is_deterministic_and_normalized(tmp_path):
    lopsided_image(tmp_path / 'a.png')
    im = data.load_image(str(tmp_path / 'a.png'))
    a, b = data.eval_transform(48)(im), data.eval_transform(48)(im)
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.75  # mean = std = 0.5


# --- tokens and batches ----------------------------------------------------------------
@pytest.fixture(scope='module')
def tok(phantom_dir):
    return data.load_tokenizer(phantom_dir)


def test_encode_report(tok):
    report = 'Findings: The heart is normal. | Impression: No acute disease.'
    dec, labels = data.encode_report(tok, 'Findings:', report, max_len=256)
    p = tok('Findings:', add_special_tokens=False)['input_ids']
    assert len(dec) == len(labels) and dec[0] == 0
    assert labels[:len(p)] == [-100] * len(p) and -100 not in labels[len(p):]
    assert labels[-1] == tok.eos_token_id
    assert dec[1:] == p + labels[len(p):-1]  # the decoder input is the target shifted right
    assert tok.decode(labels[len(p):], skip_special_tokens=True) == report[len('Findings: '):]
    assert data.prompt_ids(tok, 'Findings:') == dec[:len(p) + 1]
    short, short_labels = data.encode_report(tok, 'Findings:', report, max_len=6)
    assert len(short) == 6 and short_labels[-1] == tok.eos_token_id


def test_load_tokenizer_offline_hub_name_says_how_to_fix():
    with pytest.raises(OSError, match='--tokenizer='):  # how to fix it
        data.load_tokenizer('no-such-org/no-such-tokenizer')


def test_dataset_items_and_batches(phantom_dir, tok):
    from chexpert import binarize
    ds = data.ReportDataset(phantom_dir, 'train', tok, 64, train=True)
    item = ds[3]
    assert item['image'].shape == (3, 64, 64) and item['cond_labels'].shape == (14,)
    assert item['cond_labels'].dtype == torch.float32
    assert item['cond_labels'].tolist() == binarize(ds.records[3]['labels'], 'positive')
    b = data.collate([ds[i] for i in range(5)])
    T = max(len(ds[i]['labels']) for i in range(5))
    assert b['image'].shape == (5, 3, 64, 64) and b['labels'].shape == (5, T) and b['skipped'] == 0
    assert b['decoder_input_ids'].shape == (5, T) and b['cond_labels'].shape == (5, 14)
    shortest = min(range(5), key=lambda i: len(ds[i]['labels']))
    n = len(ds[shortest]['labels'])
    if n < T:
        assert (b['labels'][shortest, n:] == -100).all() and (b['decoder_input_ids'][shortest, n:] == 0).all()
    # DistributedSampler: two ranks share the data without overlap
    ranks = [list(torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0))
             for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == len(ds)


def test_bad_image_in_training_is_skipped_warned_once_and_counted(phantom_dir, tok, tmp_path, capsys):
    import shutil
    d = tmp_path / 'copy'
    shutil.copytree(phantom_dir, d)
    ds = data.ReportDataset(str(d), 'val', tok, 64)
    bad = d / ds.records[1]['image']
    bad.write_bytes(b'')
    assert ds[1] is None and ds[1] is None
    err = capsys.readouterr().err
    assert err.count(ds.records[1]['image']) == 1  # one warning naming the file
    b = data.collate([ds[0], ds[1], ds[2]])
    assert b['skipped'] == 1 and len(b['ids']) == 2 and b['image'].shape[0] == 2
    assert data.collate([None, None]) is None


def run_data_py(monkeypatch, *args):
    """data.py's command line, in this process; returns what it exits with (a message, or None)."""
    monkeypatch.setattr(sys, 'argv', ['data.py', *args])
    try:
        runpy.run_path(os.path.join(ROOT, 'data.py'), run_name='__main__')
    except SystemExit as e:
        return e.code
    return None


def test_command_line_errors(tmp_path, monkeypatch):
    assert '--src=DIR' in run_data_py(monkeypatch, '--dataset=iu_xray', f'--data_dir={tmp_path}/x')
    assert 'chexpert' in run_data_py(monkeypatch, '--dataset=chexpert', f'--data_dir={tmp_path}/x')
    with pytest.raises(ValueError, match='dataset'):  # the configurator suggests the right key
        run_data_py(monkeypatch, '--datset=iu_xray')
