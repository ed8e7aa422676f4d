"""Anatomical attention priors (issue 16, item 3): strict gives exactly zero attention outside
the region in every layer, soft adds a normalized prior that is broader in the first layer,
condition queries are never affected, 'none' is the model as it was bit for bit, malformed
atlas files name the file and the region, and the prior travels in checkpoints and through
train.py's phases."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chexquery
from chexpert import ATLAS, CONDITIONS, REGIONS, check_atlas, read_atlas
from checkpoint import checkpoint_state_dict, load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from chexquery import CheXQueryConfig, anatomical_prior_bias, tiny_config
from conftest import S, V, batch, tiny, train_in_process

C = len(CONDITIONS)
pytestmark = pytest.mark.usefixtures('one_thread')


def centres_inside(box, g):
    """(g * g,) bool, row-major: which patch centres lie in box, worked out here without torch."""
    c = (np.arange(g) + 0.5) / g
    x0, y0, x1, y1 = box
    return (((c >= y0) & (c <= y1))[:, None] & ((c >= x0) & (c <= x1))[None, :]).ravel()


def allowed(box, g):
    """The strict prior's patches: those whose centre is in box, else the nearest ones."""
    inside = centres_inside(box, g)
    if inside.any():
        return inside
    c = (np.arange(g) + 0.5) / g
    x0, y0, x1, y1 = box
    d = np.hypot(np.maximum(np.maximum(y0 - c, c - y1), 0)[:, None], np.maximum(np.maximum(x0 - c, c - x1), 0)[None, :])
    return np.isclose(d, d.min()).ravel()


def layer_maps(model, x):
    """encode(x, return_attention=True) and each cross-attention layer's (B, H, 20, N) weights."""
    maps = []
    hooks = [layer.register_forward_hook(lambda m, args, out: maps.append(out[1])) for layer in model.cross_attention]
    with torch.no_grad():
        enc = model.encode(x, return_attention=True)
    for h in hooks:
        h.remove()
    return enc, maps


@pytest.mark.parametrize('size', [64, 128])
def test_strict_gives_exactly_zero_attention_outside_the_region_in_every_layer(size):
    m = tiny(size, anatomical_prior='strict').eval()
    enc, maps = layer_maps(m, batch(image_size=size)[0])
    g = size // 16
    assert len(maps) == 2 and enc['attention'].shape == (2, 20, g * g)
    for j, region in enumerate(REGIONS):
        inside = torch.from_numpy(allowed(ATLAS[region], g))
        assert inside.any() and not inside.all(), region
        for w in maps + [enc['attention'][:, None]]:  # each layer's heads, and the map encode returns
            q = w[:, :, C + j]                                   # (B, H, N)
            assert torch.equal(q[..., ~inside], torch.zeros_like(q[..., ~inside])), region
            assert (q[..., inside] > 0).all(), region
            torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)))
    # the SDPA path (training's) computes the same model
    torch.testing.assert_close(m.encode(batch(image_size=size)[0])['visual_tokens'], enc['visual_tokens'],
                               atol=1e-5, rtol=1e-5)


def test_each_layer_gets_its_own_bias():
    m = tiny(anatomical_prior='strict').eval()
    m.attention_prior[1] = 0  # only the first layer is restricted now
    _, (first, second) = layer_maps(m, batch()[0])
    outside = m.attention_prior[0] == -math.inf                   # (20, N)
    assert outside.any() and (first[:, :, outside] == 0).all() and (second[:, :, outside] > 0).all()


