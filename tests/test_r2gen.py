"""R2Gen-format split files (prepare.py --split_file): IU X-ray names in both of their forms matched to
the Kaggle release's files, the frontal image picked, the match counts, references from the file
or ours, MIMIC-CXR's names, every kind of bad file, and the real IU tables when present."""
import csv
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from chexpert import CONDITIONS
from conftest import IU_TABLES, ROOT, needs_iu_tables, write_csv

pytestmark = pytest.mark.usefixtures('one_thread')
EFFUSION = CONDITIONS.index('Pleural Effusion')


def iu_raw(root, uids=range(1, 11)):
    """IU X-ray in the Kaggle layout with its real file names ('5_IM-0005-1001.dcm.png'): each
    study a frontal (1001) and a lateral (2001) image, but 2 has only the lateral, 3 a second
    frontal (1002), 4 no findings or impression left after cleaning, 1 the name Open-i gives
    as 'CXR1_1_IM-0001-...'."""
    images = root / 'images' / 'images_normalized'
    images.mkdir(parents=True)
    reports, rows = [], []
    for u in uids:
        findings, impression = ('XXXX.', 'XXXX.') if u == 4 else (f'The heart is normal. Finding {u}.', 'Normal.')
        reports.append((u, 'normal', 'normal', 'Xray Chest', f'Cough {u}.', '', findings, impression))
        views = [('2001', 'Lateral')] + ([] if u == 2 else [('1001', 'Frontal')])
        views += [('1002', 'Frontal')] if u == 3 else []
        rows += [(u, f'{u}_IM-{u:04d}-{n}.dcm.png', p) for n, p in views]
    write_csv(root / 'indiana_reports.csv', ['uid', 'MeSH', 'Problems', 'image', 'indication', 'comparison',
                                            'findings', 'impression'], reports)
    write_csv(root / 'indiana_projections.csv', ['uid', 'filename', 'projection'], rows)
    for u, name, _ in rows:
        Image.fromarray(np.full((40, 32), 10 * u, np.uint8)).save(images / name)
    return root


def open_i(u):
    return f'CXR{u}_1_IM-{u:04d}' if u == 1 else f'CXR{u}_IM-{u:04d}'


SPLIT = {'train': [1, 2, 3, 4, 5, 6], 'val': [7, 8], 'test': [9, 10]}


def annotation(path, form='flat', split=SPLIT, extra=None, **overrides):
    """An R2Gen-format file for the studies of iu_raw, its names in R2Gen's own folder form
    ('CXR5_IM-0005/0.png') or Open-i's flat one ('CXR5_IM-0005-1001.png')."""
    def names(u):
        if form == 'folder':
            return [f'{open_i(u)}/0.png', f'{open_i(u)}/1.png']
        return [f'{open_i(u)}-2001.png'] + ([] if u == 2 else [f'{open_i(u)}-1001.png'])
    ann = {s: [dict(id=open_i(u), report=f'There is a small left pleural effusion number {u}.',
                    image_path=names(u), split=s) for u in us] for s, us in split.items()}
    for s, items in (extra or {}).items():
        ann[s] += items
    ann.update(overrides)
    path.write_text(json.dumps(ann))
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def prepared(out):
    return {s: read_jsonl(out / f'{s}.jsonl') for s in ('train', 'val', 'test')}


