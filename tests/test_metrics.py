"""metrics.py: normalization and clipping, the text metrics against hand-worked cases and
against pycocoevalcap, empty hypotheses and references, clinical F1 on crafted pairs (micro, macro,
example-based) and eval.py's clinical-efficacy block, AUC, grounding (share and pointing) and BERTScore."""
import math
import shutil

import numpy as np
import pytest

import metrics
from chexpert import CONDITIONS, REGIONS


def phantom_pairs(n=300):
    """n (reference, hypothesis) report pairs in the phantom's clinical language: the hypothesis
    is another patient's report, the reference's own every 7th pair, empty every 11th."""
    import phantom
    from prepare import make_report
    refs = [make_report(*phantom.write_report(phantom.sample_case(0, i))[:2]) for i in range(n)]
    hyps = [make_report(*phantom.write_report(phantom.sample_case(1, i))[:2]) for i in range(n)]
    hyps = [refs[i] if i % 7 == 0 else '' if i % 11 == 0 else h for i, h in enumerate(hyps)]
    return refs, hyps


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


def test_clip_keeps_short_reports_and_cuts_long_ones():
    report = 'Findings: The heart is normal. | Impression: No acute disease.'
    assert metrics.clip(report) is report and metrics.clip(None) == ''
    assert metrics.clip('a b c ', max_tokens=3) == 'a b c '         # exactly at the limit: unchanged
    assert metrics.clip('a b c d', max_tokens=3) == 'a b c'
    assert metrics.clip('no. effusion', max_tokens=2) == 'no.'      # a punctuation mark is a token
    assert metrics.clip('abcdef', max_chars=4) == 'abcd'
    long = 'the heart is normal. ' * 10000
    cut = metrics.clip(long)
    assert len(metrics.TOKEN.findall(cut)) == metrics.MAX_TOKENS and long.startswith(cut)
    assert len(metrics.clip('x' * 10 ** 6)) == metrics.MAX_CHARS
    assert metrics.clip(cut) == cut


def test_long_pairs_are_scored_on_their_clipped_text():
    long_ref, long_hyp = 'the heart is normal in size. ' * 5000, 'the heart is normal. ' * 5000
    m = metrics.nlg_metrics([long_ref, 'no effusion'], [long_hyp, 'no effusion'])
    c = metrics.nlg_metrics([metrics.clip(long_ref), 'no effusion'], [metrics.clip(long_hyp), 'no effusion'])
    assert m == c and m['pairs'] == 2


def test_empty_hypotheses_score_zero_on_every_text_metric():
    """Issue 19: 49 empty hypotheses and one perfect one is 1/50 of a perfect score, not 1.0."""
    refs = [f'there is a small left pleural effusion number {i}' for i in range(50)]
    hyps = [refs[0]] + [''] * 40 + [None] * 5 + ['...', 'Findings: | Impression:', '   ', '']
    m = metrics.nlg_metrics(refs, hyps)
    assert m['pairs'] == 50 and m['empty_hypotheses'] == 49 and m['skipped_references'] == 0
    assert m['rouge_l'] == pytest.approx(0.02) and m['coco']['rouge_l'] == pytest.approx(0.02)
    assert m['meteor'] == pytest.approx(0.02, abs=1e-4)
    for k in ('bleu1', 'bleu2', 'bleu3', 'bleu4'):  # the empties' reference lengths count in the brevity penalty
        assert 0 <= m[k] < 1e-6 and 0 <= m['coco'][k] < 1e-6
    assert 0 < m['coco']['cider'] < metrics.nlg_metrics(refs, refs)['coco']['cider'] / 40
    perfect = metrics.nlg_metrics(refs, refs)
    assert perfect['rouge_l'] == pytest.approx(1) and perfect['empty_hypotheses'] == 0
    nothing = metrics.nlg_metrics(refs[:3], [''] * 3)
    assert all(nothing[k] == 0 for k in ('bleu1', 'bleu4', 'rouge_l', 'meteor'))
    assert all(nothing['coco'][k] == 0 for k in ('bleu1', 'bleu4', 'rouge_l', 'cider'))