def test_strict_keeps_the_nearest_patches_when_a_box_covers_no_patch_centre():
    # on the 4 x 4 grid the centres are at 0.125, 0.375, 0.625, 0.875: this spine is between two columns
    atlas = dict(ATLAS, spine=[0.45, 0.3, 0.55, 0.7])
    assert not centres_inside(atlas['spine'], 4).any() and allowed(atlas['spine'], 4).sum() == 4
    m = tiny(anatomical_prior='strict', atlas=atlas).eval()
    kept = (m.attention_prior[:, C + REGIONS.index('spine')] == 0).view(2, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True  # rows 0.375 and 0.625 (inside in y), the two columns either side of the box
    assert torch.equal(kept, expected.expand(2, 4, 4))
    enc, maps = layer_maps(m, batch()[0])
    spine = enc['attention'][:, C + REGIONS.index('spine')].view(2, 4, 4)
    assert torch.isfinite(enc['visual_tokens']).all() and torch.equal(spine[:, ~expected], torch.zeros(2, 12))


def test_strict_trains_with_finite_gradients():
    m = tiny(anatomical_prior='strict').train()
    m.set_phase(2, full_backbones=True)
    out = m.encode(batch()[0])
    (out['visual_tokens'].pow(2).mean() + out['cond_logits'].mean()).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert m.anatomical_queries.grad.abs().sum() > 0
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_soft_prior_sums_to_one_per_query_and_is_broader_in_the_first_layer():
    m = tiny(128, anatomical_prior='soft')
    bias = m.attention_prior                                                   # (2, 20, 64)
    assert bias.shape == (2, 20, 64) and torch.isfinite(bias).all()
    p = bias[:, C:].double().exp()                                             # (2, 6, 64)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    for j, region in enumerate(REGIONS):
        inside = torch.from_numpy(centres_inside(ATLAS[region], 8))
        for layer in range(2):
            # 1 inside the box before normalizing: every patch inside has the row's largest value
            torch.testing.assert_close(p[layer, j, inside], p[layer, j].max().expand(int(inside.sum())))
            assert (p[layer, j, ~inside] < p[layer, j].max()).all()
        out1, out2 = p[0, j, ~inside].sum(), p[1, j, ~inside].sum()
        entropy = -(p[:, j] * p[:, j].log()).sum(-1)
        assert out1 > out2 + 0.05 and entropy[0] > entropy[1], (region, out1, out2, entropy)
    # it changes the attention: the anatomical queries look more inside their boxes than without it
    enc_soft, _ = layer_maps(m.eval(), batch(image_size=128)[0])
    enc_none, _ = layer_maps(tiny(128).eval(), batch(image_size=128)[0])
    share = lambda enc, j: enc['attention'][:, C + j][:, torch.from_numpy(centres_inside(ATLAS[REGIONS[j]], 8))].sum(-1)
    assert all((share(enc_soft, j) > share(enc_none, j)).all() for j in range(6))


def test_sigma_formula_matches_the_constants():
    cfg = tiny_config(vocab_size=V, image_size=S, anatomical_prior='soft', n_cross_layers=3)
    bias = anatomical_prior_bias(cfg, 16)
    assert bias.shape == (3, 20, 16)
    # a patch at distance d outside the box, against one inside: exp(-d^2 / 2 sigma^2)
    atlas = cfg.atlas['mediastinum']                                 # y1 = 0.45: the row at 0.625 is 0.175 below
    j, below, inside = C + REGIONS.index('mediastinum'), 2 * 4 + 1, 1 * 4 + 1
    assert atlas[1] < 0.375 < atlas[3] < 0.625 and atlas[0] < 0.375 < atlas[2]
    for layer, sigma in enumerate((0.2, 0.1, 0.05)):                 # geometric from broad to sharp
        ratio = (bias[layer, j, below] - bias[layer, j, inside]).item()
        assert math.isclose(ratio, -(0.625 - atlas[3]) ** 2 / (2 * sigma ** 2), rel_tol=1e-4), (layer, ratio)


@pytest.mark.parametrize('prior', ['soft', 'strict'])
def test_condition_queries_are_not_affected(prior):
    m, plain = tiny(anatomical_prior=prior).eval(), tiny().eval()
    assert torch.equal(m.attention_prior[:, :C], torch.zeros(2, C, 16))
    x = batch()[0]
    (enc, maps), (enc0, maps0) = layer_maps(m, x), layer_maps(plain, x)
    # the same initial weights whatever the prior, so the ablation compares like with like
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    for w, w0 in zip(maps, maps0):
        assert torch.equal(w[:, :, :C], w0[:, :, :C])
        assert not torch.allclose(w[:, :, C:], w0[:, :, C:])
    # queries do not attend to each other, so the condition logits are exactly the unprimed model's
    assert torch.equal(enc['cond_logits'], enc0['cond_logits'])
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x)['cond_logits'], plain.encode(x)['cond_logits'])


