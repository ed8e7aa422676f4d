"""finding_weight: the loss weighs the tokens of the report's finding sentences (DiseaseT5's x5)."""
import pytest
import torch
import torch.nn.functional as F

import data
from chexpert import CONDITIONS
from conftest import batch, run_script, tiny, tiny_train_args

REPORT = ('Findings: Mild cardiomegaly. The mediastinal contours are normal. Possible small left pleural effusion. '
          'No pneumothorax. | Impression: Mild cardiomegaly.')


@pytest.fixture(scope='module')
def tok(phantom_dir):
    return data.load_tokenizer(phantom_dir)


def weighted_words(tok, ids, weights, weight):
    return tok.decode([i for i, w in zip(ids, weights) if w == weight])


def test_finding_sentences_get_the_weight_and_the_rest_one(tok):
    text = REPORT[len('Findings:'):].strip()
    weights = data.finding_weights(tok, text, 5.0)
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert len(weights) == len(ids) and set(weights) == {1.0, 5.0}
    # present and uncertain findings, in both sections; not the normal statements nor the section header
    assert weighted_words(tok, ids, weights, 5.0) == ('Mild cardiomegaly. Possible small left pleural effusion. '
                                                      'Mild cardiomegaly.')
    assert weighted_words(tok, ids, weights, 1.0) == ('The mediastinal contours are normal. No pneumothorax. | '
                                                      'Impression:')
    # a normal report has no finding sentence
    assert set(data.finding_weights(tok, 'The lungs are clear. No pneumothorax.', 5.0)) == {1.0}


def test_weights_follow_the_labels_prompt_zero_eos_one(tok):
    ids, labels, weights = data.encode_report(tok, 'Findings:', REPORT, 256, indication='Chest pain',
                                              diagnosis=[c == 'Cardiomegaly' for c in CONDITIONS], finding_weight=3.0)
    assert len(weights) == len(labels)
    assert all((w == 0) == (y == -100) for w, y in zip(weights, labels))   # the prompt counts for nothing
    assert weights[-1] == 1.0 and labels[-1] == tok.eos_token_id
    target = [i for i, y in zip(labels, labels) if y != -100][:-1]
    assert weights[-len(target) - 1:-1] == data.finding_weights(tok, REPORT[len('Findings:'):].strip(), 3.0)
    # cut by max_len: the weights are cut with the targets
    short = data.encode_report(tok, 'Findings:', REPORT, 8, finding_weight=3.0)
    assert len(short[2]) == len(short[1]) == 8 and short[2][-1] == 1.0


def test_the_loss_is_the_weighted_mean_of_the_token_losses():
    torch.manual_seed(0)
    model = tiny().eval()
    images, dec, labels, cond = batch(B=2, T=10)
    labels[0, :3] = -100
    weights = (labels != -100).float()
    weights[1, 4:7] = 5.0
    out = model(images, dec, labels, cond, label_smoothing=0.1, token_weights=weights)
    ce = F.cross_entropy(out['logits'].flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1,
                         reduction='none')
    expected = (ce * weights.flatten()).sum() / weights.sum()
    assert torch.allclose(out['loss_gen'], expected)
    plain = model(images, dec, labels, cond, label_smoothing=0.1)['loss_gen']
    assert not torch.allclose(out['loss_gen'], plain)                      # the weights do something
    ones = model(images, dec, labels, cond, label_smoothing=0.1, token_weights=(labels != -100).float())['loss_gen']
    assert torch.allclose(ones, plain)                                     # weight 1 everywhere: the plain mean


def test_the_dataset_and_the_heads_slot_carry_the_same_target_weights(phantom_dir, tok):
    ds = data.ReportDataset(phantom_dir, 'val', tok, 64, diagnosis=True, own_diagnosis=1.0, finding_weight=5.0)
    plain = data.ReportDataset(phantom_dir, 'val', tok, 64, diagnosis=True)
    assert plain[0]['weights'] is None and data.collate([plain[0], plain[1]])['weights'] is None
    b = data.collate([ds[i] for i in range(6)])
    assert b['weights'].shape == b['labels'].shape
    assert ((b['weights'] == 0) == (b['labels'] == -100)).all()
    assert (b['weights'] == 5.0).any()                                     # the phantom's findings
    logits = torch.full((6, len(CONDITIONS)), 5.0)                         # the head sees everything
    ids, labels, weights = data.own_diagnosis_tokens(tok, ds.prompt, b, 256, None, logits, finding_weight=5.0)
    for row in range(6):                                                   # a longer slot, the same targets
        assert torch.equal(weights[row][labels[row] != -100], b['weights'][row][b['labels'][row] != -100])


def test_a_finding_weight_below_one_is_refused_before_anything_is_written(phantom_dir, tmp_path):
    r = run_script(*tiny_train_args(phantom_dir, str(tmp_path / 'out'), finding_weight=0.5), check=False)
    assert r.returncode != 0 and 'finding_weight' in r.stderr
    assert not (tmp_path / 'out').exists()
