"""eval.py as a script: scoring prediction records (empty and over-long reports, the
per-condition and grounding tables), generating predictions with a checkpoint, the
predictions-file mode with bad input, combining seeds; slow: the command line end to end
on a trained tiny checkpoint, and a 2 MB pair under a memory limit."""
import json
import math
import os

import numpy as np
import pytest

import eval as ev
from chexpert import CONDITIONS, REGIONS
from conftest import run_script

EFFUSION = 'Findings: Small left pleural effusion. | Impression: Effusion.'
CLEAR = 'Findings: The lungs are clear. | Impression: Normal.'


def prediction_records(n=6):
    """Half the hypotheses right about a left effusion, the aux head sure of it on those."""
    return [dict(id=str(i), reference=EFFUSION, hypothesis=EFFUSION if i % 2 else CLEAR,
                 probabilities=[0.9 if i % 2 else 0.1] * 14, labels=[None] * 10 + [1 if i % 2 else 0] + [None] * 3)
            for i in range(n)]


def test_score_counts_empty_hypotheses_and_names_empty_references(capsys):
    records = prediction_records()
    records[2]['hypothesis'] = ''
    records[4]['hypothesis'] = None
    records.append(dict(id='no-reference', reference='', hypothesis=EFFUSION))
    m = ev.score(records)
    model = m['systems']['model']['nlg']
    assert m['n'] == 7 and model['pairs'] == 6 and model['empty_hypotheses'] == 2 and model['skipped_references'] == 1
    assert m['empty_reference_ids'] == ['no-reference'] and 'no-reference' in capsys.readouterr().err
    assert m['systems']['model']['clinical']['Pleural Effusion']['positives'] == 6
    assert 'aux_auc' not in m  # the added record has no probabilities: no AUC on a subset
    assert np.isfinite(model['rouge_l']) and json.loads(json.dumps(m)) == m


def test_score_names_records_cut_to_the_length_limit(capsys):
    records = prediction_records(4)
    records[1].update(id='long-reference', reference='There is a small left pleural effusion. ' * 20000)
    records[3].update(id='long-hypothesis', hypothesis='x' * 100000)
    m = ev.score(records)
    assert m['clipped_ids'] == ['long-reference', 'long-hypothesis']
    err = capsys.readouterr().err
    assert 'long-reference' in err and 'long-hypothesis' in err


def test_each_distinct_text_is_labeled_once_for_clinical_f1_and_faithfulness(monkeypatch):
    import chexpert
    asked = []
    label_report = chexpert.label_report
    monkeypatch.setattr(chexpert, 'label_report', lambda text: asked.append(text) or label_report(text))
    records = prediction_records()
    for r in records:
        r['decisions'] = [int(p > 0.5) for p in r['probabilities']]        # faithfulness labels the reports again
    m = ev.score(records)                                                # six records, two distinct texts
    assert len(asked) == len(set(asked))                                 # no text labeled twice
    assert set(asked) == {EFFUSION, CLEAR}
    assert m['faithfulness']['agreement'] > 0 and m['systems']['model']['clinical']['micro14']['f1'] > 0


def test_table_shows_per_condition_f1_beside_auc_and_the_paper_style_row():
    m = ev.score(prediction_records())
    e = m['systems']['model']['clinical']['Pleural Effusion']
    assert e['positives'] == 6 and e['recall'] == pytest.approx(0.5)
    assert m['aux_auc']['Pleural Effusion'] == 1.0 and math.isnan(m['aux_auc']['Edema'])
    text = ev.table(m)
    rows = {line[:28].strip(): line[28:].split() for line in ev.condition_table(m)[1:]}
    assert list(rows) == list(CONDITIONS)
    assert rows['Pleural Effusion'] == ['6', f"{e['f1']:.3f}", 'n/a', '1.000']  # no retrieval without train data
    assert 'CIDEr-D' in text and 'METEOR 1.5 unavailable' in text  # meteor15 not asked for in-process


