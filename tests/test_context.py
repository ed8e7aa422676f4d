"""Clinical context (the indication ahead of the prompt) and target sections."""
import json
import os
import sys

import pytest
import torch

import data
from chexquery import CheXQuery, tiny_config
from conftest import ROOT, train_in_process

sys.path.insert(0, ROOT)


@pytest.fixture(scope='module')
def tok(phantom_dir):
    return data.load_tokenizer(phantom_dir)


def test_the_indication_goes_ahead_of_the_prompt_and_out_of_the_loss(tok):
    report = 'Findings: The lungs are clear. | Impression: No acute cardiopulmonary abnormality.'
    plain_in, plain_labels, _ = data.encode_report(tok, 'Findings:', report, 64)
    ctx_in, ctx_labels, _ = data.encode_report(tok, 'Findings:', report, 64, indication='Trauma, rib pain')
    indication = tok('Indication: Trauma, rib pain.', add_special_tokens=False)['input_ids']
    n = len(indication)
    assert ctx_in[1:1 + n] == indication                     # right after the start token
    assert ctx_in[1 + n:] == plain_in[1:]                    # then exactly what the plain model reads
    assert ctx_labels[:n] == [-100] * n and ctx_labels[n:] == plain_labels  # the loss sees the same targets
    # an empty or blank indication is no context at all
    assert data.encode_report(tok, 'Findings:', report, 64, indication='  ') == (plain_in, plain_labels, None)


def test_a_long_indication_is_cut_and_the_report_keeps_its_room(tok):
    long = ' '.join(['chest pain'] * 200)
    ids = data.prompt_tokens(tok, 'Findings:', long)
    assert len(ids) == data.MAX_CONTEXT_TOKENS + len(data.prompt_tokens(tok, 'Findings:'))


@pytest.mark.parametrize('target, prompt, start, absent', [
    ('both', 'Findings:', 'Findings:', None),
    ('findings', 'Findings:', 'Findings:', 'Impression'),
    ('impression', 'Impression:', 'Impression:', 'Findings')])
def test_target_modes_build_their_prompt_and_text(target, prompt, start, absent):
    record = dict(report='Findings: The heart is normal. | Impression: Normal chest.',
                  findings='The heart is normal.', impression='Normal chest.')
    assert data.section_prompt(target) == prompt
    text = data.target_text(record, target)
    assert text.startswith(start) and (absent is None or absent not in text)
    assert data.target_text(dict(record, **{target: ''}), target) == ('' if target != 'both' else record['report'])
    with pytest.raises(ValueError, match='target'):
        data.section_prompt('conclusion')


