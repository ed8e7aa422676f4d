"""sample.py on a tiny phantom checkpoint: reports and sorted probabilities for PNG and
JPEG files of any mode and size, --json, attention grids, and a bad file that is
reported while the others still run."""
import json
import os
import shutil

import numpy as np
from PIL import Image

from chexpert import CONDITIONS
from conftest import run_script


def image_dir(phantom_dir, tmp_path):
    d = tmp_path / 'images'
    d.mkdir()
    with open(os.path.join(phantom_dir, 'test.jsonl')) as f:
        first = json.loads(f.readline())
    src = Image.open(os.path.join(phantom_dir, first['image']))
    shutil.copy(os.path.join(phantom_dir, first['image']), d / 'a_gray.png')
    src.convert('RGB').resize((300, 260)).save(d / 'b_rgb.jpg')                         # JPEG, another size
    src.convert('P').save(d / 'c_palette.png')
    Image.fromarray((np.asarray(src.convert('L'), dtype=np.uint16) * 200)).save(d / 'd_16bit.png')  # I;16
    src.convert('RGBA').save(d / 'e_rgba.png')
    (d / 'f_broken.png').write_bytes(b'this is not an image')
    return d


def test_reports_probabilities_and_a_bad_file(tiny_run, phantom_dir, tmp_path):
    d = image_dir(phantom_dir, tmp_path)
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={d}', '--num_beams=2', '--max_length=60',
                   '--min_length=5', check=False)
    assert r.returncode == 1  # a file failed...
    assert 'f_broken.png' in r.stderr and '1 of 6 files could not be read' in r.stderr
    blocks = r.stdout.split('== ')[1:]  # ...and the other five were still processed
    assert [b.split('\n')[0].rsplit('/', 1)[-1] for b in blocks] == \
        ['a_gray.png', 'b_rgb.jpg', 'c_palette.png', 'd_16bit.png', 'e_rgba.png']
    for b in blocks:
        lines = b.strip().split('\n')
        assert lines[1].startswith('Findings:')
        assert lines[2] == 'conditions (threshold 0.5):'
        rows = [(line[2], float(line[4:9]), line[11:]) for line in lines[3:17]]  # '  * 0.734  Edema'
        assert sorted(name for _, _, name in rows) == sorted(CONDITIONS)
        assert [p for _, p, _ in rows] == sorted((p for _, p, _ in rows), reverse=True)
        assert all((mark == '*') == (p >= 0.5) for mark, p, _ in rows)


def test_json_and_attention_grids(tiny_run, phantom_dir, tmp_path):
    d = image_dir(phantom_dir, tmp_path)
    (d / 'f_broken.png').unlink()
    attn = tmp_path / 'attn'
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={d}', '--json', f'--attention_dir={attn}',
                   '--num_beams=1', '--max_length=40', '--min_length=1', '--threshold=0.3')
    records = [json.loads(line) for line in r.stdout.strip().split('\n') if line.startswith('{')]
    assert len(records) == 5
    for rec in records:
        assert rec['report'].startswith('Findings:') and rec['threshold'] == 0.3
        assert set(rec['probabilities']) == set(CONDITIONS) and 0 <= rec['gate'] <= 1
        assert rec['present'] == [c for c, p in rec['probabilities'].items() if p >= 0.3]
        with Image.open(rec['attention_png']) as im:
            assert im.size == (5 * 160, 4 * 174 + 24)
            assert np.asarray(im).std() > 10  # drawn, not blank
    # the same image in different modes gives the same aux probabilities (up to JPEG loss)
    p = {os.path.basename(rec['image']): np.array(list(rec['probabilities'].values())) for rec in records}
    assert np.abs(p['a_gray.png'] - p['c_palette.png']).max() < 1e-4
    assert np.abs(p['a_gray.png'] - p['e_rgba.png']).max() < 1e-4


def test_missing_images_argument_is_a_clear_error(tiny_run, tmp_path):
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={tmp_path}/nothing', check=False)
    assert r.returncode != 0 and 'nothing' in r.stderr and 'no such file or directory' in r.stderr


def test_load_model_folds_lora_into_the_weights(tiny_run):
    """sample.py and eval.py generate from merged weights: the same outputs, no adapter cost."""
    import torch
    import lora
    from chexquery import load_checkpoint
    merged, _ = load_checkpoint(tiny_run, merge_lora=True)
    plain, _ = load_checkpoint(tiny_run)
    layers = lora.lora_layers(merged)
    assert layers and all(layer.merged for layer in layers)
    assert all(layer.lora_B.abs().sum() > 0 for layer in layers)  # trained adapters: merging changed W
    S = merged.cfg.image_size
    images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged.encode(images), plain.encode(images)
    torch.testing.assert_close(a['visual_tokens'], b['visual_tokens'], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a['cond_logits'], b['cond_logits'], atol=1e-4, rtol=1e-4)
    kw = dict(num_beams=2, min_length=5, max_length=30)
    assert torch.equal(merged.generate(images, [0], **kw), plain.generate(images, [0], **kw))