@pytest.mark.filterwarnings(r'ignore:\s*The hypothesis contains 0 counts')  # nltk, on an untrained model's text
def test_generate_predictions_and_score_with_baselines_and_grounding(random_run, phantom_dir):
    records, cfg = ev.generate_predictions(random_run, 'test', max_samples=6, batch_size=4, num_beams=1,
                                           max_length=12, min_length=1)
    assert len(records) == 6 and cfg['data_dir'] == phantom_dir
    for r in records:
        assert len(r['probabilities']) == 14 and set(r['grounding']) == set(REGIONS)
        assert all(isinstance(v['hit'], bool) and 0 <= v['share'] <= 1 for v in r['grounding'].values())
    m = ev.score(records, train_dir=phantom_dir)
    assert set(m['systems']) == {'model', 'most frequent train report', 'nearest train image'}
    assert set(m['grounding']) == set(REGIONS) | {'mean'}
    for v in m['grounding'].values():
        assert 0 <= v['share'] <= 1 and 0 <= v['pointing'] <= 1
        assert 0 < v['chance'] <= v['pointing_chance'] < 1  # every box has its share, even the spine's
    rows = {line[:28].strip(): line[28:].split() for line in ev.condition_table(m)[1:]}
    assert all(row[2] != 'n/a' for row in rows.values())  # the retrieval baseline's F1 is there
    text = ev.table(m)
    assert all(r in text for r in REGIONS) and 'nearest train image' in text


def write_predictions(path, rows):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)


def test_predictions_mode_writes_metrics_beside_the_file(tmp_path, monkeypatch):
    p = tmp_path / 'preds.jsonl'
    write_predictions(p, prediction_records())
    monkeypatch.setattr(ev, 'predictions', str(p))
    monkeypatch.setattr(ev, 'meteor15', False)
    ev.main()
    m = json.loads((tmp_path / 'preds_metrics.json').read_text())
    assert m['n'] == 6 and m['systems']['model']['clinical']['Pleural Effusion']['recall'] == pytest.approx(0.5)
    assert (tmp_path / 'preds_metrics_roc.png').exists() and (tmp_path / 'preds_metrics.txt').exists()


def test_bad_predictions_files_name_the_file_and_line(tmp_path):
    (tmp_path / 'bad.jsonl').write_text('{"id": "1", "reference": "x", "hypothesis": "y"}\n{"id": "2"}\n')
    with pytest.raises(ValueError, match='bad.jsonl:2'):
        ev.read_predictions(str(tmp_path / 'bad.jsonl'))
    (tmp_path / 'broken.jsonl').write_text('{"id": \n')
    with pytest.raises(ValueError, match='broken.jsonl:1'):
        ev.read_predictions(str(tmp_path / 'broken.jsonl'))
    (tmp_path / 'empty.jsonl').write_text('\n')
    with pytest.raises(ValueError, match='empty.jsonl'):
        ev.read_predictions(str(tmp_path / 'empty.jsonl'))


def test_a_repeated_id_is_an_error_not_a_second_score(tmp_path, monkeypatch):
    """Issue 26: 20 records and 10 copies of a right one were all scored (BLEU-4 and CIDEr-D doubled)."""
    rows = prediction_records(4)
    write_predictions(tmp_path / 'p.jsonl', rows + [dict(rows[1])])
    with pytest.raises(ValueError, match=r"p\.jsonl:5: id '1' again \(first at line 2\)"):
        ev.read_predictions(str(tmp_path / 'p.jsonl'))
    monkeypatch.setattr(ev, 'predictions', str(tmp_path / 'p.jsonl'))
    with pytest.raises(ValueError):
        ev.main()
    assert not (tmp_path / 'p_metrics.json').exists()  # nothing scored


