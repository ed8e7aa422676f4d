"""The diagnosis prompt (the 14 decisions in words ahead of the report), per-condition
thresholds and the agreement between what a report states and what the head decided."""
import os

import numpy as np
import pytest
import torch

import data
from chexpert import CONDITIONS, diagnosis_text, label_report
from metrics import agreement, best_thresholds, decide

REPORT = 'Findings: The heart is enlarged. No pneumothorax. | Impression: Cardiomegaly.'


@pytest.fixture(scope='module')
def tok(phantom_dir):
    return data.load_tokenizer(phantom_dir)


def decisions(*names):
    return [c in names for c in CONDITIONS]


def test_the_diagnosis_names_what_was_decided_and_nothing_else():
    assert diagnosis_text(decisions('Cardiomegaly', 'Pleural Effusion')) == 'Seen: cardiomegaly, pleural effusion.'
    assert diagnosis_text(decisions()) == 'Seen: none.'
    with pytest.raises(ValueError, match='14 decisions'):
        diagnosis_text([True, False, True])


def test_the_phantom_tokenizer_reads_every_word_of_the_diagnosis(tok):
    text = diagnosis_text([True] * len(CONDITIONS))
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_the_diagnosis_goes_between_indication_and_prompt_and_out_of_the_loss(tok):
    plain_in, plain_labels, _ = data.encode_report(tok, 'Findings:', REPORT, 96, indication='Chest pain')
    diag_in, diag_labels, _ = data.encode_report(tok, 'Findings:', REPORT, 96, indication='Chest pain',
                                              diagnosis=decisions('Cardiomegaly'))
    indication = tok('Indication: Chest pain.', add_special_tokens=False)['input_ids']
    slot = tok('Seen: cardiomegaly.', add_special_tokens=False)['input_ids']
    n, m = len(indication), len(slot)
    assert diag_in[1:1 + n] == indication and diag_in[1 + n:1 + n + m] == slot
    assert diag_in[1 + n + m:] == plain_in[1 + n:]                      # then what the model reads without it
    assert diag_labels[:n + m] == [-100] * (n + m)                      # given, never learned
    assert diag_labels[n + m:] == plain_labels[n:]                      # the same targets
    # another decision changes the prompt's words only
    other_in, other_labels, _ = data.encode_report(tok, 'Findings:', REPORT, 96, diagnosis=decisions('Edema'))
    assert 'edema' in tok.decode(other_in) and 'cardiomegaly' not in tok.decode(other_in[:4])


def test_the_dataset_fills_the_slot_with_reference_labels_and_marks_own_samples(phantom_dir, tok):
    torch.manual_seed(0)
    plain = data.ReportDataset(phantom_dir, 'val', tok, 64)
    ref = data.ReportDataset(phantom_dir, 'val', tok, 64, diagnosis=True)
    own = data.ReportDataset(phantom_dir, 'val', tok, 64, diagnosis=True, own_diagnosis=0.5)
    for i in range(8):
        truth = [c for c, y in zip(CONDITIONS, ref.cond_labels[i]) if y > 0.5]
        prompt = tok.decode(ref[i]['decoder_input_ids'][:ref[i]['labels'].tolist().count(-100) + 1],
                            skip_special_tokens=True)
        assert prompt.split('Findings:')[0].strip().rstrip('.').removeprefix('Seen: ').split(', ') == (
            [c.lower() for c in truth] or ['none'])
        assert ref[i]['own'] is False
        assert torch.equal(ref[i]['labels'][ref[i]['labels'] >= 0], plain[i]['labels'][plain[i]['labels'] >= 0])
    marks = [own[i]['own'] for i in range(len(own))]
    assert 0.3 < sum(marks) / len(marks) < 0.7


