"""eval.py: normalization, the metrics against hand-worked cases and against
pycocoevalcap, clinical F1 on crafted pairs, AUC, grounding, the predictions-file mode
with bad input, seeds, and the whole evaluation on a tiny phantom checkpoint."""
import json
import math
import os

import numpy as np
import pytest

import eval as ev
import metrics
from chexpert import CONDITIONS, REGIONS
from conftest import run_script


@pytest.mark.parametrize('raw, want', [
    (None, ''),
    ('', ''),
    ('   ', ''),
    ('Findings: The heart is normal. | Impression: No acute disease.', 'the heart is normal no acute disease'),
    ('FINDINGS:Heart,  lungs;\tclear!', 'heart lungs clear'),
    ('Ｎｏ effusion…', 'no effusion'),  # full-width letters and the ellipsis, NFKC
    ("Patient's 4.5 cm mass (left) — stable.", 'patient s 4 5 cm mass left stable'),
])
def test_normalize(raw, want):
    assert metrics.normalize(raw) == want


def test_invalid_pairs_are_skipped_and_counted():
    r, h, skipped = metrics.valid_pairs(['a b', '', 'c', None], ['a b', 'x', '...', 'y'])
    assert (r, h, skipped) == (['a b'], ['a b'], 3)
    m = metrics.nlg_metrics(['the heart is normal', ''], ['the heart is normal', 'x'])
    assert m['pairs'] == 1 and m['skipped_pairs'] == 1 and m['bleu4'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match='no valid'):
        metrics.nlg_metrics([''], ['x'])


def test_bleu_and_rouge_by_hand():
    ref, hyp = 'the heart is normal in size'.split(), 'the heart is normal'.split()
    b = metrics.bleu([ref], [hyp])
    bp = math.exp(1 - 6 / 4)  # brevity penalty: 4 hypothesis words against 6
    assert b['bleu1'] == pytest.approx(bp) and b['bleu4'] == pytest.approx(bp)
    with pytest.warns(UserWarning, match=r'0 counts of [34]-gram'):  # nltk's own warning: no smoothing
        b = metrics.bleu([['a', 'b', 'c', 'd']], [['a', 'b', 'x', 'd']])
    assert b['bleu1'] == pytest.approx(0.75) and b['bleu2'] == pytest.approx(math.sqrt(0.75 * 1 / 3))
    assert b['bleu3'] == pytest.approx(0, abs=1e-12) and b['bleu4'] == pytest.approx(0, abs=1e-12)
    # LCS 4 of 6 and of 4: P 1, R 2/3, F 0.8
    assert metrics.rouge_l(['the heart is normal in size'], ['the heart is normal']) == pytest.approx(0.8)


def test_meteor_says_whether_synonyms_were_used():
    score, synonyms = metrics.meteor([['the', 'heart', 'is', 'normal']], [['the', 'heart', 'is', 'normal']])
    assert score > 0.9 and synonyms == (metrics.wordnet_or_none() is not None)
    low, _ = metrics.meteor([['the', 'heart', 'is', 'normal']], [['lungs', 'are', 'clear', 'today']])
    assert low == 0


def test_coco_convention_equals_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge
    refs = ['Findings: The heart is normal in size. The lungs are clear. | Impression: No acute disease.',
            'Small left pleural effusion, no pneumothorax.', 'Heart size is normal; lungs clear.',
            'Moderate cardiomegaly. Mild pulmonary edema with bilateral effusions.']
    hyps = ['The heart is normal. Lungs are clear. No acute disease.', 'Small right pleural effusion.',
            'Heart size is normal. The lungs are clear.', 'Cardiomegaly with mild edema and effusions.']
    r, h = [metrics.coco_text(x) for x in refs], [metrics.coco_text(x) for x in hyps]
    gts, res = {i: [x] for i, x in enumerate(r)}, {i: [x] for i, x in enumerate(h)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_rouge, _ = Rouge().compute_score(gts, res)
    ours = metrics.coco_bleu(r, h)
    for k in range(4):
        assert ours[f'bleu{k + 1}'] == pytest.approx(ref_bleu[k], abs=1e-12)
    assert metrics.coco_rouge_l(r, h) == pytest.approx(ref_rouge, abs=1e-12)
    assert metrics.coco_text('Heart, normal. | Impression: Clear!') == 'heart , normal . clear !'


def test_clinical_scores_on_crafted_labels():
    true = np.zeros((4, 14))
    pred = np.zeros((4, 14))
    E, C = CONDITIONS.index('Pleural Effusion'), CONDITIONS.index('Cardiomegaly')
    true[[0, 1, 2], E] = 1
    pred[[0, 1, 3], E] = 1   # tp 2, fp 1, fn 1
    true[0, C] = 1           # fn 1
    s = metrics.clinical_scores(true, pred)
    assert s['Pleural Effusion'] == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
    assert s['Cardiomegaly']['f1'] == 0
    assert s['micro5'] == pytest.approx(dict(precision=2 / 3, recall=0.5, f1=2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)))
    assert s['macro5']['f1'] == pytest.approx((2 / 3) / 5)
    assert s['macro14']['f1'] == pytest.approx((2 / 3) / 14)


def test_clinical_metrics_run_the_labeler_on_both_sides():
    from chexpert import make_labeler
    refs = ['Small left pleural effusion. Heart size is normal.', 'Moderate cardiomegaly.']
    hyps = ['Small left pleural effusion. Heart size is normal.', 'The heart is normal in size.']
    m = metrics.clinical_metrics(refs, hyps, make_labeler())
    assert m['Pleural Effusion']['f1'] == 1 and m['Cardiomegaly']['recall'] == 0
    assert 'uncertain counted as positive' in m['uncertain_policy']