def test_a_study_without_its_target_section_is_left_out_and_counted(phantom_dir, tok, tmp_path):
    d = tmp_path / 'd'
    d.mkdir()
    records = data.read_split(phantom_dir, 'val')[:6]
    for r in records[:2]:
        r['impression'] = ''
    with open(d / 'val.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    os.symlink(os.path.join(phantom_dir, 'images'), d / 'images')
    both = data.ReportDataset(str(d), 'val', tok, 64, target='both')
    impression = data.ReportDataset(str(d), 'val', tok, 64, target='impression')
    assert (len(both), both.left_out) == (6, 0) and (len(impression), impression.left_out) == (4, 2)
    first = impression[0]
    text = tok.decode([t for t in first['labels'].tolist() if t != -100], skip_special_tokens=True)
    assert 'Findings' not in text and first['decoder_input_ids'][1] == tok('Impression:', add_special_tokens=False)['input_ids'][0]


def has_indication(sample, tok):
    return tok.convert_tokens_to_ids('▁Indication') in sample['decoder_input_ids'].tolist()


def test_context_dropout_at_0_and_1_and_between(phantom_dir, tok):
    kw = dict(train=False, context=True)
    always = data.ReportDataset(phantom_dir, 'val', tok, 64, context_dropout=0.0, **kw)
    never = data.ReportDataset(phantom_dir, 'val', tok, 64, context_dropout=1.0, **kw)
    half = data.ReportDataset(phantom_dir, 'val', tok, 64, context_dropout=0.5, **kw)
    off = data.ReportDataset(phantom_dir, 'val', tok, 64, context=False)
    n = len(always)
    assert n >= 16
    assert all(has_indication(always[i], tok) for i in range(n))  # every phantom study has an indication
    assert not any(has_indication(never[i], tok) or has_indication(off[i], tok) for i in range(n))
    torch.manual_seed(0)
    share = sum(has_indication(half[i], tok) for i in range(n)) / n
    assert 0.25 < share < 0.75
    assert torch.equal(never[3]['labels'], off[3]['labels'])  # the targets never change
    with pytest.raises(ValueError, match='context_dropout'):
        data.ReportDataset(phantom_dir, 'val', tok, 64, context=True, context_dropout=1.5)


def test_left_padded_prompts_generate_what_each_prompt_alone_does(tok):
    torch.manual_seed(0)
    model = CheXQuery(tiny_config(vocab_size=len(tok), image_size=64)).eval()
    visual_tokens = model.encode(torch.randn(2, 3, 64, 64))['visual_tokens']
    ids, mask = data.prompt_batch(tok, 'Findings:', ['Pacemaker check.', ''])
    assert mask is not None and mask[1].sum() < mask[0].sum()
    both = model.generate(None, ids, visual_tokens=visual_tokens, prompt_mask=mask, num_beams=2, max_length=40)
    P = ids.shape[1]
    for i, indication in enumerate(['Pacemaker check.', '']):
        alone = torch.tensor(data.prompt_ids(tok, 'Findings:', indication))
        one = model.generate(None, alone, visual_tokens=visual_tokens[i:i + 1], num_beams=2,
                             max_length=40 - (P - len(alone)))
        n = min(one.shape[1] - len(alone), both.shape[1] - P)
        assert torch.equal(one[0, len(alone):len(alone) + n], both[i, P:P + n])
    reports = data.decode_reports(tok, both, P, 'Findings:')
    assert all(r.startswith('Findings:') and 'Indication' not in r and 'Pacemaker' not in r for r in reports)


def test_the_indication_does_not_block_the_report_from_repeating_its_words(tok):
    """no_repeat_ngram_size counts the report alone: after an indication holding the trigram
    'pleural effusion .', the report may still write it."""
    from chexquery import ReportNGramBlock
    words = tok('Follow-up of known pleural effusion. Findings: Small pleural effusion', add_special_tokens=False)['input_ids']
    start = len(tok('Follow-up of known pleural effusion. Findings:', add_special_tokens=False)['input_ids'])
    period = tok.convert_tokens_to_ids('.')
    scores = torch.zeros(1, len(tok))
    ids = torch.tensor([words])
    assert ReportNGramBlock(3, start)(ids, scores.clone())[0, period] == 0                  # the report's own n-grams only
    assert ReportNGramBlock(3, 0)(ids, scores.clone())[0, period] == float('-inf')           # what it would block


def test_context_on_and_off_from_one_checkpoint(phantom_dir, tmp_path):
    import eval as evaluate
    out = str(tmp_path / 'ctx')
    code, printed = train_in_process(phantom_dir, out, context=True, context_dropout=0.5, target='findings',
                                     max_iters=4)
    assert code == 0, printed[-2000:]
    settings = dict(num_beams=1, max_length=40, min_length=1, device='cpu', cpu_kernels=False, max_samples=6)
    on, cfg = evaluate.generate_predictions(out, 'val', context=None, **settings)   # as trained: on
    off, _ = evaluate.generate_predictions(out, 'val', context=False, **settings)
    assert cfg['context'] and all(r['context'] for r in on) and not any(r['context'] for r in off)
    by_id = {r['id']: r for r in data.read_split(phantom_dir, 'val')}
    for r in on:
        assert r['indication'] == by_id[r['id']]['indication']
        assert r['indication'] not in r['reference'] and 'Indication' not in r['hypothesis']
        assert r['reference'] == data.target_text(by_id[r['id']], 'findings') and 'Impression' not in r['reference']
    assert [r['probabilities'] for r in on] == [r['probabilities'] for r in off]  # the image side ignores context


def test_context_on_a_checkpoint_trained_without_it_is_an_error(tiny_run):
    import eval as evaluate
    with pytest.raises(ValueError, match='without clinical context'):
        evaluate.generate_predictions(tiny_run, 'val', context=True, max_samples=2, num_beams=1, max_length=20,
                                      device='cpu', cpu_kernels=False)
    assert data.check_context(None, {'context': False}, 'x') is False
    assert data.check_context(None, {'context': True}, 'x') is True
    assert data.check_context(False, {'context': True}, 'x') is False


def test_sample_refuses_an_indication_for_a_checkpoint_trained_without_context(random_run, phantom_dir, monkeypatch):
    import sample
    first = data.read_split(phantom_dir, 'test')[0]
    for k, v in dict(out_dir=random_run, images=os.path.join(phantom_dir, first['image']), indication='Cough.',
                     num_beams=1, max_length=8, min_length=1).items():
        monkeypatch.setattr(sample, k, v)
    with pytest.raises(ValueError, match='without clinical context'):
        sample.main()
    monkeypatch.setattr(sample, 'context', False)  # said so: the indication is not used, and it runs
    sample.main()


def test_one_section_of_both_reports_is_scored_alone():
    import eval as evaluate
    records = [dict(id='a', reference='Findings: The heart is enlarged. | Impression: Cardiomegaly.',
                    hypothesis='Findings: The lungs are clear. | Impression: Normal chest.'),
               dict(id='b', reference='Impression: Normal chest.', hypothesis='Findings: Clear. | Impression: Normal.'),
               dict(id='c', reference='Findings: Clear lungs. | Impression: Normal.', hypothesis='')]
    kept = evaluate.cut_to_section(records, 'findings')
    assert [r['id'] for r in kept] == ['a', 'c']  # b has no findings in its reference
    assert kept[0]['reference'] == 'Findings: The heart is enlarged.' and kept[0]['hypothesis'] == 'Findings: The lungs are clear.'
    assert kept[1]['hypothesis'] == ''  # an empty report stays in, and scores 0
    assert evaluate.cut_to_section(records, 'impression')[1]['hypothesis'] == 'Impression: Normal.'
    with pytest.raises(ValueError, match='target'):
        evaluate.cut_to_section(records, 'history')