@pytest.mark.parametrize('form', ['flat', 'folder'])
def test_iu_split_file_in_either_name_form(tmp_path, form):
    src = iu_raw(tmp_path / 'raw')
    nowhere = dict(id='CXR999_IM-9999', report='x', image_path=['CXR999_IM-9999/0.png'])
    ann = annotation(tmp_path / 'annotation.json', form, extra={'test': [nowhere]})
    m = prepare.prepare_iu(str(src), str(tmp_path / 'iu'), short_side=448, n_workers=1, split_file=ann)
    splits = prepared(tmp_path / 'iu')
    # the file's split, one record per item with a frontal image; 2 has none, 4 no text, 999 no file
    assert {s: [r['id'] for r in v] for s, v in splits.items()} == \
        {'train': [open_i(u) for u in (1, 3, 5, 6)], 'val': [open_i(7), open_i(8)], 'test': [open_i(9), open_i(10)]}
    assert m['r2gen_match'] == {'train': {'items': 6, 'matched': 5, 'no frontal image': 1, 'no file': 0},
                                'val': {'items': 2, 'matched': 2, 'no frontal image': 0, 'no file': 0},
                                'test': {'items': 3, 'matched': 2, 'no frontal image': 0, 'no file': 1}}
    assert m['dropped']['train: findings and impression both empty after cleaning'] == 1
    assert m['references'] == 'ours' and m['split_file'] == ann and len(m['split_file_sha256']) == 64
    assert 'seed' not in m and m['counts'] == {'train': 4, 'val': 2, 'test': 2}
    by_uid = {r['uid']: r for v in splits.values() for r in v}
    assert by_uid['1']['image'] == 'images_448/1_IM-0001-1001.dcm.png'  # Open-i's CXR1_1_IM-0001 is Kaggle's 1_IM-0001
    assert by_uid['3']['image'] == 'images_448/3_IM-0003-1001.dcm.png'  # the first frontal of two
    assert all('-1001' in r['image'] for r in by_uid.values())        # never the lateral
    r5 = by_uid['5']
    assert r5['report'] == 'Findings: The heart is normal. Finding 5. | Impression: Normal.'  # ours, by default
    assert r5['indication'] == 'Cough 5.' and r5['labels'][EFFUSION] is None
    with Image.open(tmp_path / 'iu' / r5['image']) as im:
        assert im.size == (32, 40) and np.asarray(im).mean() == 50  # that study's own image


def test_iu_references_from_the_file(tmp_path):
    src = iu_raw(tmp_path / 'raw')
    ann = annotation(tmp_path / 'annotation.json')
    m = prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1, split_file=ann, references='annotation')
    records = {r['uid']: r for v in prepared(tmp_path / 'iu').values() for r in v}
    assert sorted(records, key=int) == ['1', '3', '4', '5', '6', '7', '8', '9', '10']  # 4 has text in the file
    r = records['5']
    assert r['report'] == 'Findings: There is a small left pleural effusion number 5.'
    assert r['findings'] == 'There is a small left pleural effusion number 5.' and r['impression'] == ''
    assert r['labels'][EFFUSION] == 1  # labelled from the reference used
    assert r['indication'] == 'Cough 5.' and m['references'] == 'annotation'
    assert [x['id'] for x in data.read_split(str(tmp_path / 'iu'), 'test')] == [open_i(9), open_i(10)]  # trainable


def test_a_split_file_matching_no_file_is_an_error(tmp_path):
    src = iu_raw(tmp_path / 'raw')
    elsewhere = {s: [u + 100 for u in us] for s, us in SPLIT.items()}   # studies 101.. are not in --src
    with pytest.raises(ValueError, match=r'annotation\.json.*none of the 6 train items.*CXR101_IM-0101'):
        prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1,
                           split_file=annotation(tmp_path / 'annotation.json', split=elsewhere))
    one_split = dict(SPLIT, test=[101, 102])
    with pytest.raises(ValueError, match=r'none of the 2 test items'):  # no split may end up empty
        prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1,
                           split_file=annotation(tmp_path / 'annotation.json', split=one_split))
    with pytest.raises(ValueError, match=r'none of the 6 train items'):  # the names are there, the images not
        prepare.iu_r2gen_records(annotation(tmp_path / 'annotation.json'), str(src / 'indiana_reports.csv'),
                                 str(src / 'indiana_projections.csv'), files=set())
    assert not (tmp_path / 'iu' / 'train.jsonl').exists()


@pytest.mark.parametrize('content, what', [
    ('{"train": [', r'not valid JSON'),
    ('[1, 2]', r'JSON object'),
    ('{"train": [], "val": []}', r"no 'test' split"),
    ('{"train": [], "validate": [], "test": []}', r"no 'val' split"),
    ('{"train": {}, "val": [], "test": []}', r"'train' must be a list"),
    ('{"train": [7], "val": [], "test": []}', r'train item 0 must be a JSON object'),
    ('{"train": [{"image_path": ["a.png"]}], "val": [], "test": []}', r"train item 0 lacks 'id'"),
    ('{"train": [], "val": [{"id": "s1", "report": "x"}], "test": []}', r"val item 0 \(id 's1'\) lacks 'image_path'"),
    ('{"train": [], "val": [], "test": [{"id": "s1", "image_path": "a.png"}]}', r"test item 0 .*must be a list"),
    ('{"train": [{"id": "s1", "image_path": []}], "val": [], "test": [{"id": "s1", "image_path": []}]}',
     r"test item 0 \(id 's1'\): the id 's1' is also train item 0's"),
])
def test_bad_split_files_name_what_is_missing(tmp_path, content, what):
    (tmp_path / 'bad.json').write_text(content)
    with pytest.raises(ValueError, match=r'bad\.json.*' + what):
        prepare.read_r2gen(str(tmp_path / 'bad.json'))