def test_auc_by_hand():
    t = np.array([[1], [1], [0], [0]])
    assert metrics.auc_per_condition(t, [[0.9], [0.8], [0.3], [0.1]]) == [1.0]
    assert metrics.auc_per_condition(t, [[0.1], [0.2], [0.8], [0.9]]) == [0.0]
    assert metrics.auc_per_condition(t, [[0.5], [0.5], [0.5], [0.5]]) == [0.5]      # ties share their rank
    assert metrics.auc_per_condition(t, [[0.9], [0.3], [0.3], [0.1]]) == [0.875]    # one tie between classes
    assert math.isnan(metrics.auc_per_condition(np.ones((3, 1)), [[0.1], [0.2], [0.3]])[0])


def test_grounding_on_a_synthetic_attention_map():
    g = 8
    attention = np.full((20, g * g), 1e-9)
    box = [0.5, 0.0, 1.0, 0.5]  # the image's right top quarter
    for j in range(6):
        a = np.zeros((g, g))
        a[:4, 4:] = 1.0 if j == 0 else 0.25  # query 14 fully inside; the others 1/4 ... uniform
        a[4:, :4] = 0 if j == 0 else 0.25
        a[:4, :4] = 0 if j == 0 else 0.25
        a[4:, 4:] = 0 if j == 0 else 0.25
        attention[14 + j] = a.ravel()
    shares = metrics.region_shares(attention, {r: box for r in REGIONS})
    assert shares['cardiac'] == pytest.approx(dict(share=1.0, area=0.25))
    assert shares['spine']['share'] == pytest.approx(0.25)
    agg = metrics.grounding([dict(grounding=shares)])
    assert agg['mean']['chance'] == pytest.approx(0.25) and agg['cardiac']['share'] == pytest.approx(1.0)
    assert metrics.grounding([{}]) is None


def write_predictions(path, rows):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)


def test_predictions_mode_and_bad_files(tmp_path):
    rows = [dict(id=str(i), reference='Findings: Small left pleural effusion. | Impression: Effusion.',
                 hypothesis='Findings: Small left pleural effusion. | Impression: Effusion.' if i % 2 else
                 'Findings: The lungs are clear. | Impression: Normal.',
                 probabilities=[0.9 if i % 2 else 0.1] * 14, labels=[None] * 10 + [1 if i % 2 else 0] + [None] * 3)
            for i in range(6)]
    p = tmp_path / 'preds.jsonl'
    write_predictions(p, rows)
    r = run_script('eval.py', f'--predictions={p}')
    m = json.loads((tmp_path / 'preds_metrics.json').read_text())
    assert m['n'] == 6 and m['systems']['model']['clinical']['Pleural Effusion']['recall'] == pytest.approx(0.5)
    assert m['aux_auc']['Pleural Effusion'] == 1.0 and math.isnan(m['aux_auc']['Edema'])
    assert 'METEOR synonyms: off' in r.stdout or 'METEOR synonyms: on' in r.stdout
    assert (tmp_path / 'preds_metrics_roc.png').exists() and (tmp_path / 'preds_metrics.txt').exists()
    (tmp_path / 'bad.jsonl').write_text('{"id": "1", "reference": "x", "hypothesis": "y"}\n{"id": "2"}\n')
    r = run_script('eval.py', f'--predictions={tmp_path}/bad.jsonl', check=False)
    assert r.returncode != 0 and "bad.jsonl:2: missing keys ['reference', 'hypothesis']" in r.stderr
    (tmp_path / 'broken.jsonl').write_text('{"id": \n')
    r = run_script('eval.py', f'--predictions={tmp_path}/broken.jsonl', check=False)
    assert r.returncode != 0 and 'broken.jsonl:1: not valid JSON' in r.stderr


def test_seeds_combine_as_mean_and_std(tmp_path):
    for i, b4 in enumerate((0.1, 0.2, 0.3)):
        (tmp_path / f'm{i}.json').write_text(json.dumps(dict(n=10, systems=dict(model=dict(nlg=dict(bleu4=b4))))))
    c = ev.combine_seeds([str(tmp_path / f'm{i}.json') for i in range(3)], 'test')
    assert c['systems.model.nlg.bleu4']['mean'] == pytest.approx(0.2)
    assert c['systems.model.nlg.bleu4']['std'] == pytest.approx(0.1)


def test_bertscore_with_a_tiny_local_model(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + 'the heart is normal lungs are clear'.split()
    (tmp_path / 'vocab.txt').write_text('\n'.join(words))
    BertTokenizerFast(vocab_file=str(tmp_path / 'vocab.txt')).save_pretrained(tmp_path / 'm')
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / 'm')
    same = metrics.bertscore(['the heart is normal'], ['the heart is normal'], str(tmp_path / 'm'))
    other = metrics.bertscore(['the heart is normal'], ['lungs are clear'], str(tmp_path / 'm'))
    assert same == pytest.approx(1.0, abs=1e-5) and other < same


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
    assert 0 <= m['aux_auc']['mean'] <= 1 and set(m['grounding']) == set(REGIONS) | {'mean'}
    assert 'most frequent train report' in r.stdout and 'grounding' in r.stdout
    assert os.path.exists(os.path.join(tiny_run, 'metrics_test_roc.png'))
