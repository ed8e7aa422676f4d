"""pretrain.py: the tiny backbones it writes load back as the real loading code loads them,
and CheXQuery built from them freezes and trains exactly what each phase says."""
import os

import pytest
import torch

import data
import pretrain
from chexpert import CONDITIONS
from conftest import run_script

S, WIDTH = 64, 32  # the test set's image size; a tiny width for every backbone


@pytest.fixture(scope='module')
def backbones(phantom_dir, tmp_path_factory):
    """{'siglip'|'t5'|'bert': (directory, trained model)}: one epoch of each on the 96 train samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as pretrain.py trains them; tiny matrices
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp('pretrained')
    train_reports = [r['report'] for r in data.read_split(phantom_dir, 'train')]
    val_reports = [r['report'] for r in data.read_split(phantom_dir, 'val')]
    run = dict(epochs=1, batch_size=16, lr=1e-3, seed=0)
    tok = data.load_tokenizer(phantom_dir)
    splits = [pretrain.image_text_split(phantom_dir, s, tok, text_len=40) for s in ('train', 'val')]
    siglip = pretrain.new_siglip(pretrain.siglip_config(len(tok), 40, WIDTH, 16, layers=1, heads=2, image_size=S),
                                 sincos=True)
    pretrain.pretrain_siglip(siglip, *splits, tok, str(out / 'siglip'), augment=True, probe_steps=20, **run)
    t5_tok = pretrain.t5_tokenizer(phantom_dir)
    t5 = pretrain.t5_model(len(t5_tok), WIDTH, layers=1, heads=2)
    pretrain.pretrain_t5(t5, t5_tok(train_reports)['input_ids'], t5_tok(val_reports)['input_ids'], t5_tok,
                         str(out / 't5'), **run)
    bert_tok = pretrain.bert_tokenizer(train_reports)
    bert = pretrain.bert_model(len(bert_tok), WIDTH, layers=1, heads=2)
    pretrain.pretrain_bert(bert, bert_tok, train_reports, val_reports, str(out / 'bert'), **run)
    torch.set_num_threads(threads)
    return {name: (str(out / name), model) for name, model in (('siglip', siglip), ('t5', t5), ('bert', bert))}


def test_sincos_positions_start_a_new_tower_knowing_each_patchs_neighbours():
    grid = 8
    positions = pretrain.sincos_2d(WIDTH, grid)                          # (64, WIDTH), row-major patches
    similarity = positions @ positions.T
    patch = 3 * grid + 3                                                 # row 3, column 3
    others = similarity[patch].clone()
    others[patch] = -float('inf')
    assert set(others.topk(4).indices.tolist()) == {patch - 1, patch + 1, patch - grid, patch + grid}
    assert similarity[patch, patch + 1] > similarity[patch, patch + 2] > similarity[patch, patch + 4]
    config = pretrain.siglip_config(100, 40, WIDTH, 16, layers=1, heads=2, image_size=grid * 16)
    torch.manual_seed(0)
    tower = pretrain.new_siglip(config, sincos=True).vision_model.embeddings.position_embedding.weight
    assert torch.equal(tower, positions) and tower.requires_grad         # a start, still learned
    torch.manual_seed(0)
    assert not torch.equal(pretrain.new_siglip(config).vision_model.embeddings.position_embedding.weight, positions)


def test_directories_load_back_with_equal_outputs(backbones):
    from transformers import BertModel, SiglipModel, T5ForConditionalGeneration
    g = torch.Generator().manual_seed(0)
    path, model = backbones['siglip']
    images, texts = torch.randn(2, 3, S, S, generator=g), torch.randint(3, 100, (2, 40), generator=g)
    loaded = SiglipModel.from_pretrained(path).eval()
    a, b = (m(input_ids=texts, pixel_values=images) for m in (model.eval(), loaded))
    assert torch.equal(a.logits_per_image, b.logits_per_image)
    assert loaded.config.vision_config.hidden_size == WIDTH and loaded.config.vision_config.image_size == S
    path, model = backbones['t5']
    ids = torch.randint(3, 100, (2, 9), generator=g)
    loaded = T5ForConditionalGeneration.from_pretrained(path).eval()
    assert torch.equal(model.eval()(input_ids=ids, labels=ids).logits, loaded(input_ids=ids, labels=ids).logits)
    assert not loaded.config.scale_decoder_outputs  # Flan-T5's untied head: no d_model ** -0.5 on the output
    path, model = backbones['bert']
    loaded = BertModel.from_pretrained(path).eval()
    assert torch.equal(model.eval().bert(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


def test_tokenizers_load_with_autotokenizer(backbones, phantom_dir):
    from transformers import AutoTokenizer
    phantom_tok = data.load_tokenizer(phantom_dir)
    report = data.read_split(phantom_dir, 'val')[0]['report']
    siglip_tok = AutoTokenizer.from_pretrained(backbones['siglip'][0])
    assert siglip_tok(report)['input_ids'] == phantom_tok(report)['input_ids']
    # T5: the phantom ids, then the sentinels, and the model's vocabulary is exactly that
    t5_tok = data.load_tokenizer(backbones['t5'][0])
    assert t5_tok(report)['input_ids'] == phantom_tok(report)['input_ids']
    assert t5_tok.convert_tokens_to_ids('<extra_id_0>') == len(phantom_tok)
    assert len(t5_tok) == len(phantom_tok) + pretrain.N_SENTINELS == backbones['t5'][1].config.vocab_size
    assert t5_tok.decode([t5_tok.convert_tokens_to_ids('<extra_id_3>'), 1], skip_special_tokens=True) == ''
    # BERT: every condition name reads as [CLS] pieces [SEP], none of them unknown
    bert_tok = AutoTokenizer.from_pretrained(backbones['bert'][0])
    for ids in bert_tok(list(CONDITIONS))['input_ids']:
        assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
        assert bert_tok.unk_token_id not in ids


def test_bert_tokenizer_is_the_same_every_time(phantom_dir):
    reports = [r['report'] for r in data.read_split(phantom_dir, 'train')]
    assert pretrain.bert_tokenizer(reports).get_vocab() == pretrain.bert_tokenizer(reports[::-1]).get_vocab()


def test_existing_directories_are_skipped(phantom_dir, tmp_path):
    for name in ('siglip', 't5', 'bert'):
        (tmp_path / name).mkdir()
    r = run_script('pretrain.py', f'--data_dir={phantom_dir}', f'--out_dir={tmp_path}', '--image_size=64')
    assert all(str(tmp_path / name) in r.stdout for name in ('siglip', 't5', 'bert'))  # each named
    assert all(not any((tmp_path / name).iterdir()) for name in ('siglip', 't5', 'bert'))


def test_span_corruption_hides_spans_that_targets_restore():
    g = torch.Generator().manual_seed(0)
    ids, sentinels, eos = list(range(10, 110)), list(range(500, 600)), 1
    inputs, targets = pretrain.span_corrupt(ids, sentinels, eos, g)
    assert inputs[-1] == targets[-1] == eos
    kept = [t for t in inputs[:-1] if t not in sentinels]
    assert len(kept) == 85 and sum(t in sentinels for t in inputs) == 5  # 15 tokens in 5 spans of mean length 3
    spans = {}
    for t in targets[:-1]:  # sentinel, its span, the next sentinel, ..., a final empty sentinel
        if t in sentinels:
            span = spans.setdefault(t, [])
        else:
            span.append(t)
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == ids
    assert list(spans) == sentinels[:6] and spans[sentinels[5]] == []


def test_bert_batches_mask_words_and_swap_impressions(backbones, phantom_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(backbones['bert'][0])
    sections = [r['report'].partition(' | ')[::2] for r in data.read_split(phantom_dir, 'train')]
    batch = pretrain.bert_batch(sections, range(64), tok, torch.Generator().manual_seed(0))
    targets = batch['labels'] != -100
    special_targets = torch.isin(batch['labels'], torch.tensor([tok.pad_token_id, tok.cls_token_id, tok.sep_token_id]))
    assert not special_targets.any() and (batch['input_ids'][:, 0] == tok.cls_token_id).all()
    assert 0.1 < targets.sum() / batch['attention_mask'].sum() < 0.2
    assert (batch['input_ids'][targets] == tok.mask_token_id).float().mean() > 0.6
    assert 0.3 < batch['next_sentence_label'].float().mean() < 0.7
    second = batch['token_type_ids'] == 1  # the impression: its own report's where the label is 0
    kept = batch['next_sentence_label'] == 0
    own = tok([s[1] for s in sections[:64]], add_special_tokens=False)['input_ids']
    for i in kept.nonzero()[:, 0].tolist():
        ids, wanted = batch['labels'][i][second[i]], own[i] + [tok.sep_token_id]
        unmasked = batch['input_ids'][i][second[i]]
        assert [w if t == -100 else t for w, t in zip(unmasked.tolist(), ids.tolist())] == wanted


@pytest.fixture
def chexquery(backbones, tmp_path, monkeypatch):
    from chexquery import CheXQuery, CheXQueryConfig
    monkeypatch.setenv('CHEXQUERY_CACHE', str(tmp_path))  # the condition-query cache, not ~/.cache
    torch.manual_seed(0)
    return CheXQuery(CheXQueryConfig(vision_model=backbones['siglip'][0], text_model=backbones['t5'][0],
                                     query_init=backbones['bert'][0], image_size=S))


def test_chexquery_from_the_directories(chexquery, backbones):
    t5 = chexquery.t5
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    torch.testing.assert_close(t5.lm_head.weight, backbones['t5'][1].lm_head.weight)
    assert chexquery.proj.__class__.__name__ == 'Identity'  # the backbones share one width
    # 14 different [CLS] vectors: read by the phantom tokenizer, 7 names are one '<unk>' and get one vector
    queries = chexquery.condition_queries.detach()
    distances = torch.cdist(queries, queries)[~torch.eye(len(CONDITIONS), dtype=torch.bool)]
    assert distances.min() > 1e-4 * queries.norm(dim=1).mean()
    chexquery.set_phase(2)
    trains = {n for n, p in chexquery.named_parameters() if p.requires_grad}
    backbone = {n for n in trains if n.startswith(('vision.', 't5.'))}
    assert backbone and all('lora_' in n for n in backbone)
    assert {n for n in trains - backbone} == {n for n, _ in chexquery.named_parameters()
                                             if not n.startswith(('vision.', 't5.'))}


def test_phase_1_step_leaves_the_backbones_bit_identical(chexquery, phantom_dir, backbones):
    tok = data.load_tokenizer(backbones['t5'][0])
    records = data.read_split(phantom_dir, 'train')[:4]
    transform = data.train_transform(S)
    images = torch.stack([transform(data.load_image(os.path.join(phantom_dir, r['image']))) for r in records])
    pairs = [data.encode_report(tok, 'Findings:', r['report'], 64) for r in records]
    decoder_input_ids, _ = pretrain.pad([p[0] for p in pairs], 0)
    labels, _ = pretrain.pad([p[1] for p in pairs], -100)
    cond_labels = torch.tensor([[float(v == 1) for v in r['labels']] for r in records])
    chexquery.set_phase(1).train()
    before = {k: v.clone() for k, v in chexquery.state_dict().items() if k.startswith(('vision.', 't5.'))}
    queries = chexquery.condition_queries.detach().clone()
    params = [p for p in chexquery.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    out = chexquery(images, decoder_input_ids, labels, cond_labels)
    (out['loss_gen'] + out['loss_aux']).backward()
    optimizer.step()
    after = chexquery.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(chexquery.condition_queries, queries)  # while the query side did train
    assert not any(n.startswith(('vision.', 't5.')) for n, p in chexquery.named_parameters() if p.requires_grad)


def test_identical_reports_are_positives_of_each_other():
    texts = torch.tensor([[5, 6, 1, 0], [7, 1, 0, 0], [5, 6, 1, 0], [5, 8, 1, 0]])  # rows 0 and 2: one report
    targets = pretrain.siglip_targets(texts)
    expected = -torch.ones(4, 4)
    expected[[0, 0, 1, 2, 2, 3], [0, 2, 1, 0, 2, 3]] = 1
    assert torch.equal(targets, expected)


def test_siglip_loss_by_hand():
    import math
    texts = torch.tensor([[5, 1], [5, 1], [7, 1]])  # the first two images share their report
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [-2.0, 1.0, 4.0]])  # rows: texts, columns: images
    nll = lambda z: math.log(1 + math.exp(-z))  # -log sigmoid(z)
    rows = [nll(2.0) + nll(1.0) + nll(1.0), nll(0.5) + nll(3.0) + nll(-0.0), nll(2.0) + nll(-1.0) + nll(4.0)]
    assert pretrain.siglip_loss(logits, texts).item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_siglip_loss_without_repeated_reports_is_siglips_own():
    torch.manual_seed(0)
    model = pretrain.new_siglip(pretrain.siglip_config(50, 6, 32, 16, layers=1, heads=2, image_size=32, patch_size=16))
    texts = torch.tensor([[5, 6, 1, 0, 0, 0], [7, 1, 0, 0, 0, 0], [5, 8, 9, 1, 0, 0]])
    out = model(**pretrain.text_inputs(texts), pixel_values=torch.randn(3, 3, 32, 32), return_loss=True)
    assert pretrain.siglip_loss(out.logits_per_text, texts).item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_a_report_reads_as_padded_to_full_length_in_any_batch_at_the_cost_of_its_longest(phantom_dir):
    tok = data.load_tokenizer(phantom_dir)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    reports = [r['report'] for r in data.read_split(phantom_dir, 'val')[:6]]
    ids = tok(reports)['input_ids']
    text_len = max(map(len, ids)) + 2                                  # as pretrain.py sets it: </s> and the pooled <pad>
    torch.manual_seed(0)
    model = pretrain.new_siglip(pretrain.siglip_config(len(tok), text_len, WIDTH, 16, layers=1, heads=2, image_size=S))
    texts = pretrain.siglip_texts(tok, reports, text_len)
    assert [row[row != pad].tolist() for row in texts] == [w + [eos] for w in ids] and (texts[:, -1] == pad).all()
    assert (texts[:, 0] == pad).sum() == 5                             # all but the longest padded on the left
    right = torch.tensor([w + [eos] + [pad] * (text_len - len(w) - 1) for w in ids])  # SigLIP's own layout
    shortest = min(range(6), key=lambda i: len(ids[i]))
    alone_inputs = pretrain.text_inputs(texts[shortest:shortest + 1])
    assert alone_inputs['input_ids'].shape == (1, len(ids[shortest]) + 2)  # its tokens, </s>, the pooled <pad>
    with torch.no_grad():
        full = model.get_text_features(input_ids=right, attention_mask=(right != pad).long()).pooler_output
        batched = model.get_text_features(**pretrain.text_inputs(texts)).pooler_output
        alone = model.get_text_features(**alone_inputs).pooler_output
    torch.testing.assert_close(batched, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone[0], full[shortest], atol=1e-5, rtol=1e-4)
    cut = pretrain.siglip_texts(tok, ['Findings: The heart is normal in size. The lungs are clear.'], 6)
    assert cut[0, -2:].tolist() == [eos, pad] and (cut != pad).sum() == 5  # a cut report keeps its </s>


def test_no_val_or_test_image_enters_pretraining(phantom_dir, tmp_path):
    import json
    import shutil
    pretrain.check_unseen(phantom_dir)  # the phantom set as generated
    images = {split: [r['image'] for r in data.read_split(phantom_dir, split)] for split in ('train', 'val', 'test')}
    assert not set(images['train']) & (set(images['val']) | set(images['test']))
    # a train record that is a val image, under its own name or copied to another name, is refused
    for leak in ('same file', 'copied'):
        d = tmp_path / leak.replace(' ', '_')
        shutil.copytree(phantom_dir, d)
        record = data.read_split(phantom_dir, 'val')[3]
        if leak == 'copied':
            shutil.copy(d / record['image'], d / 'images' / 'renamed.png')
            record = dict(record, image='images/renamed.png')
        with open(d / 'train.jsonl', 'a') as file:
            file.write(json.dumps(record) + '\n')
        with pytest.raises(ValueError, match='also a val or test image'):
            pretrain.check_unseen(str(d))


def test_ceiling_is_cached_and_printed_beside_the_probe(backbones, phantom_dir, tmp_path):
    import json
    import probe
    tok = data.load_tokenizer(phantom_dir)
    train, val = (pretrain.image_text_split(phantom_dir, s, tok, 40) for s in ('train', 'val'))
    path = str(tmp_path / pretrain.CEILING_FILE)
    here = pretrain.phantom_identity(phantom_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = probe.ceiling(train, val, data.train_transform(S), data.eval_transform(S), path, epochs=1, batch_size=32,
                           data=here)
    torch.set_num_threads(threads)
    with open(path) as file:
        assert json.dumps(json.load(file)) == json.dumps(result)  # as text: NaN (a class absent from val) != NaN
    assert list(result['aucs']) == list(CONDITIONS)
    probe_path = os.path.join(backbones['siglip'][0], pretrain.PROBE_FILE)
    found = probe.read(probe_path)  # what pretraining cached
    lines = probe.against_ceiling(probe_path, [path], here)
    row = next(line for line in lines if line.split()[:2] == ['Pleural', 'Effusion'])
    assert row.split()[2:] == [f"{found['aucs']['Pleural Effusion']:.3f}", f"{result['aucs']['Pleural Effusion']:.3f}"]
    assert lines[-1].split()[1:] == [f"{found['auc']:.3f}", f"{result['auc']:.3f}"]
    missing = probe.against_ceiling(probe_path, [str(tmp_path / 'none')], here)
    assert 'python pretrain.py --ceiling' in missing[-1] and missing[-2].split()[-1] == '-'


def test_a_ceiling_is_read_only_on_the_data_it_was_measured_on(backbones, phantom_dir, tmp_path):
    """out_dir's own ceiling first, then the reference; neither when made from other images."""
    import json
    import probe
    here = pretrain.phantom_identity(phantom_dir)
    assert here['generator_version'] is not None and here['params']['seed'] is not None
    probe_path = os.path.join(backbones['siglip'][0], pretrain.PROBE_FILE)

    def cached(name, auc, identity):
        path = str(tmp_path / name)
        with open(path, 'w') as file:
            json.dump(dict(auc=auc, aucs={c: auc for c in CONDITIONS}, machine='a test CPU', data=identity), file)
        return path
    other = dict(here, params=dict(here['params'], seed=here['params']['seed'] + 1))
    own, stale, reference = cached('own.json', 0.91, here), cached('stale.json', 0.92, other), cached('ref.json', 0.93, here)
    mean = lambda lines: lines[len(CONDITIONS) + 1].split()[-1]   # the header, 14 rows, then the mean
    assert mean(probe.against_ceiling(probe_path, [own, reference], here)) == '0.910'
    lines = probe.against_ceiling(probe_path, [stale, reference], here)
    assert mean(lines) == '0.930' and 'a test CPU' in lines[-1] and reference in lines[-1]
    assert mean(probe.against_ceiling(probe_path, [stale, str(tmp_path / 'none')], here)) == '-'
    # the reference shipped with the project names the default phantom set of this generator version (a new
    # version fails here: measure the ceiling again), and what measured it
    import phantom
    shipped = probe.read(pretrain.REFERENCE_CEILING)
    default = phantom.check_params(phantom.n_train, phantom.n_val, phantom.n_test, phantom.image_size, phantom.seed)
    assert shipped['data'] == dict(generator_version=phantom.VERSION, params=default)
    assert shipped['machine'] and 0.5 < shipped['auc'] <= 1