def test_references_from_the_file_need_its_reports(tmp_path):
    (tmp_path / 'a.json').write_text('{"train": [{"id": "s1", "image_path": ["a.png"]}], "val": [], "test": []}')
    assert prepare.read_r2gen(str(tmp_path / 'a.json'))['train'][0]['id'] == 's1'  # fine for our references
    with pytest.raises(ValueError, match=r"a\.json: train item 0 \(id 's1'\) lacks 'report'"):
        prepare.read_r2gen(str(tmp_path / 'a.json'), need_report=True)
    with pytest.raises(FileNotFoundError, match='nowhere.json'):
        prepare.read_r2gen(str(tmp_path / 'nowhere.json'))


@pytest.mark.parametrize('name, key', [
    ('CXR3321_IM-1588-1001.png', ('3321', 'IM-1588', '1001')),       # Open-i, R2Gen's flat form
    ('3321_IM-1588-1001.dcm.png', ('3321', 'IM-1588', '1001')),      # the Kaggle release
    ('CXR3321_IM-1588/0.png', ('3321', 'IM-1588', None)),            # R2Gen's folder form: the study
    ('iu_xray/images/CXR1_1_IM-0001/1.png', ('1', 'IM-0001', None)),
    ('CXR1_1_IM-0001-4001.png', ('1', 'IM-0001', '4001')),
    ('21_IM-0729-1001-0002.dcm.png', ('21', 'IM-0729', '1001-0002')),
    ('cxr5_im-0005-1001.PNG', ('5', 'IM-0005', '1001')),
    ('0.png', None), ('CXR3321.png', None), ('notes/CXR3321_IM-1588-1001/0.png', None),
])
def test_iu_name_forms(name, key):
    assert prepare.iu_name_key(name) == key


# --- MIMIC-CXR -------------------------------------------------------------------------------
def test_mimic_split_file(tmp_path):
    from test_prepare import mimic_fixture
    src = tmp_path / 'mimic'
    src.mkdir()
    mimic_fixture(src)  # studies 100 (PA), 101 (AP), 110 (PA), 111 (lateral), 120 (no sections)
    item = lambda d, p, s, **kw: dict(id=d, study_id=int(s), subject_id=int(p), report=f'Report of {d}.',
                                      image_path=[f'p{p[:2]}/p{p}/s{s}/{d}.jpg'], **kw)
    ann = {'train': [item('d110', '11', '110'), item('d111', '11', '111'), item('d120', '12', '120')],
           'val': [item('d101', '10', '101')],
           'test': [item('d100', '10', '100'), item('dX', '10', '999')]}
    (tmp_path / 'annotation.json').write_text(json.dumps(ann))
    m = prepare.prepare_mimic(str(src), str(tmp_path / 'out'), n_workers=1,
                              split_file=str(tmp_path / 'annotation.json'))
    splits = prepared(tmp_path / 'out')
    assert {s: [r['id'] for r in v] for s, v in splits.items()} == \
        {'train': ['d110'], 'val': ['d101'], 'test': ['d100']}
    assert m['r2gen_match']['train'] == {'items': 3, 'matched': 2, 'no frontal image': 1, 'no file': 0}
    assert m['r2gen_match']['test'] == {'items': 2, 'matched': 1, 'no frontal image': 0, 'no file': 1}
    assert m['dropped']['train: report has neither FINDINGS nor IMPRESSION'] == 1
    r = splits['train'][0]
    assert r['report'] == 'Findings: Enlarged heart. No effusion. | Impression: Cardiomegaly.' and r['study'] == '110'
    assert r['indication'] == '___F with shortness of breath.' and r['image'] == 'images_448/d110.png'
    assert r['labels'][CONDITIONS.index('Cardiomegaly')] == 1  # the official labels
    prepare.prepare_mimic(str(src), str(tmp_path / 'out2'), n_workers=1, split_file=str(tmp_path / 'annotation.json'),
                          references='annotation')
    splits = prepared(tmp_path / 'out2')
    assert [r['id'] for r in splits['train']] == ['d110', 'd120']  # 120's text is in the file
    assert splits['train'][0]['report'] == 'Findings: Report of d110.'
    (src / 'files' / 'p10' / 'p10' / 's100' / 'd100.jpg').unlink()  # an image gone from --src: no file
    with pytest.raises(ValueError, match=r'none of the 2 test items.*p10/p10/s100/d100\.jpg'):
        prepare.prepare_mimic(str(src), str(tmp_path / 'out3'), n_workers=1,
                              split_file=str(tmp_path / 'annotation.json'))


