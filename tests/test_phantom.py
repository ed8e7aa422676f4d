"""The phantom dataset: reproducible files in the prepared format, labels that follow
CheXpert's rules, pictures that really show what the reports say, a tokenizer that
gives the reports back exactly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import phantom
from chexpert import CONDITIONS, REGIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_train=16, n_val=4, n_test=4, image_size=64, seed=0)
C = {c: i for i, c in enumerate(CONDITIONS)}


def read(d, split):
    with open(os.path.join(d, f'{split}.jsonl')) as f:
        return [json.loads(line) for line in f]


def contents(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(root, n), 'rb') as f:
                out[os.path.relpath(os.path.join(root, n), d)] = f.read()
    return out


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """The same tiny set made serially and by 2 workers, and one from another seed."""
    root = tmp_path_factory.mktemp('phantom')
    phantom.generate(str(root / 'serial'), workers=1, **TINY)
    phantom.generate(str(root / 'parallel'), workers=2, **TINY)
    phantom.generate(str(root / 'seed1'), workers=1, **dict(TINY, seed=1))
    return {k: str(root / k) for k in ('serial', 'parallel', 'seed1')}


def test_same_seed_same_bytes_any_worker_count(sets):
    a, b = contents(sets['serial']), contents(sets['parallel'])
    assert sorted(a) == sorted(b) and len([p for p in a if p.startswith('images')]) == 24
    assert all(a[p] == b[p] for p in a), [p for p in a if a[p] != b[p]]
    c = contents(sets['seed1'])
    assert a['train.jsonl'] != c['train.jsonl']
    assert sum(a[p] != c[p] for p in a if p.startswith('images')) == 24


def test_format_counts_splits_and_manifest(sets):
    d = sets['serial']
    splits = {s: read(d, s) for s in ('train', 'val', 'test')}
    assert {s: len(r) for s, r in splits.items()} == dict(train=16, val=4, test=4)
    uids = [set(r['uid'] for r in recs) for recs in splits.values()]
    assert sum(map(len, uids)) == 24 and len(set.union(*uids)) == 24  # disjoint by patient
    for r in sum(splits.values(), []):
        assert r['report'] == f"Findings: {r['findings']} | Impression: {r['impression']}"
        assert len(r['labels']) == 14 and set(r['labels']) <= {1, 0, -1, None}
        assert r['label_source'] == 'phantom generator' and r['indication']
        im = Image.open(os.path.join(d, r['image']))
        assert im.size == (64, 64) and im.mode == 'L'
        assert list(r['regions']) == list(REGIONS)
    m = json.load(open(os.path.join(d, 'manifest.json')))
    assert m['dataset'] == 'phantom' and m['generator_version'] == phantom.VERSION
    assert m['params'] == TINY and m['seed'] == 0 and m['image_size'] == 64
    assert m['counts'] == dict(train=16, val=4, test=4)
    positives = sum(r['labels'][C['Cardiomegaly']] == 1 for r in splits['train'])
    assert m['prevalence']['train']['Cardiomegaly'] == round(positives / 16, 4)
    assert sum(m['label_counts'][k]['Edema'] for k in ('positive', 'negative', 'uncertain', 'blank')) == 24
    assert os.path.exists(os.path.join(d, 'preview.png'))


def test_labels_follow_chexpert_rules():
    reports = [phantom.write_report(phantom.sample_case(7, i)) for i in range(800)]
    for findings, impression, labels in reports:
        others = [v for c, v in zip(CONDITIONS, labels) if c not in ('No Finding', 'Support Devices')]
        # No Finding is positive iff nothing but support devices is positive or uncertain, else blank
        assert labels[0] == (None if any(v in (1, -1) for v in others) else 1)
        if any(labels[C[c]] == 1 for c in phantom.OPACITY_CHILDREN):
            assert labels[C['Lung Opacity']] == 1
        if labels[0] == 1:
            assert impression.endswith(tuple(phantom.NORMAL_IMPRESSION))
        if -1 in labels:
            assert 'Possible' in findings or 'cannot be excluded' in findings
        assert 15 <= len(f'{findings} {impression}'.split()) <= 90
    prevalence = np.mean([[v == 1 for v in labels] for *_, labels in reports], 0)
    assert 0.3 < prevalence[0] < 0.45 and prevalence.min() > 0.05, dict(zip(CONDITIONS, prevalence))
    assert any(-1 in labels for *_, labels in reports)


def same_patient(index, cond=None, **vals):
    """(case, image) of one patient, with exactly one chosen finding or none."""
    case = phantom.sample_case(3, index)
    case['findings'] = [phantom.make_finding(cond, **vals)] if cond else []
    return case, phantom.render(case, 128).astype(float)


def zone(image, box, fx0, fx1, fy0, fy1):
    """Mean brightness of a sub-box of a region box, in fractions of the region."""
    x0, y0, x1, y1 = (np.array(box) * image.shape[0]).tolist()
    w, h = x1 - x0, y1 - y0
    return image[int(y0 + fy0 * h):int(y0 + fy1 * h), int(x0 + fx0 * w):int(x0 + fx1 * w)].mean()


@pytest.mark.parametrize('index', [0, 1, 2])
def test_findings_show_in_the_image(index):
    case, normal = same_patient(index)
    r = phantom.regions(case)
    right, left, heart = r['right lung'], r['left lung'], r['cardiac']
    # a large right effusion whitens the patient's right costophrenic angle (image left, lateral, low)
    _, effusion = same_patient(index, 'Pleural Effusion', bside='right', sev='large')
    assert zone(effusion, right, 0, 0.35, 0.8, 1) > zone(normal, right, 0, 0.35, 0.8, 1) + 20
    # a large left pneumothorax darkens the apex and periphery beyond the pleural line
    _, ptx = same_patient(index, 'Pneumothorax', side='left', sev='large')
    assert zone(ptx, left, 0.6, 1, 0.1, 0.5) < zone(normal, left, 0.6, 1, 0.1, 0.5) - 5
    # a right lower lobe consolidation whitens the right base
    _, cons = same_patient(index, 'Consolidation', lobe='right lower lobe')
    assert zone(cons, right, 0.2, 0.8, 0.6, 0.9) > zone(normal, right, 0.2, 0.8, 0.6, 0.9) + 10
    # radiograph convention: the aerated lung is darker than the heart
    assert zone(normal, right, 0.4, 0.8, 0.3, 0.6) + 40 < zone(normal, heart, 0.4, 0.6, 0.4, 0.7)


LATERAL = [('Pleural Effusion', dict(bside='left')), ('Pneumothorax', dict(side='left')),
           ('Lung Opacity', dict(side='left')), ('Atelectasis', dict(side='left')), ('Pleural Other', dict(side='left')),
           ('Fracture', dict(side='left')), ('Consolidation', dict(lobe='left lower lobe')),
           ('Pneumonia', dict(lobe='left upper lobe')), ('Lung Lesion', dict(lobe='left upper lobe', kind='mass'))]


@pytest.mark.parametrize('cond,vals', LATERAL)
def test_findings_on_the_patients_left_change_the_image_right(cond, vals):
    _, normal = same_patient(4)
    for side, vals in (('left', vals), ('right', {k: v.replace('left', 'right') for k, v in vals.items()})):
        _, image = same_patient(4, cond, **vals)
        diff = np.abs(image - normal)
        right_half = diff[:, 64:].sum() / diff.sum()
        assert diff.mean() > 0.05, f'{cond} changes nothing'
        assert right_half > 0.8 if side == 'left' else right_half < 0.2, (cond, side, right_half)


def test_every_finding_and_device_is_drawn():
    _, normal = same_patient(5)
    for cond in phantom.SLOTS:
        _, image = same_patient(5, cond, **(dict(devices=['ett', 'ng', 'cvc', 'pacer']) if cond == 'Support Devices' else {}))
        assert np.abs(image - normal).mean() > 0.05, cond
    _, devices = same_patient(5, 'Support Devices', devices=['pacer'])
    assert devices.max() > 250  # metal is the brightest thing there is


def ctr(case):
    r = phantom.regions(case)
    return (r['cardiac'][2] - r['cardiac'][0]) / (r['left lung'][2] - r['right lung'][0])


def test_cardiothoracic_ratio_and_mediastinum():
    for i in range(10):
        case = phantom.sample_case(11, i)
        case['findings'] = []
        assert ctr(case) < 0.5
        for sev in ('mild', 'moderate', 'marked'):
            case['findings'] = [phantom.make_finding('Cardiomegaly', csev=sev)]
            assert ctr(case) > 0.5, (i, sev)
        width = lambda r: r['mediastinum'][2] - r['mediastinum'][0]
        normal = width(phantom.regions(dict(case, findings=[])))
        assert width(phantom.regions(dict(case, findings=[phantom.make_finding('Enlarged Cardiomediastinum')]))) > 1.3 * normal


def test_heart_on_the_image_right_and_regions_are_boxes():
    for i in range(40):
        case = phantom.sample_case(13, i)
        r = phantom.regions(case)
        for name, (x0, y0, x1, y1) in r.items():
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, (name, r[name])
        cx = lambda box: (box[0] + box[2]) / 2
        assert cx(r['cardiac']) > 0.5 and cx(r['left lung']) > 0.5 > cx(r['right lung'])
        assert r['diaphragm'][1] > r['mediastinum'][1] and r['cardiac'][3] <= r['diaphragm'][3]
    # and in the pixels: the heart bulges further right of the midline than left of it
    case, image = same_patient(6)
    _, big = same_patient(6, 'Cardiomegaly', csev='marked')
    grew = (big - image)[60:110]
    assert grew[:, 64:].sum() > 1.4 * grew[:, :64].sum() > 0


def test_tokenizer_round_trip_and_special_ids(sets):
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(sets['serial'], 'tokenizer.json'),
                                  pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # the set's own reports and 300 more from another seed: no unknown words, exact round trip
    reports = [r['report'] for s in ('train', 'val', 'test') for r in read(sets['serial'], s)]
    for i in range(300):
        findings, impression, _ = phantom.write_report(phantom.sample_case(99, i))
        reports.append(f'Findings: {findings} | Impression: {impression}')
    for report in reports:
        ids = tok(report, add_special_tokens=False)['input_ids']
        assert 2 not in ids, [tok.convert_ids_to_tokens(i) for i in ids if i == 2]
        assert tok.decode(ids) == report
    assert tok.decode(ids + [1, 0, 0], skip_special_tokens=True) == report
    assert tok.convert_tokens_to_ids('▁Findings') != tok.convert_tokens_to_ids('▁findings')  # case is kept


def test_ensure_skips_a_complete_set_and_regenerates_a_different_one(tmp_path):
    d = str(tmp_path / 'ph')
    small = dict(n_train=4, n_val=1, n_test=1, image_size=64, seed=0)
    phantom.ensure_phantom(d, workers=1, **small)
    stamp = os.stat(os.path.join(d, 'manifest.json')).st_mtime_ns
    phantom.ensure_phantom(d)                             # train.py's call: any complete set will do
    phantom.ensure_phantom(d, workers=1, **small)         # the same parameters
    phantom.generate(d, workers=1, **small)               # generate() skips it too unless forced
    assert os.stat(os.path.join(d, 'manifest.json')).st_mtime_ns == stamp
    m = phantom.ensure_phantom(d, workers=1, **dict(small, n_val=2))
    assert m['counts'] == dict(train=4, val=2, test=1) and len(os.listdir(os.path.join(d, 'images'))) == 7
    os.remove(os.path.join(d, 'tokenizer.json'))          # incomplete: made again
    phantom.ensure_phantom(d, workers=1, **small)
    assert os.path.exists(os.path.join(d, 'tokenizer.json'))
    assert not os.path.exists(d + '.tmp')


def test_bad_input_is_refused(tmp_path):
    for bad, key in ((dict(image_size=32), 'image_size'), (dict(image_size=128.0), 'image_size'),
                     (dict(n_train=0), 'n_train'), (dict(n_val=-1), 'n_val'), (dict(seed='x'), 'seed')):
        with pytest.raises(ValueError, match=key):
            phantom.generate(str(tmp_path / 'x'), **bad)
    other = tmp_path / 'iu_xray'
    other.mkdir()
    (other / 'train.jsonl').write_text('{}\n')
    with pytest.raises(ValueError, match='refusing to overwrite'):
        phantom.generate(str(other), n_train=2, n_val=0, n_test=0, image_size=64)
    (other / 'manifest.json').write_text(json.dumps(dict(dataset='iu_xray', counts=dict(train=1))))
    with pytest.raises(ValueError, match='refusing to overwrite'):  # a prepared real dataset is never replaced
        phantom.ensure_phantom(str(other), n_train=2, n_val=0, n_test=0, image_size=64)
    assert (other / 'train.jsonl').read_text() == '{}\n'
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(ValueError, match='refusing to overwrite'):
        phantom.generate(str(tmp_path / 'a_file'), n_train=2, n_val=0, n_test=0, image_size=64)
    with pytest.raises(ValueError, match='unknown condition'):
        phantom.make_finding('Pneumonitis')


def test_command_line(tmp_path):
    d = str(tmp_path / 'cli')
    run = lambda *args: subprocess.run([sys.executable, 'phantom.py', *args], cwd=ROOT, capture_output=True, text=True,
                                       env=dict(os.environ, HF_HUB_OFFLINE='1'))
    out = run(f'--data_dir={d}', '--n_train=3', '--n_val=1', '--n_test=1', '--image_size=64', '--workers=1')
    assert out.returncode == 0, out.stderr
    assert json.load(open(os.path.join(d, 'manifest.json')))['counts'] == {'train': 3, 'val': 1, 'test': 1}
    out = run(f'--data_dir={d}', '--n_trian=3')
    assert out.returncode != 0 and 'n_trian' in out.stderr  # the misspelt key, named


def test_labeler_recovers_the_generator_labels():
    import chexpert
    cases = [phantom.sample_case(21, i) for i in range(600)]
    wrong = {c: [] for c in CONDITIONS}
    for case in cases:
        findings, impression, truth = phantom.write_report(case)
        got = chexpert.label_report(f'Findings: {findings} | Impression: {impression}')
        for c, t, g in zip(CONDITIONS, truth, got):
            if t != g:
                wrong[c].append((t, g, f'{findings} | {impression}'))
    # every mention the generator made (1, 0, -1) and every blank must come back exactly
    assert not any(wrong.values()), {c: (len(w), w[:2]) for c, w in wrong.items() if w}


# -----------------------------------------------------------------------------
# Fingerprints: the exact output for fixed seeds. Computed with the generator as
# of VERSION 3; a change here means the data changed, so bump phantom.VERSION and
# recompute (or, after a numpy/Pillow upgrade with no code change, just recompute).

def sha256(*parts):
    """A hex digest of arrays (shape and bytes) and JSON-able values, in order."""
    import hashlib
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p.shape).encode() + p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p).encode())
    return h.hexdigest()


def test_fingerprint_of_a_generated_set(tmp_path):
    d = str(tmp_path / 'fp')
    phantom.generate(d, n_train=8, n_val=4, n_test=4, image_size=64, seed=0, workers=1)
    files = contents(d)
    pixels = [np.asarray(Image.open(os.path.join(d, p))) for p in sorted(files) if p.endswith('.png')]
    vocab = sorted(json.loads(files['tokenizer.json'])['model']['vocab'].items())
    texts = [files[p].decode() for p in ('train.jsonl', 'val.jsonl', 'test.jsonl', 'manifest.json')]
    assert len(pixels) == 17  # 16 images and the preview
    assert sha256(*pixels, *texts, vocab) == '2758a8130f81c007d8cccbe4e2f0c214b9a975cdc258639f9ee4a7b851a098d4'


# every finding and variant drawn on one patient, at the default 128 px: covers
# branches a small random set may miss (hedged fracture, every device, ...)
FORCED = [[('Enlarged Cardiomediastinum', {})], [('Cardiomegaly', dict(csev='marked'))],
          [('Lung Opacity', dict(side='left', zone='upper'))], [('Lung Opacity', dict(side='right', zone='lower'))],
          [('Lung Lesion', dict(kind='nodule', lobe='right middle lobe'))],
          [('Lung Lesion', dict(kind='mass', lobe='left upper lobe'))], [('Edema', dict(esev='moderate'))],
          [('Consolidation', dict(lobe='right lower lobe'))], [('Pneumonia', dict(lobe='left lower lobe'))],
          [('Atelectasis', dict(side='right'))], [('Pneumothorax', dict(side='left', sev='large'))],
          [('Pneumothorax', dict(side='right', sev='small', certain=False))],
          [('Pleural Effusion', dict(bside='bilateral', sev='moderate'))],
          [('Pleural Effusion', dict(bside='right', sev='small', certain=False))],
          [('Pleural Other', dict(side='left'))], [('Fracture', dict(side='right', rib='7th'))],
          [('Fracture', dict(side='left', rib='5th', certain=False))],
          [('Support Devices', dict(devices=['cvc', 'ett', 'ng', 'pacer'], side='right', k='4'))],
          [('Support Devices', dict(devices=['cvc'], side='left', k='3'))],
          [('Pneumothorax', dict(side='left', sev='moderate')), ('Pleural Effusion', dict(bside='left', sev='large')),
           ('Fracture', dict(side='left', rib='9th')), ('Cardiomegaly', dict(csev='mild')),
           ('Enlarged Cardiomediastinum', {})]]


def test_fingerprint_of_every_finding_at_128px():
    parts = []
    for i, findings in enumerate(FORCED):
        case = phantom.sample_case(3, i % 4)
        case['findings'] = [phantom.make_finding(c, **v) for c, v in findings]
        parts += [phantom.render(case, 128), phantom.regions(case), phantom.write_report(case)]
    for i in range(4):  # sampled patients as they come, and the reports and regions of many more
        parts.append(phantom.render(phantom.sample_case(1337, i), 128))
    for i in range(200):
        case = phantom.sample_case(1337, i)
        parts += [phantom.regions(case), phantom.write_report(case)]
    assert sha256(*parts) == '91ede0b9d573e755cda8510d38f4cb61cc2a50283e3246e7c77703765c0cd3ea'


def test_indications_hint_at_findings_without_giving_them_away():
    """Context can help (a hint is far likelier with its finding) but not replace the image
    (many patients with the finding get a generic indication), and the labels stay exact."""
    with_hint = {'Fracture': [0, 0], 'Pleural Effusion': [0, 0]}
    without_hint = {'Fracture': [0, 0], 'Pleural Effusion': [0, 0]}
    texts = {'Fracture': "Trauma, rib pain.", 'Pleural Effusion': "Follow-up of known pleural effusion."}
    for i in range(1500):
        case = phantom.sample_case(1337, i)
        present = {f['cond'] for f in case['findings']}
        for cond, text in texts.items():
            tally = with_hint if cond in present else without_hint
            tally[cond][0] += case['indication'] == text
            tally[cond][1] += 1
    for cond in texts:
        p_given = with_hint[cond][0] / with_hint[cond][1]
        p_false = without_hint[cond][0] / without_hint[cond][1]
        assert 0.3 < p_given < 0.8 and p_false < 0.06, (cond, p_given, p_false)
    tok = phantom.build_tokenizer([])
    for text in [t for _, t, _, _ in phantom.HINTS] + phantom.INDICATIONS + ['Indication:']:
        assert tok.token_to_id('<unk>') not in tok.encode(text).ids, text
