import os

import pytest
import torch

from bench import FLAN_T5_BASE, SIGLIP_BASE_384
from checkpoint import checkpoint_state_dict, load_checkpoint, load_weights, param_table, save_checkpoint
from chexquery import CONDITIONS, TINY_TEXT, TINY_VISION, CheXQuery, CheXQueryConfig, tiny_config
from conftest import S, V, batch, tiny

os.environ['HF_HUB_OFFLINE'] = '1'
pytestmark = pytest.mark.usefixtures('one_thread')


def test_shapes_of_every_stage():
    m = tiny().eval()
    images, dec, labels, cond = batch()
    g, patches = m.vision_features(images)
    D = m.vision.config.hidden_size
    assert g.shape == (2, D) and patches.shape == (2, (S // 16) ** 2, D)
    out = m(images, dec, labels, cond, return_attention=True)
    assert out['visual_tokens'].shape == (2, 11, m.t5.config.d_model)
    assert out['cond_logits'].shape == (2, 14)
    assert out['gate'].shape == (2, 1) and ((out['gate'] > 0) & (out['gate'] < 1)).all()
    assert out['attention'].shape == (2, 20, (S // 16) ** 2)
    torch.testing.assert_close(out['attention'].sum(-1), torch.ones(2, 20))
    assert out['logits'].shape == (2, 10, V)
    # the losses are the mean token cross-entropy over the labelled positions (the prompt's -100
    # left out) and the mean binary cross-entropy over the 14 conditions, written out here
    logp = out['logits'].log_softmax(-1)
    said = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out['loss_gen'], nll[said].mean())
    prob = out['cond_logits'].sigmoid()
    torch.testing.assert_close(out['loss_aux'], -(cond * prob.log() + (1 - cond) * (1 - prob).log()).mean())


def test_the_cross_attention_ffn_is_four_times_the_vision_width_unless_set(tmp_path):
    m = tiny(ffn_dim=None)
    width = m.vision.config.hidden_size
    assert m.cfg.ffn_dim == 4 * width and m.cross_attention[0].ffn[0].out_features == 4 * width
    assert tiny(ffn_dim=96).cross_attention[1].ffn[0].out_features == 96
    save_checkpoint(tmp_path / 'm.safetensors', m, {})  # the number is saved, not None
    reloaded, meta = load_checkpoint(tmp_path / 'm.safetensors')
    assert meta['model_config']['ffn_dim'] == 4 * width
    assert reloaded.cross_attention[0].ffn[0].out_features == 4 * width


def test_attention_path_equals_sdpa_path():
    m = tiny().eval()
    images = batch()[0]
    a = m.encode(images, return_attention=True)
    b = m.encode(images)
    torch.testing.assert_close(a['visual_tokens'], b['visual_tokens'], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # builds the real 276M-parameter model
def test_real_sizes_of_the_dimension_table():
    torch.manual_seed(0)
    m = CheXQuery(CheXQueryConfig(vision_config=SIGLIP_BASE_384, text_config=FLAN_T5_BASE, query_init='random'))
    m.eval()
    assert not hasattr(m.t5, 'encoder')  # the T5 encoder is removed, not merely unused
    assert m.t5.lm_head.weight is not m.t5.shared.weight
    with torch.no_grad():
        g, patches = m.vision_features(torch.randn(1, 3, 384, 384))
        assert g.shape == (1, 768) and patches.shape == (1, 576, 768)
        out = m.encode(features=(g, patches), return_attention=True)
    assert out['attention'].shape == (1, 20, 576)
    assert out['visual_tokens'].shape == (1, 11, 768) and out['cond_logits'].shape == (1, 14)
    report = param_table(m)
    print(report)
    vision = sum(p.numel() for n, p in m.named_parameters() if n.startswith('vision.') and 'lora_' not in n)
    assert 92e6 < vision < 94e6                      # SigLIP-base vision tower
    lora_v = sum(p.numel() for n, p in m.named_parameters() if n.startswith('vision.') and 'lora_' in n)
    assert lora_v == 12 * 2 * 8 * (768 + 768)         # 12 layers x (q, v) x r(in + out)
    lora_t = sum(p.numel() for n, p in m.named_parameters() if n.startswith('t5.') and 'lora_' in n)
    assert lora_t == 12 * 2 * 4 * 16 * (768 + 768)    # 12 blocks x (self, cross) x (q, k, v, o)
    rows = table(report)
    assert (rows['vision encoder (SigLIP)'][0], rows['vision LoRA'][0], rows['decoder LoRA'][0]) == (vision, lora_v, lora_t)
    assert rows['total'][2] == sum(p.numel() for p in m.set_phase(2).parameters() if p.requires_grad)


def table(report):
    """{row: [params, trainable in phase 1, 2, 3]} as the parameter table reports them."""
    rows = {}
    for line in report.splitlines()[1:]:
        *label, params, p1, p2, p3 = line.split()
        rows[' '.join(label)] = [int(x.replace(',', '')) for x in (params, p1, p2, p3)]
    return rows


@pytest.mark.parametrize('full_backbones', [False, True])
def test_parameter_table_counts_what_each_phase_trains(full_backbones):
    m = tiny()
    rows = table(param_table(m, full_backbones))
    total = rows.pop('total')
    assert total[0] == sum(p.numel() for p in m.parameters())
    assert [sum(r[i] for r in rows.values()) for i in range(4)] == total  # each parameter in one row
    for phase in (1, 2, 3):
        m.set_phase(phase, full_backbones=full_backbones)
        assert total[phase] == sum(p.numel() for p in m.parameters() if p.requires_grad), phase
    lora_v = sum(p.numel() for n, p in m.named_parameters() if n.startswith('vision.') and 'lora_' in n)
    assert rows['vision LoRA'] == [lora_v, 0, lora_v, 0]


def expected_trainable(name, phase):
    if name.startswith('vision.'):
        return 'lora_' in name and phase == 2
    if name.startswith('t5.'):
        return 'lora_' in name and phase >= 2
    if name.startswith('aux_head.'):
        return phase != 3
    return name.split('.')[0] in ('condition_queries', 'anatomical_queries', 'cross_attention', 'fusion', 'proj')


@pytest.mark.parametrize('phase', [1, 2, 3])
def test_phase_trainable_set_and_every_trainable_param_gets_a_gradient(phase):
    m = tiny().set_phase(phase).train()
    for n, p in m.named_parameters():
        assert p.requires_grad == expected_trainable(n, phase), n
    images, dec, labels, cond = batch()
    out = m(images, dec, labels, cond)
    loss = out['loss_gen'] + (0.5 * out['loss_aux'] if phase != 3 else 0)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
               and not n.endswith('lora_A')]  # A's gradient is exactly 0 while B is still 0
    assert missing == []
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    # frozen modules stay in eval mode while the rest trains
    assert m.vision.training == (phase == 2)
    assert m.t5.training == (phase != 1)
    assert m.cross_attention.training and m.aux_head.training == (phase != 3)


def test_frozen_vision_runs_without_autograd():
    m = tiny().set_phase(1).train()
    g, patches = m.vision_features(batch()[0])
    assert not patches.requires_grad and not g.requires_grad
    m.set_phase(2)
    assert m.vision_features(batch()[0])[1].requires_grad


def test_lora_changes_nothing_at_init_in_phase_2():
    m = tiny().eval()
    images, dec, labels, cond = batch()
    a = m(images, dec, labels, cond)['logits']
    m.set_phase(2).eval()
    torch.testing.assert_close(m(images, dec, labels, cond)['logits'], a)


def test_label_smoothing_is_applied():
    m = tiny().eval()
    images, dec, labels, cond = batch()
    out = m(images, dec, labels, cond, label_smoothing=0.1)
    logits = out['logits'].flatten(0, 1)[labels.flatten() != -100]
    target = labels.flatten()[labels.flatten() != -100]
    logp = logits.log_softmax(-1)
    manual = -(0.9 * logp.gather(1, target[:, None]).squeeze(1) + 0.1 * logp.mean(-1)).mean()
    torch.testing.assert_close(out['loss_gen'], manual)
    assert not torch.isclose(out['loss_gen'], m(images, dec, labels, cond)['loss_gen'])


def test_overfitting_two_examples_lowers_the_loss():
    m = tiny(dropout=0.0).set_phase(2).train()
    images, dec, labels, cond = batch()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        out = m(images, dec, labels, cond)
        loss = out['loss_gen'] + out['loss_aux']
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_generate_keeps_prompt_and_respects_length_and_beams():
    m = tiny().eval()
    images = batch()[0]
    prompt = [0, 7, 9]
    ids = m.generate(images, prompt, num_beams=3, min_length=12, max_length=16)
    assert ids.shape[0] == 2 and 12 <= ids.shape[1] <= 16
    assert (ids[:, :3] == torch.tensor(prompt)).all()
    # no EOS (1) before min_length
    assert not (ids[:, :11] == 1).any()
    ids2 = m.generate(images, prompt, num_beams=3, min_length=12, max_length=16)  # fresh encoder outputs each call
    assert torch.equal(ids, ids2)
    beams = m.generate(images, prompt, num_beams=3, num_return_sequences=3, min_length=5, max_length=8)
    assert beams.shape[0] == 6 and beams.shape[1] <= 8


def test_bad_images_name_the_expected_shape():
    m = tiny()
    for bad in (torch.randn(2, 1, S, S), torch.randn(2, 3, S + 1, S), torch.randn(3, S, S)):
        with pytest.raises(ValueError, match=rf"\(B, 3, {S}, {S}\)"):
            m(bad)


def test_unloadable_hub_name_says_how_to_fix():
    with pytest.raises(OSError, match='text_model=DIR'):
        CheXQuery(CheXQueryConfig(vision_config=dict(TINY_VISION, image_size=S), image_size=S,
                                  text_model='no-such-org/no-such-model', query_init='random',
                                  n_heads=4, ffn_dim=64))


def test_pretrained_backbones_from_local_dirs_keep_lm_head_untied(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5ForConditionalGeneration
    torch.manual_seed(1)
    SiglipVisionModel(SiglipVisionConfig(**dict(TINY_VISION, image_size=S))).save_pretrained(tmp_path / 'v')
    t5 = T5ForConditionalGeneration(T5Config(**dict(TINY_TEXT, vocab_size=V)))
    t5.lm_head.weight = torch.nn.Parameter(torch.randn(V, t5.config.d_model))  # untied, as in Flan-T5
    t5.save_pretrained(tmp_path / 't')
    m = CheXQuery(CheXQueryConfig(vision_model=str(tmp_path / 'v'), text_model=str(tmp_path / 't'),
                                  image_size=S, query_init='random', n_heads=4, ffn_dim=64))
    assert m.t5.lm_head.weight is not m.t5.shared.weight
    torch.testing.assert_close(m.t5.lm_head.weight, t5.lm_head.weight)
    torch.testing.assert_close(m.t5.shared.weight, t5.shared.weight)
    # checkpoints leave the frozen pretrained weights out, but keep LoRA and new modules
    keys = checkpoint_state_dict(m).keys()
    assert any('lora_' in k and k.startswith('vision.') for k in keys)
    assert not any(k.startswith(('vision.', 't5.')) and 'lora_' not in k for k in keys)
    assert 'condition_queries' in keys


def test_vision_encoder_from_a_whole_siglip_is_silent_and_a_short_directory_warns(tmp_path, capfd):
    import warnings
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
    from chexquery import _from_pretrained
    vision = dict(TINY_VISION, image_size=S)
    SiglipModel(SiglipConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                    num_hidden_layers=1, num_attention_heads=2,
                                                                    vocab_size=V))).save_pretrained(tmp_path / 's')
    capfd.readouterr()  # what writing the directory printed
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the text tower's weights are left over, as expected: no warning
        _from_pretrained(SiglipVisionModel, str(tmp_path / 's'), 'vision encoder', 'vision_model')
    assert capfd.readouterr().err == ''  # nor a progress bar for a local directory
    deeper = vision['num_hidden_layers'] + 1  # a layer the directory does not hold
    with pytest.warns(UserWarning, match=f'encoder.layers.{deeper - 1}.'):
        _from_pretrained(SiglipVisionModel, str(tmp_path / 's'), 'vision encoder', 'vision_model',
                         num_hidden_layers=deeper)


def test_dropout_zero_turns_off_every_dropout_and_none_keeps_the_models(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    from lora import lora_layers
    from startup import with_dropout
    images, ids, labels, cond = batch()

    def two_training_passes(cfg):
        torch.manual_seed(0)
        model = CheXQuery(cfg).set_phase(2)  # LoRA on both backbones trains: every dropout is active
        for layer in lora_layers(model):  # B starts at 0, which would hide the LoRA dropouts
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        model.train()
        first, second = (model(images, ids, labels, cond) for _ in range(2))
        return model, [torch.equal(first[k], second[k]) for k in ('logits', 'cond_logits')]

    assert two_training_passes(tiny_config(vocab_size=V, image_size=S))[1] == [False, False]
    model, same = two_training_passes(with_dropout(tiny_config(vocab_size=V, image_size=S), 0))
    assert same == [True, True] and model.t5.config.dropout_rate == 0
    assert model.training and model.t5.training
    # a pretrained T5 directory keeps its own rate unless one is given
    saved = T5ForConditionalGeneration(T5Config(**dict(TINY_TEXT, vocab_size=V, dropout_rate=0.25)))
    saved.save_pretrained(tmp_path / 't')
    cfg = tiny_config(vocab_size=V, image_size=S, text_config=None, text_model=str(tmp_path / 't'))
    assert CheXQuery(cfg).t5.config.dropout_rate == 0.25
    assert CheXQuery(with_dropout(cfg, 0.3)).t5.config.dropout_rate == 0.3


def tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast
    path.mkdir()
    words = sorted({w for c in CONDITIONS for w in c.lower().split()})
    (path / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words))
    BertTokenizerFast(vocab_file=str(path / 'vocab.txt')).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(path)


def test_condition_queries_from_a_bert_model_are_cached(tmp_path, monkeypatch):
    import shutil
    monkeypatch.setenv('CHEXQUERY_CACHE', str(tmp_path / 'cache'))
    tiny_bert(tmp_path / 'bert')
    a = tiny(query_init=str(tmp_path / 'bert')).condition_queries.detach().clone()
    assert len(list((tmp_path / 'cache').glob('*.safetensors'))) == 1
    shutil.rmtree(tmp_path / 'bert')  # the text model is never needed again
    b = tiny(query_init=str(tmp_path / 'bert')).condition_queries.detach()
    torch.testing.assert_close(a, b)
    # the documented mapping: [CLS] vectors, width 32 -> D = 128 by the seed-0 Gaussian projection,
    # centred on the 14 names' mean, rescaled to the anatomical queries' Xavier scale
    from safetensors.torch import load_file
    cls = load_file(next((tmp_path / 'cache').glob('*.safetensors')))['condition_queries']
    assert cls.shape == (14, 32)
    proj = cls @ (torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) / 128 ** 0.5)
    proj = proj - proj.mean(0)
    expected = proj / proj.pow(2).mean().sqrt() * (2 / (6 + 128)) ** 0.5
    torch.testing.assert_close(a, expected)
    with pytest.raises(OSError, match="query_init='random'"):
        tiny(query_init=str(tmp_path / 'no-such-bert'))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    m = tiny().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / 'ckpt.safetensors', m, dict(iter_num=3))
    m2, meta = load_checkpoint(tmp_path)
    assert meta['iter_num'] == 3 and meta['model_config']['image_size'] == S
    images, dec, labels, cond = batch()
    torch.testing.assert_close(m2(images, dec)['logits'], m(images, dec)['logits'])
    other = CheXQuery(tiny_config(vocab_size=V, image_size=S, n_pool_queries=4))
    from safetensors.torch import load_file
    with pytest.raises(ValueError, match='fusion.pool_queries'):
        load_weights(other, load_file(tmp_path / 'ckpt.safetensors'), 'ckpt')
    with pytest.raises(FileNotFoundError, match='ckpt.safetensors'):
        load_checkpoint(tmp_path / 'nowhere')
    (tmp_path / 'bad.safetensors').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='bad.safetensors'):
        load_checkpoint(tmp_path / 'bad.safetensors')