def test_own_samples_get_the_heads_decisions_and_the_others_the_reference(phantom_dir, tok):
    ds = data.ReportDataset(phantom_dir, 'val', tok, 64, diagnosis=True, own_diagnosis=0.5)
    batch = data.collate([ds[i] for i in range(6)])
    batch['own'] = [True, False, True, False, False, True]
    logits = torch.full((6, len(CONDITIONS)), -5.0)
    logits[:, CONDITIONS.index('Fracture')] = 0.1                       # the head sees a fracture everywhere ...
    thresholds = [0.5] * len(CONDITIONS)
    thresholds[CONDITIONS.index('Fracture')] = 0.51                     # ... at its threshold 0.51: p 0.525
    ids, labels, _ = data.own_diagnosis_tokens(tok, ds.prompt, batch, 256, thresholds, logits)
    for row, own in enumerate(batch['own']):
        first = int((labels[row] != -100).nonzero()[0])                # the report's first target
        prompt = tok.decode(ids[row, :first + 1], skip_special_tokens=True)
        fracture = batch['cond_labels'][row, CONDITIONS.index('Fracture')] > 0.5
        assert ('fracture' in prompt) == bool(own or fracture)
        if not own:  # the reference's rows are exactly what the dataset made
            n = int((batch['labels'][row] != -100).sum()) + first
            assert torch.equal(ids[row, :n], batch['decoder_input_ids'][row, :n])
        # the report's targets are never changed by the slot
        assert torch.equal(labels[row][labels[row] != -100], batch['labels'][row][batch['labels'][row] != -100])


def test_thresholds_maximize_each_conditions_f1():
    targets = np.zeros((6, len(CONDITIONS)))
    probs = np.full((6, len(CONDITIONS)), 0.4)
    targets[:, 2] = [1, 1, 0, 0, 1, 0]
    probs[:, 2] = [0.9, 0.3, 0.25, 0.1, 0.28, 0.05]                       # 0.5 would find one of three
    targets[:, 5] = [1, 0, 0, 0, 0, 0]
    probs[:, 5] = [0.45, 0.2, 0.1, 0.1, 0.1, 0.1]
    chosen = best_thresholds(targets, probs)
    assert chosen[2] == pytest.approx((0.28 + 0.25) / 2)                # all three positives, no false one
    assert chosen[5] == pytest.approx((0.45 + 0.2) / 2)
    assert chosen[0] is None                                            # no positive: F1 cannot choose
    made = decide(probs, chosen)
    assert made[:, 2].tolist() == [True, True, False, False, True, False]
    assert made[:, 0].tolist() == [False] * 6                           # 0.5 where none was chosen


def test_agreement_counts_what_the_reports_state_against_the_heads_decisions():
    reports = ['The heart is enlarged. No pleural effusion.',             # says cardiomegaly
               'Small left pleural effusion.',                            # says effusion, not cardiomegaly
               'The lungs are clear. No pneumothorax or pleural effusion.']
    stated = np.array([[label == 1 or label == -1 for label in label_report(r)] for r in reports])
    decided = np.zeros_like(stated)
    decided[0, CONDITIONS.index('Cardiomegaly')] = True                  # the head agrees on report 1
    decided[1, CONDITIONS.index('Cardiomegaly')] = True                  # and sees a heart report 2 does not state
    decided[1, CONDITIONS.index('Pleural Effusion')] = True
    decided[2, CONDITIONS.index('No Finding')] = True
    result = agreement(stated, decided)
    assert result['Cardiomegaly'] == pytest.approx(2 / 3)
    assert result['Pleural Effusion'] == 1.0
    assert result['overall'] == pytest.approx(1 - 1 / (3 * len(CONDITIONS)))


def test_eval_scores_faithfulness_from_the_decisions_in_the_predictions():
    import eval as ev
    effusion, clear = 'Findings: Small left pleural effusion. | Impression: Effusion.', 'Findings: The lungs are clear.'
    effusion_only = [c == 'Pleural Effusion' for c in CONDITIONS]
    records = [dict(id=str(i), reference=effusion, hypothesis=effusion if i < 4 else clear,
                    decisions=[int(d) for d in effusion_only], thresholds_chosen=True) for i in range(6)]
    m = ev.score(records)
    f = m['faithfulness']
    assert f['Pleural Effusion']['head_f1'] == 1.0                      # the head saw all six
    assert f['Pleural Effusion']['report_f1'] == pytest.approx(2 * 4 / (2 * 4 + 2))
    assert f['Pleural Effusion']['agreement'] == pytest.approx(4 / 6)   # two reports leave it out
    # the clear reports state No Finding, which the head did not decide, and miss the effusion it did:
    # 2 of 14 conditions disagree in 2 of 6 reports
    assert [c for c, y in zip(CONDITIONS, label_report(clear)) if y == 1] == ['No Finding']
    assert f['agreement'] == pytest.approx(1 - 4 / (6 * len(CONDITIONS)))
    text = ev.table(m)
    assert 'faithfulness' in text and f"{f['agreement']:.4f}" in text