def old_attention_forward(self, x, context, return_attention=False):
    """Attention.forward as it was before the priors, verbatim."""
    B, Q, D = x.shape
    N, H = context.shape[1], self.n_heads
    q = self.q(x).view(B, Q, H, D // H).transpose(1, 2)
    k = self.k(context).view(B, N, H, D // H).transpose(1, 2)
    v = self.v(context).view(B, N, H, D // H).transpose(1, 2)
    p = self.dropout if self.training else 0.0
    if return_attention:
        weights = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).softmax(-1)
        out = F.dropout(weights, p) @ v
    else:
        weights, out = None, F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    out = self.o(out.transpose(1, 2).reshape(B, Q, D))
    return out, weights


def old_layer_forward(self, queries, patches, return_attention=False):
    a, weights = self.attn(queries, patches, return_attention)
    x = self.norm1(queries + self.drop(a))
    x = self.norm2(x + self.drop(self.ffn(x)))
    return x, weights


def run_all_paths(model, seed=1):
    """Outputs of both attention paths in eval mode, and a training step's (dropout) loss and grads."""
    x, dec, labels, cond = batch(seed=seed)
    model.eval()
    with torch.no_grad():
        outs = [model(x, dec, labels, cond, return_attention=r) for r in (False, True)]
    model.train()
    torch.manual_seed(seed)
    out = model(x, dec, labels, cond)
    (out['loss_gen'] + out['loss_aux']).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return outs, out['loss_gen'].detach(), grads


def test_none_is_bit_identical_to_the_model_before_the_priors(monkeypatch):
    m = tiny(anatomical_prior='none')
    assert m.attention_prior is None and m.cfg.atlas is None
    new = run_all_paths(m)
    monkeypatch.setattr(chexquery.Attention, 'forward', old_attention_forward)
    monkeypatch.setattr(chexquery.CrossAttentionLayer, 'forward', old_layer_forward)
    monkeypatch.setattr(chexquery.CheXQuery, 'encode', old_encode)
    old = run_all_paths(tiny())
    for a, b in zip(new[0], old[0]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(new[1], old[1]) and len(new[2]) == len(old[2])
    assert all(torch.equal(a, b) for a, b in zip(new[2], old[2]))


def old_encode(self, images=None, features=None, return_attention=False):
    """CheXQuery.encode as it was before the priors, verbatim."""
    global_token, patches = features if features is not None else self.vision_features(images)
    B = patches.shape[0]
    queries = torch.cat([self.condition_queries, self.anatomical_queries])[None].expand(B, -1, -1)
    queries = queries.to(patches.dtype)
    attention = None
    for layer in self.cross_attention:
        queries, attention = layer(queries, patches, return_attention)
    cond_logits = self.aux_head(queries[:, :len(CONDITIONS)])
    visual_tokens, gate = self.fusion(global_token, queries)
    out = dict(visual_tokens=self.proj(visual_tokens), cond_logits=cond_logits, gate=gate)
    if return_attention:
        out['attention'] = attention.mean(1)
    return out


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="'gaussian'"):
        tiny_config(anatomical_prior='gaussian')
    for prior in ('soft', 'strict'):
        with pytest.raises(ValueError, match='n_anatomical_queries=6.*got 0'):
            tiny_config(anatomical_prior=prior, n_anatomical_queries=0)
    tiny_config(n_anatomical_queries=0)  # no prior: the ablation without anatomical queries stays
    with pytest.raises(ValueError, match="CheXQueryConfig.atlas: region 'spine' is missing"):
        tiny_config(anatomical_prior='soft', atlas={r: ATLAS[r] for r in REGIONS[:-1]})
    cfg = tiny_config(anatomical_prior='strict')
    assert cfg.atlas == ATLAS and cfg.atlas is not ATLAS  # the shipped boxes, written into the config


@pytest.fixture
def atlas_file(tmp_path):
    def write(content, name='atlas.json'):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)
    return write


BAD_ATLASES = [  # (what is wrong, the atlas, what the error must say besides the file)
    ('missing region', {r: ATLAS[r] for r in REGIONS if r != 'diaphragm'}, "region 'diaphragm' is missing"),
    ('outside [0, 1]', dict(ATLAS, cardiac=[0.3, 0.3, 1.2, 0.8]), "region 'cardiac'.*outside \\[0, 1\\]"),
    ('negative', dict(ATLAS, spine=[-0.1, 0.0, 0.5, 0.9]), "region 'spine'.*outside \\[0, 1\\]"),
    ('x in the wrong order', dict(ATLAS, mediastinum=[0.64, 0.11, 0.36, 0.45]), "region 'mediastinum'.*wrong order"),
    ('an empty box', dict(ATLAS, diaphragm=[0.1, 0.6, 0.9, 0.6]), "region 'diaphragm'.*wrong order"),
    ('three numbers', dict(ATLAS, **{'left lung': [0.5, 0.1, 0.9]}), "region 'left lung' needs 4 numbers"),
    ('not a list', dict(ATLAS, **{'right lung': 0.5}), "region 'right lung' needs 4 numbers"),
    ('strings', dict(ATLAS, cardiac=['0.3', '0.3', '0.7', '0.8']), "region 'cardiac' needs 4 numbers"),
    ('booleans', dict(ATLAS, cardiac=[0, 0, True, True]), "region 'cardiac' needs 4 numbers"),
    ('unknown region', dict(ATLAS, left_lung=[0.5, 0.1, 0.9, 0.8]), "unknown region.*'left_lung'"),
    ('not an object', [ATLAS[r] for r in REGIONS], 'JSON object'),
    ('not JSON', '{"cardiac": [0.3, 0.3, 0.7, 0.8],', 'is not JSON'),
    ('NaN', '{' + ', '.join(f'"{r}": {json.dumps(ATLAS[r]) if r != "spine" else "[0.4, NaN, 0.6, 0.9]"}'
                            for r in REGIONS) + '}', "region 'spine'.*outside"),
]


@pytest.mark.parametrize('what, atlas, message', BAD_ATLASES, ids=[b[0] for b in BAD_ATLASES])
def test_a_malformed_atlas_file_names_the_file_and_the_region(atlas_file, what, atlas, message):
    path = atlas_file(atlas, name=f"bad-{what.replace(' ', '_')}.json")
    with pytest.raises(ValueError, match=message) as e:
        read_atlas(path)
    assert path in str(e.value)


def test_an_atlas_file_is_read_and_a_missing_one_is_named(atlas_file, tmp_path):
    mine = {r: [round(v * 0.9 + 0.05, 3) for v in box] for r, box in ATLAS.items()}
    assert read_atlas(atlas_file({r: mine[r] for r in reversed(REGIONS)})) == mine  # any key order
    assert list(check_atlas(mine)) == list(REGIONS)
    with pytest.raises(FileNotFoundError, match='nowhere.json'):
        read_atlas(str(tmp_path / 'nowhere.json'))


def test_a_checkpoint_saved_with_a_prior_loads_back_with_it(tmp_path):
    atlas = dict(ATLAS, cardiac=[0.2, 0.3, 0.9, 0.9])
    m = tiny(anatomical_prior='strict', atlas=atlas).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / 'ckpt.safetensors', m, dict(iter_num=1))
    tensors, meta = read_checkpoint(tmp_path)
    assert meta['model_config']['anatomical_prior'] == 'strict' and meta['model_config']['atlas'] == atlas
    # the bias is built from the config, not saved: the checkpoint has the keys a model without a prior has
    assert not [k for k in tensors if 'prior' in k] and set(tensors) == set(checkpoint_state_dict(tiny()))
    m2, _ = load_checkpoint(tmp_path)
    assert m2.cfg.anatomical_prior == 'strict' and m2.cfg.atlas == atlas
    assert torch.equal(m2.attention_prior, m.attention_prior)
    x = batch()[0]
    with torch.no_grad():
        a, b = m.encode(x, return_attention=True), m2.encode(x, return_attention=True)
    torch.testing.assert_close(a['visual_tokens'], b['visual_tokens'])
    assert torch.equal(a['attention'] == 0, b['attention'] == 0)
    # weights of a model without a prior load into one with it, and back
    load_weights(tiny(anatomical_prior='soft'), {k: v for k, v in tensors.items() if '/' not in k}, 'ckpt')
    # a checkpoint from before the priors (no such keys in its config) loads as 'none'
    cfg = dict(meta['model_config'])
    del cfg['anatomical_prior'], cfg['atlas']
    assert CheXQueryConfig(**cfg).anatomical_prior == 'none'