def test_a_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import safetensors.torch
    m = tiny()
    path = tmp_path / 'ckpt.safetensors'
    save_checkpoint(path, m, dict(iter_num=1))

    def killed(tensors, filename, metadata=None):  # dies half-way through writing the file
        open(filename, 'wb').write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, 'save_file', killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, m, dict(iter_num=2))
    assert load_checkpoint(path)[1]['iter_num'] == 1


def test_full_backbones_trains_random_backbones_where_their_lora_trains():
    m = tiny().set_phase(2, full_backbones=True)
    assert all(p.requires_grad for p in m.parameters())
    m.set_phase(3, aux=False, full_backbones=True)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith(('vision.', 'aux_head.')))
    assert all(p.requires_grad for n, p in m.named_parameters() if n.startswith('t5.'))
    m.set_phase(1, full_backbones=True)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith(('vision.', 't5.')))


def test_ablation_variants_fixed_gate_and_no_anatomical_queries():
    """learned_gate=False mixes global token and queries at a constant 0.5 and has no gate
    weights; n_anatomical_queries=0 leaves the 14 condition queries alone. Both train."""
    images, dec, labels, cond = batch()
    fixed = tiny(learned_gate=False)
    out = fixed(images, dec, labels, cond)
    assert torch.equal(out['gate'], torch.full((2, 1), 0.5))
    assert not [n for n, _ in fixed.named_parameters() if n.startswith('fusion.gate')]
    learned = tiny()
    assert [n for n, _ in learned.named_parameters() if n.startswith('fusion.gate')]
    lone = tiny(n_anatomical_queries=0)
    out = lone.encode(images, return_attention=True)
    assert out['attention'].shape[1] == 14 and out['visual_tokens'].shape[1] == 11
    lone.set_phase(1)
    loss = lone(images, dec, labels, cond)['loss_gen']
    loss.backward()
    assert lone.condition_queries.grad.abs().sum() > 0 and lone.anatomical_queries.numel() == 0