def test_a_backbone_made_from_another_phantom_vocabulary_is_not_reused(backbones, phantom_dir, tmp_path):
    import json
    import shutil
    shutil.copytree(backbones['t5'][0], tmp_path / 'out' / 't5')
    for name in ('siglip', 'bert'):
        (tmp_path / 'out' / name).mkdir()
    fits = run_script('pretrain.py', f'--data_dir={phantom_dir}', f'--out_dir={tmp_path / "out"}', '--image_size=64')
    assert str(tmp_path / 'out' / 't5') in fits.stdout                  # the same vocabulary: skipped, reused
    other = tmp_path / 'data'
    shutil.copytree(phantom_dir, other)
    tok = json.loads((other / 'tokenizer.json').read_text())
    vocab = tok['model']['vocab']
    first, second = sorted(vocab, key=vocab.get)[3:5]                    # two words swap their ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / 'tokenizer.json').write_text(json.dumps(tok))
    r = run_script('pretrain.py', f'--data_dir={other}', f'--out_dir={tmp_path / "out"}', '--image_size=64',
                   check=False)
    assert r.returncode != 0 and str(tmp_path / 'out' / 't5') in r.stderr and 'delete it' in r.stderr


def test_probe_features_are_the_global_token_beside_the_mean_patch_token(backbones, phantom_dir):
    """The probe reads what CheXQuery reads: the gate the global token, the queries the patches."""
    path, model = backbones['siglip']
    images = [data.load_image(os.path.join(phantom_dir, r['image'])) for r in data.read_split(phantom_dir, 'val')[:3]]
    transform = data.eval_transform(S)
    features = pretrain.image_features(model.vision_model, pretrain.stack(images, transform), batch_size=2)  # (3, 2W)
    with torch.no_grad():
        out = model.vision_model(pixel_values=pretrain.stack(images, transform))
    assert features.shape == (3, 2 * WIDTH)
    assert torch.allclose(features[:, :WIDTH], out.pooler_output, atol=1e-5)
    assert torch.allclose(features[:, WIDTH:], out.last_hidden_state.mean(1), atol=1e-5)