def test_pairs_with_an_empty_reference_are_skipped_and_counted():
    m = metrics.nlg_metrics(['the heart is normal', '', None, '...'], ['the heart is normal', 'x', 'y', 'z'])
    assert m['pairs'] == 1 and m['skipped_references'] == 3 and m['bleu4'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match='non-empty reference'):
        metrics.nlg_metrics(['', None], ['x', 'y'])


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
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    refs, hyps = phantom_pairs(300)
    refs += ['Small left pleural effusion, no pneumothorax.', 'Moderate cardiomegaly; mild edema.']
    hyps += ['Small right pleural effusion.', 'Cardiomegaly with mild edema and effusions!']
    r, h = [metrics.coco_text(x) for x in refs], [metrics.coco_text(x) for x in hyps]
    assert '' in h and len(set(r)) > 100
    gts, res = {i: [x] for i, x in enumerate(r)}, {i: [x] for i, x in enumerate(h)}
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = metrics.coco_bleu(r, h)
    for k in range(4):
        assert ours[f'bleu{k + 1}'] == pytest.approx(ref_bleu[k], abs=1e-12)
    assert metrics.coco_rouge_l(r, h) == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    cider, per_pair = Cider().compute_score(gts, res)
    assert metrics.coco_cider(r, h) == pytest.approx(cider, abs=1e-6) and 0.1 < cider < 10
    assert metrics.coco_cider(r[:40], h[:40]) == pytest.approx(Cider().compute_score(
        {i: gts[i] for i in range(40)}, {i: res[i] for i in range(40)})[0], abs=1e-6)  # idf from 40 documents
    assert metrics.coco_text('Heart, normal. | Impression: Clear!') == 'heart , normal . clear !'


# Pairs already in the convention's form (lowercase, punctuation split off) with irregular spacing:
# pycocoevalcap's ROUGE-L splits at single spaces, so each extra space is an empty token.
SPACED = [
    ('the heart  is normal .', 'the heart is normal .'),                       # a double space
    ('no effusion . ', 'no effusion .'),                                       # a trailing space
    (' no effusion .', 'no  effusion .  '),                                    # leading; double and trailing
    ('lungs are clear .  no effusion .', 'lungs are clear .  no effusion .'),  # the same on both sides
    ('mild  cardiomegaly .', ''),                                              # an empty hypothesis
    ('heart size is normal .', '   '),                                         # spaces only
]


def spaced(text, i):
    """text with every third space doubled, and a trailing space on every other i."""
    words = text.split(' ')
    return ''.join(w + (' ' if k % 3 else '  ') for k, w in enumerate(words[:-1])) + words[-1] + ' ' * (i % 2)


def test_paper_style_rouge_l_counts_repeated_spaces_as_pycocoevalcap_does():
    """Worked by hand: F = (1 + 1.2^2) P R / (R + 1.2^2 P) over tokens split at single spaces."""
    f = lambda p, r: 2.44 * p * r / (r + 1.44 * p)
    assert all(metrics.coco_text(x) == x for pair in SPACED for x in pair)  # the convention keeps the spacing
    (r0, h0), (r1, h1), (r2, h2), (r3, h3), (r4, h4), _ = SPACED
    assert metrics.coco_rouge_l([r0], [h0]) == pytest.approx(f(1, 5 / 6))  # 6 tokens: the, heart, '', is, normal, .
    assert metrics.coco_rouge_l([r1], [h1]) == pytest.approx(f(1, 3 / 4))  # no, effusion, ., ''
    assert metrics.coco_rouge_l([r2], [h2]) == pytest.approx(f(3 / 6, 3 / 4))  # LCS no effusion . of 6 and 4
    assert metrics.coco_rouge_l([r3], [h3]) == 1
    assert metrics.coco_rouge_l([r4], [h4]) == pytest.approx(f(1, 1 / 4))  # '' matches the reference's ''
    m = metrics.nlg_metrics([r for r, _ in SPACED], [h for _, h in SPACED])
    # the same in eval.py's row, but an empty hypothesis scores 0 there, as on every metric
    assert m['coco']['rouge_l'] == pytest.approx((f(1, 5 / 6) + f(1, 3 / 4) + f(3 / 6, 3 / 4) + 1) / 6)
    assert m['empty_hypotheses'] == 2