# --- a tiny run trained with the diagnosis prompt ---------------------------------------------
@pytest.fixture(scope='module')
def diag_run(phantom_dir, tmp_path_factory):
    from conftest import train_in_process
    out = str(tmp_path_factory.mktemp('runs') / 'diag')
    code, printed = train_in_process(phantom_dir, out, max_iters=8, diagnosis_prompt=True, own_diagnosis=0.5,
                                     finding_weight=5.0, sample_reports=1)  # the weights through both slots
    assert code == 0, printed[-3000:]
    return out


def test_thresholds_are_chosen_on_val_and_kept_in_the_checkpoint(diag_run, phantom_dir):
    from checkpoint import load_checkpoint
    model, meta = load_checkpoint(diag_run)
    val = data.ReportDataset(phantom_dir, 'val', data.run_tokenizer(meta['config']), 64)
    with torch.no_grad():
        probs = model.encode(torch.stack([val[i]['image'] for i in range(len(val))]))['cond_logits'].sigmoid()
    expected = best_thresholds(val.cond_labels.numpy(), probs.numpy())
    assert meta['thresholds'] == pytest.approx(expected, abs=1e-5)
    assert any(t is not None and t != 0.5 for t in meta['thresholds'])


def test_a_checkpoint_refuses_the_other_way_of_prompting(diag_run, tiny_run, phantom_dir, tmp_path):
    import eval as ev
    from conftest import train_in_process
    for run, setting in ((diag_run, False), (tiny_run, True)):
        with pytest.raises(ValueError, match='diagnosis_prompt'):
            ev.generate_predictions(run, 'val', diagnosis=setting, max_samples=2, num_beams=1, max_length=20)
        with pytest.raises(ValueError, match=os.path.join(run, 'ckpt.safetensors')):  # a new phase from it
            train_in_process(phantom_dir, str(tmp_path / f'next-{setting}'), max_iters=1, diagnosis_prompt=setting,
                             init_from=os.path.join(run, 'ckpt.safetensors'))
    with pytest.raises(ValueError, match='trained without diagnosis_prompt'):  # no slot: no oracle either
        ev.generate_predictions(tiny_run, 'val', oracle=True, max_samples=2, num_beams=1, max_length=20)


def test_the_slot_holds_the_heads_decisions_and_the_reference_only_for_the_oracle(diag_run, monkeypatch):
    import eval as ev
    seen = []
    real = data.prompt_batch
    monkeypatch.setattr(data, 'prompt_batch', lambda tok, prompt, indications, diagnoses=None:
                        seen.append(diagnoses) or real(tok, prompt, indications, diagnoses))
    head, _ = ev.generate_predictions(diag_run, 'val', max_samples=12, batch_size=6, num_beams=1, max_length=90)
    oracle, _ = ev.generate_predictions(diag_run, 'val', oracle=True, max_samples=12, batch_size=6, num_beams=1,
                                        max_length=90)
    from chexpert import binarize
    slots = [d for batch in seen for d in batch]
    assert slots[:12] == [[bool(x) for x in r['decisions']] for r in head]              # the head's decisions
    assert slots[12:] == [[y > 0.5 for y in binarize(r['labels'])] for r in oracle]      # the reference's labels
    assert slots[:12] != slots[12:]
    assert {r['diagnosis'] for r in head} == {'aux head'} and {r['diagnosis'] for r in oracle} == {
        'reference labels (oracle)'}


def test_with_context_the_indication_then_the_diagnosis_then_the_prompt(phantom_dir, tok):
    ds = data.ReportDataset(phantom_dir, 'val', tok, 64, context=True, diagnosis=True, own_diagnosis=1.0)
    i = next(i for i, r in enumerate(ds.records) if (r.get('indication') or '').strip())
    sample = ds[i]
    first = int((sample['labels'] != -100).nonzero()[0])
    prompt = tok.decode(sample['decoder_input_ids'][:first + 1], skip_special_tokens=True)
    assert prompt.startswith('Indication: ') and prompt.index('Indication:') < prompt.index('Seen:') < prompt.index(
        'Findings:')
    assert sample['own'] is True and sample['indication'] == ds.indications[i]   # what the head's rows are rebuilt with
    batch = data.collate([sample])
    ids, labels, _ = data.own_diagnosis_tokens(tok, ds.prompt, batch, 256, None, torch.zeros(1, len(CONDITIONS)))
    assert 'Indication:' in tok.decode(ids[0]) and torch.equal(labels[0][labels[0] != -100],
                                                                sample['labels'][sample['labels'] != -100])