# --- one study in two splits: a leak ----------------------------------------------------------
@pytest.mark.parametrize('where, name, what', [
    ('test', f'{open_i(5)}/0.png', r"image '5_IM-0005-1001\.dcm\.png'"),  # the study again, in the folder form
    ('val', f'{open_i(5)}-2001.png', r"image '5_IM-0005-2001\.dcm\.png'"),  # its lateral image alone
    ('test', 'CXR5_IM-0105-1001.png', None),                               # another study of the same uid
])
def test_one_iu_study_in_two_splits_is_an_error_naming_both_items(tmp_path, where, name, what):
    """Issue 26: study 5 in train and again in test under another id prepared with no word."""
    src = iu_raw(tmp_path / 'raw')
    with open(src / 'indiana_projections.csv', 'a', newline='') as f:  # uid 5's second study
        csv.writer(f).writerow([5, '5_IM-0105-1001.dcm.png', 'Frontal'])
    Image.new('L', (32, 40)).save(src / 'images' / 'images_normalized' / '5_IM-0105-1001.dcm.png')
    again = dict(id='CXR5-again', report='x', image_path=[name])
    ann = annotation(tmp_path / 'annotation.json', extra={where: [again]})
    item = len(SPLIT[where])
    what = what or r"IU study \(uid\) '5'"
    with pytest.raises(ValueError, match=rf"annotation\.json: {where} item {item} \(id 'CXR5-again'\) and train item 4 "
                                         rf"\(id '{open_i(5)}'\) hold the same {what}"):
        prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1, split_file=ann)
    assert not (tmp_path / 'iu').exists()


def test_one_iu_study_twice_in_one_split_is_kept_as_before(tmp_path):
    src = iu_raw(tmp_path / 'raw')
    ann = annotation(tmp_path / 'annotation.json', extra={'train': [dict(id='CXR5-again', image_path=[f'{open_i(5)}/0.png'])]})
    prepare.prepare_iu(str(src), str(tmp_path / 'iu'), n_workers=1, split_file=ann)
    train = prepared(tmp_path / 'iu')['train']
    assert [r['id'] for r in train if r['uid'] == '5'] == [open_i(5), 'CXR5-again']


def test_one_mimic_study_or_image_in_two_splits_is_an_error_naming_both_items(tmp_path):
    from test_prepare import mimic_fixture
    src = tmp_path / 'mimic'
    src.mkdir()
    mimic_fixture(src)
    with open(src / 'mimic-cxr-2.0.0-metadata.csv', 'a', newline='') as f:  # study 100's lateral image
        csv.writer(f).writerow(['d100b', '10', '100', 'LATERAL'])
    Image.new('L', (40, 40)).save(src / 'files' / 'p10' / 'p10' / 's100' / 'd100b.jpg')
    item = lambda d, s, k='': dict(id=k or d, image_path=[f'p10/p10/s{s}/{d}.jpg'])
    for train, what in ((item('d100b', '100'), "MIMIC-CXR study '100'"), (item('d100', '100', 'x'), "image 'd100'")):
        ann = {'train': [item('d101', '101'), train], 'val': [], 'test': [item('d100', '100')]}
        (tmp_path / 'annotation.json').write_text(json.dumps(ann))
        with pytest.raises(ValueError, match=rf"test item 0 \(id 'd100'\) and train item 1 \(id '{train['id']}'\) "
                                             rf"hold the same {what}"):
            prepare.prepare_mimic(str(src), str(tmp_path / 'out'), n_workers=1,
                                  split_file=str(tmp_path / 'annotation.json'))
    ann['train'], ann['test'] = [item('d100', '100'), item('d100b', '100')], [item('d101', '101')]  # one split: fine
    (tmp_path / 'annotation.json').write_text(json.dumps(ann))
    splits, _, match = prepare.mimic_r2gen_records(str(tmp_path / 'annotation.json'), str(src))
    assert [r['id'] for r in splits['train']] == ['d100'] and match['train']['no frontal image'] == 1