def test_paper_style_row_equals_pycocoevalcap_on_raw_spacing():
    pytest.importorskip('pycocoevalcap')
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    pairs = list(zip(*phantom_pairs(100)))
    refs = [r for r, _ in SPACED] + [spaced(metrics.coco_text(r), i) for i, (r, _) in enumerate(pairs)]
    hyps = [h for _, h in SPACED] + [spaced(metrics.coco_text(h), i + 1) if h else '' for i, (_, h) in enumerate(pairs)]
    assert sum('  ' in r for r in refs) > 90 and sum(r.endswith(' ') for r in refs) > 40
    gts, res = {i: [x] for i, x in enumerate(refs)}, {i: [x] for i, x in enumerate(hyps)}
    theirs = Rouge().compute_score(gts, res)[1]
    for r, h, want in zip(refs, hyps, theirs):  # every pair, the empty hypotheses too
        assert metrics.coco_rouge_l([r], [h]) == pytest.approx(want, abs=1e-12), (r, h)
    assert metrics.coco_rouge_l(refs, hyps) == pytest.approx(float(np.mean(theirs)), abs=1e-12)
    m = metrics.nlg_metrics(refs, hyps)['coco']  # eval.py's row on these raw strings
    said = [bool(h.strip()) for h in hyps]
    assert m['rouge_l'] == pytest.approx(float(np.mean(theirs * said)), abs=1e-12)  # an empty one: 0
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [m[f'bleu{k}'] for k in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert m['cider'] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-6)


def test_meteor15_unavailable_is_said_never_replaced(monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    with metrics.Meteor15() as m15:
        assert m15.score(['a b'], ['a b']) is None and 'java' in m15.reason
        m = metrics.nlg_metrics(['the heart is normal'], ['the heart is normal'], meteor15=m15)
    assert 'meteor' not in m['coco'] and 'java' in m['coco']['meteor_unavailable']
    report = 'the heart is normal in size'
    assert 'meteor_unavailable' in metrics.nlg_metrics([report], [report])['coco']  # not asked for: not run


@pytest.mark.slow  # starts Java twice (~10 s each)
@pytest.mark.skipif(not shutil.which('java'), reason='METEOR 1.5 needs Java')
def test_meteor15_equals_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor
    refs, hyps = phantom_pairs(60)
    r, h = [metrics.coco_text(x) for x in refs], [metrics.coco_text(x) for x in hyps]
    r, h = r + [spaced(x, 1) for x in r[:5]], h + [spaced(x, 0) for x in h[:5]]  # the spacing changes nothing
    want, _ = Meteor().compute_score({i: [x] for i, x in enumerate(r)}, {i: [x] for i, x in enumerate(h)})
    with metrics.Meteor15() as m15:
        assert m15.score(r, h) == pytest.approx(want, abs=1e-12)
        assert m15.score(r[:5], r[:5]) > 0.9  # reusable: one Java process for several systems
    assert m15.proc is None


def test_clinical_scores_on_crafted_labels():
    true = np.zeros((4, 14))
    pred = np.zeros((4, 14))
    E, C = CONDITIONS.index('Pleural Effusion'), CONDITIONS.index('Cardiomegaly')
    true[[0, 1, 2], E] = 1
    pred[[0, 1, 3], E] = 1   # tp 2, fp 1, fn 1
    true[0, C] = 1           # fn 1
    s = metrics.clinical_scores(true, pred)
    assert s['Pleural Effusion'] == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3, positives=3))
    assert s['Cardiomegaly']['f1'] == 0 and s['Cardiomegaly']['positives'] == 1
    assert s['micro5'] == pytest.approx(dict(precision=2 / 3, recall=0.5, f1=2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)))
    assert s['macro5']['f1'] == pytest.approx((2 / 3) / 5)
    assert s['macro14']['f1'] == pytest.approx((2 / 3) / 14)