def test_condition_query_cache_follows_a_retrained_local_model(tmp_path, monkeypatch):
    monkeypatch.setenv('CHEXQUERY_CACHE', str(tmp_path / 'cache'))
    tiny_bert(tmp_path / 'bert')
    a = tiny(query_init=str(tmp_path / 'bert')).condition_queries.detach().clone()
    torch.manual_seed(5)
    from transformers import BertModel
    retrained = BertModel.from_pretrained(tmp_path / 'bert')
    for p in retrained.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    retrained.save_pretrained(tmp_path / 'bert')  # the same directory, new weights
    b = tiny(query_init=str(tmp_path / 'bert')).condition_queries.detach()
    assert not torch.allclose(a, b)


def test_forward_returns_the_weighted_training_loss_beside_its_parts():
    m = tiny().eval()
    images, dec, labels, cond = batch()
    out = m(images, dec, labels, cond, lambda_gen=0.7, lambda_aux=0.3)
    torch.testing.assert_close(out['loss'], 0.7 * out['loss_gen'] + 0.3 * out['loss_aux'])
    assert out['loss'].requires_grad  # what train.py backpropagates
    assert 'loss' not in m(images, dec, labels)  # the report's loss alone is not the training loss
    # no decoder input: the aux loss alone (train.py's lambda_gen=0)
    alone = m(images, cond_labels=cond, lambda_gen=0.7, lambda_aux=0.3)
    assert 'logits' not in alone and 'loss_gen' not in alone
    torch.testing.assert_close(alone['loss'], 0.3 * alone['loss_aux'])