@pytest.mark.parametrize('field, value, words', [
    ('reference', 5, 'reference must be text'),
    ('hypothesis', ['Findings:', 'x'], 'hypothesis must be text'),
    ('id', ['2'], 'id must be text or an integer'),
    ('probabilities', [0.1, 0.2, 0.3], 'list of 14 finite numbers'),
    ('probabilities', 0.5, 'list of 14 finite numbers'),
    ('probabilities', [0.5] * 13 + ['0.5'], "Support Devices's \\(entry 13\\)"),
    ('probabilities', [0.5] * 5 + [float('nan')] + [0.5] * 8, r'\(entry 5\) is NaN'),
    ('probabilities', [float('inf')] + [0.5] * 13, r'\(entry 0\) is Infinity'),
    ('labels', [None] * 13 + [2], r'labels \(1, 0, -1 or null\)'),
    ('target', 'summary', 'target must be one of'),
])
def test_an_ill_typed_prediction_names_the_file_line_and_id(tmp_path, field, value, words):
    rows = prediction_records(4)
    rows[2][field] = value
    write_predictions(tmp_path / 'p.jsonl', rows)
    with pytest.raises(ValueError, match=r'p\.jsonl:3: ' + ('' if field == 'id' else "record '2': ") + '.*' + words):
        ev.read_predictions(str(tmp_path / 'p.jsonl'))


def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    lines = [json.dumps(r).encode() for r in prediction_records(3)]
    lines[1] = lines[1].replace(b'Small', b'Sm\xe9ll')  # Latin-1
    (tmp_path / 'p.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
    with pytest.raises(ValueError, match=r'p\.jsonl:2: not UTF-8 text \(byte 0xe9'):
        ev.read_predictions(str(tmp_path / 'p.jsonl'))


def seed_metrics(b4, f1, auc, share, pointing):
    return dict(n=10, systems=dict(model=dict(nlg=dict(bleu4=b4), clinical=dict(micro14=dict(f1=f1),
                                                                             macro14=dict(f1=f1 / 2)))),
                aux_auc=dict(mean=auc), grounding=dict(mean=dict(share=share, pointing=pointing, chance=0.2)))


def test_seeds_print_the_headline_metrics_as_mean_and_std(tmp_path, monkeypatch, capsys):
    runs = []
    for i, b4 in enumerate((0.1, 0.2, 0.3)):
        run = tmp_path / f'run{i}'
        run.mkdir()
        (run / 'metrics_test.json').write_text(json.dumps(seed_metrics(b4, 0.4 + i / 10, 0.7, 0.3, 0.5)))
        runs.append(str(run))
    c = ev.combine_seeds(runs, 'test')
    assert c['systems.model.nlg.bleu4'] == pytest.approx(dict(mean=0.2, std=0.1))
    before = sorted(p for p in tmp_path.rglob('*'))
    monkeypatch.setattr(ev, 'seeds', ','.join(runs))
    ev.main()
    lines = dict(line.split(': ', 1) for line in capsys.readouterr().out.strip().split('\n'))
    assert list(lines) == [name for name, _ in ev.HEADLINE]
    mean, std = (float(x) for x in lines['BLEU-4'].split(' ± '))
    assert (mean, std) == (pytest.approx(0.2), pytest.approx(0.1))
    assert [float(x) for x in lines['clinical F1 macro-14'].split(' ± ')] == [pytest.approx(0.25), pytest.approx(0.05)]
    assert float(lines['grounding pointing'].split(' ± ')[0]) == pytest.approx(0.5)
    assert sorted(p for p in tmp_path.rglob('*')) == before  # writes nothing


@pytest.mark.slow
def test_whole_evaluation_on_a_tiny_phantom_checkpoint(tiny_run):
    r = run_script('eval.py', f'--out_dir={tiny_run}', '--split=test', '--num_beams=2', '--max_length=60',
                   '--min_length=5')
    m = json.loads(open(os.path.join(tiny_run, 'metrics_test.json')).read())
    preds = [json.loads(x) for x in open(os.path.join(tiny_run, 'predictions_test.jsonl'))]
    assert len(preds) == m['n'] == 32
    assert all(p['hypothesis'].startswith('Findings:') and len(p['probabilities']) == 14 for p in preds)
    assert set(m['systems']) == {'model', 'most frequent train report', 'nearest train image'}
    for s in m['systems'].values():
        assert 0 <= s['nlg']['bleu4'] <= s['nlg']['bleu1'] <= 1 and 0 <= s['clinical']['micro14']['f1'] <= 1
        coco = s['nlg']['coco']
        assert 0 <= coco['cider'] and ('meteor' in coco) != ('meteor_unavailable' in coco)  # one or the other
    assert 0 <= m['aux_auc']['mean'] <= 1 and set(m['grounding']) == set(REGIONS) | {'mean'}
    assert 'pointing' in m['grounding']['mean']
    assert 'most frequent train report' in r.stdout and os.path.exists(os.path.join(tiny_run, 'metrics_test_roc.png'))


MEMORY_LIMIT = 1536 << 20  # bytes of data segment: the old code failed this with a MemoryError at once


@pytest.mark.slow
def test_a_2mb_pair_scores_within_a_memory_limit(tmp_path):
    """Issue 19: a 2,000,000-character reference and hypothesis once grew eval.py to 24 GB."""
    import random
    rng = random.Random(0)
    words = 'the heart is normal in size there is a small left pleural effusion no pneumothorax lungs clear'.split()
    big = ' '.join(rng.choice(words) for _ in range(400000))[:2000000]
    rows = [dict(id='huge', reference=big, hypothesis=big[::-1]),
            dict(id='fine', reference=EFFUSION, hypothesis=EFFUSION)]
    write_predictions(tmp_path / 'big.jsonl', rows)
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_DATA, ({MEMORY_LIMIT}, {MEMORY_LIMIT})); "
            f"sys.argv = ['eval.py', '--predictions={tmp_path}/big.jsonl', '--meteor15=False']; "
            f"runpy.run_path('eval.py', run_name='__main__')")
    r = run_script('-c', code, timeout=300)
    assert 'huge' in r.stderr and 'fine' not in r.stderr  # the cut record is named, the other is not
    m = json.loads((tmp_path / 'big_metrics.json').read_text())
    assert m['clipped_ids'] == ['huge'] and m['systems']['model']['nlg']['pairs'] == 2