def test_example_based_scores_by_hand():
    """Per report, then the mean over all of them; a report with no positive on either side counts as 0."""
    E, C, A = (CONDITIONS.index(c) for c in ('Pleural Effusion', 'Cardiomegaly', 'Atelectasis'))
    true, pred = np.zeros((5, 14)), np.zeros((5, 14))
    true[0, [E, C]], pred[0, E] = 1, 1       # P 1, R 1/2, F1 2/3
    true[1, E], pred[1, [E, C, A]] = 1, 1    # P 1/3, R 1, F1 1/2
    # report 2: nothing on either side: 0, 0, 0
    true[3, E], pred[3, C] = 1, 1            # all wrong: 0, 0, 0
    pred[4, A] = 1                           # P 0/1, R 0/0: 0, 0, 0
    s = metrics.example_scores(true, pred)
    assert s == pytest.approx(dict(precision=(1 + 1 / 3) / 5, recall=1.5 / 5, f1=(2 / 3 + 1 / 2) / 5, reports=5,
                                   no_positives=1))
    assert metrics.example_scores(true[[0, 1]], pred[[0, 1]])['f1'] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a perfect report scores 1, but the references without a positive (2, 4) still count as 0
    assert metrics.example_scores(true, true) == pytest.approx(dict(precision=3 / 5, recall=3 / 5, f1=3 / 5, reports=5,
                                                                    no_positives=2))


def test_clinical_metrics_run_the_labeler_on_both_sides():
    from chexpert import make_labeler
    refs = ['Small left pleural effusion. Heart size is normal.', 'Moderate cardiomegaly.']
    hyps = ['Small left pleural effusion. Heart size is normal.', 'The heart is normal in size.']
    m = metrics.clinical_metrics(refs, hyps, make_labeler())
    assert m['Pleural Effusion']['f1'] == 1 and m['Cardiomegaly']['recall'] == 0
    assert 'uncertain counted as positive' in m['uncertain_policy']
    # example-based: the first report all right (1), the second states no cardiomegaly, only No Finding (0)
    assert m['example'] == pytest.approx(dict(precision=0.5, recall=0.5, f1=0.5, reports=2, no_positives=0))


def test_clinical_metrics_empty_hypothesis_states_nothing_and_empty_reference_is_skipped():
    from chexpert import make_labeler
    normal = 'Heart size is normal. Lungs are clear. No effusion.'
    m = metrics.clinical_metrics([normal, normal, ''], [normal, '', normal], make_labeler())
    assert m['No Finding']['positives'] == 2                   # the empty reference is not a third
    assert m['No Finding']['recall'] == 0.5 and m['No Finding']['precision'] == 1  # the empty report said nothing


def test_auc_by_hand():
    t = np.array([[1], [1], [0], [0]])
    assert metrics.auc_per_condition(t, [[0.9], [0.8], [0.3], [0.1]]) == [1.0]
    assert metrics.auc_per_condition(t, [[0.1], [0.2], [0.8], [0.9]]) == [0.0]
    assert metrics.auc_per_condition(t, [[0.5], [0.5], [0.5], [0.5]]) == [0.5]      # ties share their rank
    assert metrics.auc_per_condition(t, [[0.9], [0.3], [0.3], [0.1]]) == [0.875]    # one tie between classes
    assert math.isnan(metrics.auc_per_condition(np.ones((3, 1)), [[0.1], [0.2], [0.3]])[0])