def test_train_carries_the_prior_from_phase_1_to_phases_2_and_3(phantom_dir, tmp_path, atlas_file):
    atlas = dict(ATLAS, spine=[0.4, 0.05, 0.6, 0.95])
    path = atlas_file(atlas)
    common = dict(max_iters=1, full_backbones=False, warmup_iters=0, sample_reports=0, eval_iters=1)
    outs = [str(tmp_path / f'p{i}') for i in (1, 2, 3)]
    code, printed = train_in_process(phantom_dir, outs[0], phase=1, anatomical_prior='strict',
                                     anatomical_atlas=path, **common)
    assert code == 0, printed[-3000:]
    for phase in (2, 3):
        code, printed = train_in_process(phantom_dir, outs[phase - 1], phase=phase, lambda_aux=0.5 if phase == 2 else 0,
                                         init_from=f'{outs[phase - 2]}/ckpt.safetensors', **common)
        assert code == 0, printed[-3000:]
    for out in outs:
        meta = read_checkpoint(out)[1]
        assert meta['model_config']['anatomical_prior'] == 'strict' and meta['model_config']['atlas'] == atlas
        assert meta['config']['anatomical_prior'] == 'strict'
    with pytest.raises(ValueError, match="bad.json: region 'cardiac'"):
        train_in_process(phantom_dir, str(tmp_path / 'bad'), anatomical_prior='soft', **common,
                         anatomical_atlas=atlas_file(dict(ATLAS, cardiac=[0.9, 0.3, 0.2, 0.8]), 'bad.json'))
    with pytest.raises(ValueError, match="'loose'"):
        train_in_process(phantom_dir, str(tmp_path / 'bad'), anatomical_prior='loose', **common)