# --- the command line -------------------------------------------------------------------------
def run_prepare_py(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['prepare.py', *args])
    try:
        runpy.run_path(os.path.join(ROOT, 'prepare.py'), run_name='__main__')
    except SystemExit as e:
        return e.code
    return None


def test_command_line(tmp_path, monkeypatch):
    src = iu_raw(tmp_path / 'raw')
    ann = annotation(tmp_path / 'annotation.json', 'folder')
    out = tmp_path / 'iu'
    assert run_prepare_py(monkeypatch, '--dataset=iu_xray', f'--src={src}', f'--data_dir={out}', f'--split_file={ann}',
                       '--references=annotation', '--workers=1') is None
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['references'] == 'annotation' and manifest['counts'] == {'train': 5, 'val': 2, 'test': 2}  # 4 too
    assert 'references' in run_prepare_py(monkeypatch, '--dataset=iu_xray', f'--src={src}', f'--data_dir={out}',
                                       f'--split_file={ann}', '--references=theirs')
    assert 'split_file' in run_prepare_py(monkeypatch, '--dataset=iu_xray', f'--src={src}', f'--data_dir={out}',
                                       '--references=annotation')


# --- the real IU X-ray tables -----------------------------------------------------------------
@needs_iu_tables
@pytest.mark.parametrize('form', ['flat', 'folder'])
def test_real_iu_tables_every_study_found_in_either_form(tmp_path, form):
    """An R2Gen-format file of every study of the real tables, named as Open-i and R2Gen name them."""
    with open(os.path.join(IU_TABLES, 'indiana_projections.csv')) as f:
        rows = list(csv.DictReader(f))
    studies = {}
    for r in rows:
        uid, study, image = prepare.iu_name_key(r['filename'])
        assert uid == r['uid'] and image, r  # every real file name parses, its uid the table's
        studies.setdefault((uid, study), []).append((image, r['projection']))
    # Open-i names uid 1's images CXR1_1_IM-0001-4001.png: that form too
    cxr = lambda uid, study: f'CXR{uid}_1_{study}' if uid == '1' else f'CXR{uid}_{study}'
    items = [dict(id=cxr(u, s), image_path=[f'{cxr(u, s)}/{i}.png' for i in range(len(v))] if form == 'folder' else
                  [f'{cxr(u, s)}-{image}.png' for image, _ in v]) for (u, s), v in sorted(studies.items())]
    (tmp_path / 'a.json').write_text(json.dumps({'train': items[:3000], 'val': items[3000:3400], 'test': items[3400:]}))
    splits, dropped, match = prepare.iu_r2gen_records(str(tmp_path / 'a.json'), *(os.path.join(IU_TABLES, f) for f in (
        'indiana_reports.csv', 'indiana_projections.csv')))
    no_frontal = sum(all(p != 'Frontal' for _, p in v) for v in studies.values())
    total = {k: sum(c[k] for c in match.values()) for k in ('items', 'matched', 'no frontal image', 'no file')}
    print(f"\n{form}: {total}, dropped {dict(dropped)}")
    assert total == {'items': len(studies), 'matched': len(studies) - no_frontal, 'no frontal image': no_frontal,
                     'no file': 0}
    assert len(studies) == 3852 and no_frontal == 162  # uid 1015 has two studies
    records = [r for v in splits.values() for r in v]
    assert all(r['image'] in {x['filename'] for x in rows if x['projection'] == 'Frontal'} for r in records)
    assert len(records) == total['matched'] - sum(dropped.values())
