"""sample.py: a bad file is named once and the others still run, a wrong path fails before a
model loads, the whole run in-process on an untrained checkpoint; slow: on a trained tiny
phantom checkpoint, reports and sorted probabilities for PNG and JPEG files of any mode and
size, --json, attention grids."""
import json
import re
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sample
from chexpert import CONDITIONS
from checkpoint import decision_thresholds, read_checkpoint
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


def test_a_bad_file_is_reported_in_load_images_words_and_the_others_still_load(phantom_dir, tmp_path, capsys):
    """Issue 19: sample.py once prefixed the file's name to a message that already held it."""
    import data
    d = image_dir(phantom_dir, tmp_path)
    bad = [str(d / 'f_broken.png'), str(d / 'missing.png')]
    loaded = sample.read_images(sample.list_images(str(d)) + bad[1:])
    assert [os.path.basename(f) for f, _ in loaded] == ['a_gray.png', 'b_rgb.jpg', 'c_palette.png', 'd_16bit.png',
                                                        'e_rgba.png']
    assert all(im.mode == 'RGB' for _, im in loaded)
    lines = capsys.readouterr().err.strip().split('\n')
    assert len(lines) == 2
    for line, path in zip(lines, bad):
        with pytest.raises(ValueError) as e:
            data.load_image(path)
        assert line.count(path) == str(e.value).count(path) >= 1  # named, and sample.py adds no name of its own
    assert lines[1].count('missing.png') == 1


def test_an_unidentifiable_file_is_named_once(tmp_path, capsys):
    (tmp_path / 'f_broken.png').write_bytes(b'this is not an image')
    assert sample.read_images([str(tmp_path / 'f_broken.png')]) == []
    assert capsys.readouterr().err.count('f_broken.png') == 1


def test_a_wrong_images_path_fails_before_a_model_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, 'images', str(tmp_path / 'nothing'))
    monkeypatch.setattr(sample, 'out_dir', str(tmp_path / 'no-run'))  # would fail too, later
    with pytest.raises(FileNotFoundError, match='nothing'):
        sample.main()
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='empty'):
        sample.list_images(str(tmp_path / 'empty'))


def test_main_in_process_reports_each_readable_image_and_fails_for_the_bad_one(random_run, phantom_dir, tmp_path,
                                                                                monkeypatch, capsys):
    d = image_dir(phantom_dir, tmp_path)
    for k, v in dict(out_dir=random_run, images=str(d), json=True, attention_dir=str(tmp_path / 'attn'), batch_size=4,
                     num_beams=1, max_length=8, min_length=1).items():
        monkeypatch.setattr(sample, k, v)
    with pytest.raises(SystemExit) as e:
        sample.main()
    assert e.value.code == 1
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.strip().split('\n')]
    assert [os.path.basename(r['image']) for r in records] == ['a_gray.png', 'b_rgb.jpg', 'c_palette.png',
                                                               'd_16bit.png', 'e_rgba.png']
    assert all(set(r['probabilities']) == set(CONDITIONS) and os.path.exists(r['attention_png']) for r in records)
    assert 'f_broken.png' in err


@pytest.mark.slow
def test_reports_probabilities_and_a_bad_file(tiny_run, phantom_dir, tmp_path):
    d = image_dir(phantom_dir, tmp_path)
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={d}', '--num_beams=2', '--max_length=60',
                   '--min_length=5', check=False)
    assert r.returncode == 1  # a file failed...
    assert 'f_broken.png' in r.stderr and '1 of 6' in r.stderr
    blocks = r.stdout.split('== ')[1:]  # ...and the other five were still processed
    assert [b.split('\n')[0].rsplit('/', 1)[-1] for b in blocks] == \
        ['a_gray.png', 'b_rgb.jpg', 'c_palette.png', 'd_16bit.png', 'e_rgba.png']
    meta = read_checkpoint(os.path.join(tiny_run, 'ckpt.safetensors'))[1]
    assert meta['thresholds'] is not None  # chosen on val by train.py
    thresholds = dict(zip(CONDITIONS, decision_thresholds(meta)[0]))  # 0.5 where val had one class
    for b in blocks:
        lines = b.strip().split('\n')
        assert lines[1].startswith('Findings:')
        rows = [re.fullmatch(r'  ([* ]) (\d\.\d{3})  (.+) \(threshold (\d\.\d{3})\)', line).groups() for line in lines[3:17]]
        assert sorted(name for _, _, name, _ in rows) == sorted(CONDITIONS)
        assert [float(p) for _, p, _, _ in rows] == sorted((float(p) for _, p, _, _ in rows), reverse=True)
        # each condition at the threshold the checkpoint chose for it on val, not at 0.5
        assert all(float(t) == round(thresholds[name], 3) for _, _, name, t in rows)
        assert all((mark == '*') == (float(p) >= thresholds[name] - 5e-4) for mark, p, name, _ in rows
                   if abs(float(p) - thresholds[name]) > 5e-4)