def test_grounding_share_and_pointing_on_a_synthetic_attention_map():
    g = 8
    attention = np.full((20, g * g), 1e-9)
    box = [0.5, 0.0, 1.0, 0.5]  # the image's right top quarter: 16 of the 64 patches
    for j in range(6):
        a = np.full((g, g), 0.25)
        if j == 0:
            a[:], a[:4, 4:] = 0, 1.0  # cardiac: all inside, peak inside
        elif j == 1:
            a[6, 1] = 3.0             # left lung: peak outside
        elif j == 2:
            a[1, 6] = 3.0             # right lung: peak inside
        attention[14 + j] = a.ravel()
    shares = metrics.region_shares(attention, {r: box for r in REGIONS})
    assert shares['cardiac'] == pytest.approx(dict(share=1.0, area=0.25, hit=True, touched=0.25))
    assert shares['left lung']['hit'] is False and shares['right lung']['hit'] is True
    assert shares['spine']['share'] == pytest.approx(0.25)
    other = {r: dict(v, hit=r == 'cardiac') for r, v in shares.items()}
    agg = metrics.grounding([dict(grounding=shares), dict(grounding=other)])
    assert agg['cardiac'] == pytest.approx(dict(share=1.0, chance=0.25, pointing=1.0, pointing_chance=0.25))
    assert agg['right lung']['pointing'] == 0.5 and agg['left lung']['pointing'] == 0
    assert agg['mean']['chance'] == pytest.approx(0.25)
    assert agg['mean']['pointing'] == pytest.approx(np.mean([agg[r]['pointing'] for r in REGIONS]))
    old = {r: dict(share=v['share'], area=v['area']) for r, v in shares.items()}  # written before pointing
    assert 'pointing' not in metrics.grounding([dict(grounding=old)])['mean']
    assert metrics.grounding([{}]) is None


def test_grounding_counts_patches_by_their_area_inside_a_narrow_box():
    """The phantom's spine box (x 0.465 to 0.535) holds no patch center of an 8 x 8 grid."""
    g = 8
    attention = np.full((20, g * g), 1e-9)
    a = np.zeros((g, g))
    a[:, 3] = 1.0  # all attention on the column from x 0.375 to 0.5
    attention[14 + REGIONS.index('spine')] = a.ravel()
    s = metrics.region_shares(attention, {'spine': [0.465, 0.0, 0.535, 1.0]})['spine']
    assert s['share'] == pytest.approx((0.5 - 0.465) * g)  # the part of that column inside the box
    assert s['area'] == pytest.approx(0.07) and s['touched'] == pytest.approx(2 / 8) and s['hit'] is True


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
    half = metrics.bertscore(['the heart is normal'] * 2, ['the heart is normal', ''], str(tmp_path / 'm'))
    assert half == pytest.approx(0.5, abs=1e-5)


def test_eval_prints_clinical_efficacy_with_every_definition_the_labeler_and_the_policy():
    import eval as ev
    effusion, clear = 'Findings: Small left pleural effusion. | Impression: Effusion.', 'Findings: Lungs are clear.'
    records = [dict(id=str(i), reference=effusion, hypothesis=effusion if i % 2 else clear) for i in range(6)]
    m = ev.score(records, uncertain='negative')
    c = m['systems']['model']['clinical']
    lines = ev.clinical_table(m)
    row = next(line for line in lines if line.startswith('model')).split()[1:]
    want = (c['micro14']['precision'], c['micro14']['recall'], c['micro14']['f1'], c['macro14']['f1'],
            c['micro5']['f1'], c['macro5']['f1'], c['example']['precision'], c['example']['recall'], c['example']['f1'])
    assert [float(x) for x in row] == [pytest.approx(v, abs=5e-5) for v in want]
    assert c['example']['f1'] == pytest.approx(0.5) and c['example']['reports'] == 6  # half the reports right
    header = '\n'.join(lines[:3])
    assert m['labeler'] in header and c['uncertain_policy'] in header and 'negative' in c['uncertain_policy']
    assert '\n'.join(lines) in ev.table(m)