def test_attention_grid_draws_each_anatomical_querys_box_when_a_prior_is_on():
    """20 panels of cell x cell; with an atlas, each anatomical query's panel gets its region's
    box outline and nothing else changes."""
    from PIL import Image
    from heatmaps import attention_grid
    cell, header = 96, 24
    image, attention = Image.new('L', (64, 64), 128), np.random.default_rng(0).random((20, 64))
    boxed = np.asarray(attention_grid(image, attention, 0.5, 't', cell, prior='strict', atlas=ATLAS)).astype(int)
    plain = np.asarray(attention_grid(image, attention, 0.5, 't', cell, prior='strict')).astype(int)
    assert boxed.shape == plain.shape == (header + 4 * (14 + cell), 5 * cell, 3)
    drawn = (boxed != plain).any(-1)
    for q in range(20):
        top, left = header + (q // 5) * (14 + cell) + 14, (q % 5) * cell  # the map below its 14 px label
        panel = drawn[top:top + cell, left:left + cell].copy()
        drawn[top:top + cell, left:left + cell] = False
        if q < C:
            assert not panel.any(), q
            continue
        ys, xs = np.nonzero(panel)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        box = np.array(ATLAS[REGIONS[q - C]]) * cell
        assert np.abs(np.array([x0, y0, x1, y1]) - box).max() <= 1, (REGIONS[q - C], (x0, y0, x1, y1), box)
        outline = np.zeros_like(panel)
        outline[y0:y1 + 1, x0:x1 + 1] = True
        outline[y0 + 1:y1, x0 + 1:x1] = False
        assert np.array_equal(panel, outline), REGIONS[q - C]  # the box's outline, one pixel wide
    assert not drawn.any()  # nothing outside the maps