def test_fit_takes_the_threads_widen_offers_once_it_offers_them():
    """SigLIP trains on one core while T5 and BERT train on the other, then on every core."""
    threads = torch.get_num_threads()
    asked, trained_on = [], []

    def widen(done):  # yes from 40% of the steps on
        asked.append(done)
        return 2 if done >= 0.4 else 0

    def loss(x):
        trained_on.append(torch.get_num_threads())
        return model(x).square().mean()

    try:
        torch.set_num_threads(1)
        model = torch.nn.Linear(3, 1)
        batches = iter(lambda: torch.randn(4, 3), None)
        pretrain.fit(model, loss, batches, steps=5, lr=1e-3, name='t', widen=widen)
        assert asked == [0.0, 0.2, 0.4]        # asked with the share done, until it said yes, never again
        assert trained_on == [1, 1, 2, 2, 2]
    finally:
        torch.set_num_threads(threads)


def test_siglip_widens_at_its_share_of_steps_whenever_the_text_jobs_end_and_a_failed_one_raises_at_once():
    import threading
    from concurrent.futures import Future
    assert pretrain.siglip_threads([], 4, share=0.3)(0.29) == 0   # nothing in the second process: still at 0.3
    assert pretrain.siglip_threads([], 4, share=0.3)(0.3) == 4
    early = Future()
    early.set_result((1.0, 1.0))
    assert pretrain.siglip_threads([early], 4, share=0.3)(0.1) == 0   # done early: still waits for its share
    late = Future()
    widen = pretrain.siglip_threads([early, late], 4, share=0.3)
    assert widen(0.1) == 0
    threading.Timer(0.2, late.set_result, ((1.0, 1.0),)).start()
    assert widen(0.3) == 4                                         # waits for the late job, then widens
    assert late.done()
    broken = Future()
    broken.set_exception(ValueError('bert broke'))
    with pytest.raises(ValueError, match='bert broke'):
        pretrain.siglip_threads([Future(), broken], 4, share=0.3)(0.0)


@pytest.mark.slow
def test_pretrain_py_starts_siglip_at_sincos_positions(phantom_dir, tmp_path):
    """sincos_positions (on by default) reaches the tower pretrain.py builds: no steps, so it is saved as it starts."""
    from transformers import SiglipModel
    run_script('pretrain.py', f'--data_dir={phantom_dir}', f'--out_dir={tmp_path}', '--image_size=64', '--width=32',
               '--text_width=16', '--layers=1', '--heads=2', '--siglip_epochs=0', '--t5_epochs=0', '--bert_epochs=0',
               '--probe_steps=2')
    saved = SiglipModel.from_pretrained(tmp_path / 'siglip').vision_model.embeddings.position_embedding.weight
    torch.testing.assert_close(saved, pretrain.sincos_2d(32, 64 // 16))
