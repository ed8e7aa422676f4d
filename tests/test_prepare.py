"""prepare.py: text cleaning, the patient split, IU X-ray and MIMIC-CXR preparation from
fixtures in their real layouts (and the real IU tables when present), bad tables, and the
command line, `python prepare.py`."""
import csv
import gzip
import hashlib
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

import prepare
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
    assert prepare.clean_text(raw) == clean


def test_patient_split_is_stable_exact_and_seeded():
    uids = [str(i) for i in range(1, 1001)]
    split = prepare.patient_split(uids, 1337)
    counts = {s: sum(v == s for v in split.values()) for s in ('train', 'val', 'test')}
    assert counts == {'train': 700, 'val': 150, 'test': 150}
    assert prepare.patient_split(list(reversed(uids)) + uids[:10], 1337) == split  # order and repeats don't matter
    assert prepare.patient_split(uids, 1) != split
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
    m = prepare.prepare_iu(str(src), str(out), seed=0, short_side=448, n_workers=2)
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
    prepare.prepare_iu(str(src), str(out), seed=0, short_side=448, n_workers=1)
    assert os.path.getmtime(out / r1['image']) == before


@needs_iu_tables
def test_real_iu_tables():
    splits, dropped = prepare.iu_records(os.path.join(IU_TABLES, 'indiana_reports.csv'),
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
    m = prepare.prepare_mimic(str(src), str(out), short_side=448, n_workers=1)
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
    assert prepare.report_sections(report) == want


# --- bad tables -----------------------------------------------------------------------
def test_csv_errors_name_the_file_and_columns(tmp_path):
    p = tmp_path / 'indiana_reports.csv'
    write_csv(p, ['uid', 'findings'], [('1', 'x')])
    with pytest.raises(ValueError, match=r"indiana_reports\.csv.*'impression', 'indication'"):
        prepare.read_csv(str(p), prepare.IU_REPORT_COLUMNS)
    p.write_text('')  # empty, then a header without rows
    with pytest.raises(ValueError, match=r'indiana_reports\.csv'):
        prepare.read_csv(str(p), prepare.IU_REPORT_COLUMNS)
    p.write_text('uid,findings,impression,indication\n')
    with pytest.raises(ValueError, match=r'indiana_reports\.csv'):
        prepare.read_csv(str(p), prepare.IU_REPORT_COLUMNS)
    with pytest.raises(FileNotFoundError, match='nowhere.csv'):
        prepare.read_csv(str(tmp_path / 'nowhere.csv'), ('uid',))


# --- the command line -------------------------------------------------------------------
def run_command_line(monkeypatch, script, *args):
    """`python <script> args...` in this process; returns what it exits with (a message, or None)."""
    monkeypatch.setattr(sys, 'argv', [script, *args])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    except SystemExit as e:
        return e.code
    return None


def test_command_line_errors(tmp_path, monkeypatch):
    assert 'workers' in run_command_line(monkeypatch, 'prepare.py', '--dataset=iu_xray', f'--src={tmp_path}',
                                         '--workers=-1')
    # each call starts from the defaults again: neither src nor workers is left over from the last one
    assert '--src=DIR' in run_command_line(monkeypatch, 'prepare.py', '--dataset=iu_xray', f'--data_dir={tmp_path}/x')
    assert 'chexpert' in run_command_line(monkeypatch, 'prepare.py', '--dataset=chexpert', f'--data_dir={tmp_path}/x')
    with pytest.raises(ValueError, match='dataset'):  # the configurator suggests the right key
        run_command_line(monkeypatch, 'prepare.py', '--datset=iu_xray')