@pytest.mark.slow
def test_json_and_attention_grids(tiny_run, phantom_dir, tmp_path):
    d = image_dir(phantom_dir, tmp_path)
    (d / 'f_broken.png').unlink()
    attn = tmp_path / 'attn'
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={d}', '--json', f'--attention_dir={attn}',
                   '--num_beams=1', '--max_length=40', '--min_length=1', '--threshold=0.3')
    records = [json.loads(line) for line in r.stdout.strip().split('\n') if line.startswith('{')]
    assert len(records) == 5
    for rec in records:
        assert rec['report'].startswith('Findings:') and set(rec['thresholds'].values()) == {0.3}
        assert rec['thresholds_from'] == records[0]['thresholds_from'] and '0.3' in rec['thresholds_from']
        assert set(rec['probabilities']) == set(CONDITIONS) and 0 <= rec['gate'] <= 1
        assert rec['present'] == [c for c, p in rec['probabilities'].items() if p >= 0.3]
        with Image.open(rec['attention_png']) as im:
            assert im.size == (5 * 160, 4 * 174 + 24)
            assert np.asarray(im).std() > 10  # drawn, not blank
    # the same image in different modes gives the same aux probabilities (up to JPEG loss)
    p = {os.path.basename(rec['image']): np.array(list(rec['probabilities'].values())) for rec in records}
    assert np.abs(p['a_gray.png'] - p['c_palette.png']).max() < 1e-4
    assert np.abs(p['a_gray.png'] - p['e_rgba.png']).max() < 1e-4


@pytest.mark.slow
def test_missing_images_argument_is_a_clear_error(tiny_run, tmp_path):
    r = run_script('sample.py', f'--out_dir={tiny_run}', f'--images={tmp_path}/nothing', check=False)
    assert r.returncode != 0 and 'nothing' in r.stderr and 'no such file or directory' in r.stderr


@pytest.mark.slow
def test_load_model_folds_lora_into_the_weights(tiny_run):
    """sample.py and eval.py generate from merged weights: the same outputs, no adapter cost."""
    import torch
    import lora
    from checkpoint import load_checkpoint
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


def test_what_is_not_a_regular_file_is_skipped_and_the_rest_of_its_batch_still_runs(random_run, phantom_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """Issue 26: a FIFO named x.png in --images blocked for ever, and the good images of its batch
    were never printed. Each kind is named; the good ones are reported."""
    from conftest import NeverOpened, special_files
    d = image_dir(phantom_dir, tmp_path)
    (d / 'f_broken.png').unlink()
    special = special_files(d)
    for k, v in dict(out_dir=random_run, images=str(d), json=True, batch_size=8, num_beams=1, max_length=8,
                     min_length=1).items():
        monkeypatch.setattr(sample, k, v)
    with NeverOpened(special[:1]) as guard, pytest.raises(SystemExit) as e:
        sample.main()
    assert guard.released == 0 and e.value.code == 1
    out, err = capsys.readouterr()
    assert sorted(os.path.basename(json.loads(line)['image']) for line in out.strip().split('\n')) == \
        ['a_gray.png', 'b_rgb.jpg', 'c_palette.png', 'd_16bit.png', 'e_rgba.png']
    assert all(path in err for path in special)
    monkeypatch.setattr(sample, 'images', special[0])  # named on its own
    with NeverOpened(special[:1]) as guard, pytest.raises(SystemExit):
        sample.main()
    assert guard.released == 0 and 'FIFO' in capsys.readouterr().err


def grids(records, root):
    """{image relative to root: the name of its grid}."""
    return {os.path.relpath(r['image'], root): os.path.basename(r['attention_png']) for r in records}


def test_attention_grids_of_images_with_the_same_name_never_replace_each_other(random_run, phantom_dir, tmp_path,
                                                                               monkeypatch, capsys):
    """Issue 26: x.png, x.jpg and x.dcm all wrote x_attention.png (197 records, 194 files)."""
    src = Image.open(image_dir(phantom_dir, tmp_path) / 'a_gray.png')
    for d in ('in1', 'in2'):
        (tmp_path / d).mkdir()
        src.save(tmp_path / d / 'x.png')
    src.convert('RGB').save(tmp_path / 'in1' / 'x.jpg')
    src.convert('RGB').save(tmp_path / 'in1' / 'x.jpeg')
    attn = tmp_path / 'attn'

    def run(images):
        for k, v in dict(out_dir=random_run, images=str(images), json=True, attention_dir=str(attn), num_beams=1,
                         max_length=8, min_length=1).items():
            monkeypatch.setattr(sample, k, v)
        sample.main()
        return [json.loads(line) for line in capsys.readouterr().out.strip().split('\n')]

    first = run(tmp_path / 'in1')
    assert grids(first, tmp_path) == {'in1/x.jpeg': 'x.jpeg_attention.png', 'in1/x.jpg': 'x.jpg_attention.png',
                            'in1/x.png': 'x.png_attention.png'}
    other = run(tmp_path / 'in2' / 'x.png')  # the same name from another directory: a grid of its own
    assert grids(other, tmp_path) == {'in2/x.png': 'x.png_attention-2.png'}
    assert grids(run(tmp_path / 'in1'), tmp_path) == grids(first, tmp_path)  # a rerun replaces its own grids, and only those
    assert sorted(os.listdir(attn)) == ['x.jpeg_attention.png', 'x.jpg_attention.png', 'x.png_attention-2.png',
                                        'x.png_attention.png']
    written = {}  # two inputs of one run with the same name
    assert [sample.grid_path(str(attn), str(tmp_path / d / 'y.png'), written)[0] for d in ('in1', 'in2')] == \
        [str(attn / 'y.png_attention.png'), str(attn / 'y.png_attention-2.png')]