@pytest.mark.filterwarnings(r'ignore:\s*The hypothesis contains 0 counts')
def test_images_that_are_not_regular_files_are_skipped_not_opened(random_run, phantom_dir, tmp_path, capsys):
    """Issue 26: eval.py reads the split's images (generation) and the train images (the retrieval
    baseline): a FIFO among them blocked for ever."""
    import shutil
    import data
    from checkpoint import load_checkpoint, save_checkpoint
    from conftest import NeverOpened
    copy = tmp_path / 'data'
    shutil.copytree(phantom_dir, copy)
    test, train = data.read_split(str(copy), 'test')[:4], data.read_split(str(copy), 'train')
    fifos = [str(copy / test[1]['image']), str(copy / train[0]['image'])]
    for f in fifos:
        os.unlink(f)
        os.mkfifo(f)
    model, meta = load_checkpoint(random_run)
    save_checkpoint(tmp_path / 'ckpt.safetensors', model, dict(config=dict(meta['config'], data_dir=str(copy))))
    with NeverOpened(fifos) as guard:
        records, _ = ev.generate_predictions(str(tmp_path), 'test', max_samples=4, num_beams=1, max_length=8,
                                             min_length=1)
        m = ev.score(records, train_dir=str(copy))
    assert guard.released == 0
    assert [r['id'] for r in records] == [test[i]['id'] for i in (0, 2, 3)]  # the other three still run
    assert fifos[0] in capsys.readouterr().err and 'nearest train image' not in m['systems']  # said, and left out