@pytest.mark.parametrize('phase, full_backbones', [(1, False), (2, False), (2, True)])
def test_the_aux_loss_alone_trains_what_it_reaches_and_runs_no_decoder(monkeypatch, phase, full_backbones):
    m = tiny().set_phase(phase, full_backbones=full_backbones, gen=False).train()
    # the global token (SigLIP's pooling head), anatomical queries, fusion, projection and decoder only feed the report
    report_only = ('vision.head.', 'anatomical_queries', 'fusion.', 'proj.', 't5.')
    for n, p in m.named_parameters():
        assert p.requires_grad == (m.trainable(n, phase, full_backbones=full_backbones)
                                   and not n.startswith(report_only)), n
    if phase == 1:
        assert {n.split('.')[0] for n, p in m.named_parameters() if p.requires_grad} == {
            'condition_queries', 'cross_attention', 'aux_head'}
    monkeypatch.setattr(m.t5, 'forward', lambda *a, **k: pytest.fail('the decoder ran'))
    images, _, _, cond = batch()
    m(images, cond_labels=cond)['loss'].backward()
    # every trainable parameter gets a gradient, as DDP requires (LoRA's A gets 0 while B is 0)
    assert all(p.grad is not None and (p.grad.abs().sum() > 0 or n.endswith('lora_A'))
               for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match='nothing to train'):
        m.set_phase(1, aux=False, gen=False)
