"""data.py: reading prepared splits, images of every mode, every kind of bad input,
transforms, tokens and batches (prepare.py's preparation is tested in test_prepare.py)."""
import numpy as np
import pytest
import torch
from PIL import Image

import data

pytestmark = pytest.mark.usefixtures('one_thread')


# --- bad split files ------------------------------------------------------------------
def test_bad_split_file_names_file_and_line(tmp_path):
    (tmp_path / 'train.jsonl').write_text('{"id": "a", "image": "a.png", "report": "r", "labels": []}\n')
    with pytest.raises(ValueError, match=r'train\.jsonl:1: .*14 labels'):
        data.read_split(str(tmp_path), 'train')
    (tmp_path / 'val.jsonl').write_text('\n{not json\n')
    with pytest.raises(ValueError, match=r'val\.jsonl:2:'):
        data.read_split(str(tmp_path), 'val')
    with pytest.raises(FileNotFoundError, match=r'test\.jsonl.*prepare\.py'):  # how to make it
        data.read_split(str(tmp_path), 'test')


# --- images ---------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['L', 'I;16', 'I', 'F', 'RGB', 'RGBA', 'LA', 'P'])
def test_load_image_any_mode(tmp_path, mode):
    gray = np.tile(np.linspace(0, 255, 40, dtype=np.float64), (30, 1))  # dark left, bright right
    if mode == 'I;16':
        im = Image.fromarray((gray * 16).astype(np.uint16))  # 12-bit values, as many radiographs store them
    elif mode in ('I', 'F'):
        im = Image.fromarray(gray.astype(np.int32 if mode == 'I' else np.float32))
    else:
        im = Image.fromarray(gray.astype(np.uint8)).convert(mode)
    path = tmp_path / f"x.{'tiff' if mode in ('I', 'F') else 'png'}"
    im.save(path)
    rgb = data.load_image(str(path))
    assert rgb.mode == 'RGB' and rgb.size == (40, 30)
    a = np.asarray(rgb).astype(int)
    assert a[:, -1].mean() > 240 and a[:, 0].mean() < 15  # the full range survives, not clipped or flattened


def test_bad_images_are_errors_naming_the_file(tmp_path, monkeypatch):
    cases = {'missing.png': None, 'empty.png': b'', 'text.png': b'just some text, not an image'}
    good = tmp_path / 'good.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    cases['truncated.png'] = good.read_bytes()[:200]
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            data.load_image(str(tmp_path / name))
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 64x64 = 4096 px is a "bomb" now
    with pytest.raises(ValueError, match='good.png.*(decompression|pixels)'):
        data.load_image(str(good))


def lopsided_image(path, size=96):
    a = np.zeros((size, size), np.uint8)
    a[:, : size // 2] = 230  # bright on the image's left only
    Image.fromarray(a).save(path)


def test_train_transform_never_flips(tmp_path):
    t = data.train_transform(64)
    lopsided_image(tmp_path / 'a.png')
    im = data.load_image(str(tmp_path / 'a.png'))
    for s in range(200):
        torch.manual_seed(s)
        x = t(im)
        assert x.shape == (3, 64, 64)
        assert x[:, :, :24].mean() > x[:, :, -24:].mean() + 1.0  # the bright side stays on the left


def test_augment_draws_per_image_and_stays_small(tmp_path):
    lopsided_image(tmp_path / 'a.png')
    x = data.eval_transform(64)(data.load_image(str(tmp_path / 'a.png')))
    batch = x[None].repeat(8, 1, 1, 1)                              # (8, 3, 64, 64): one image 8 times
    out = data.augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    assert len({tuple(o.flatten()[::97].tolist()) for o in out}) == 8  # each copy its own draw
    assert torch.equal(out, data.augment(batch, torch.Generator().manual_seed(0)))
    assert (out - batch).abs().mean() < 0.3                           # a few pixels and percent, not another image
    edge = lambda image: (image[0, 16:48, 8:56] > 0).float().argmin(-1).float().median()  # where the bright half ends
    for o in out:  # away from the borders, which a shift blackens; mid-height, where a 5 degree tilt moves it 2 px
        assert (edge(o) - edge(x)).abs() <= 6


def test_augment_fills_black_and_moves_and_recolours_a_few_percent():
    S = 64
    plain = torch.full((64, 3, S, S), 0.5)                             # [0, 1] pixels: one grey value
    square = torch.zeros(64, 3, S, S)
    square[..., 24:40, 24:40] = 1.0                                    # a white square on black, centred
    normalize = lambda x: (x - 0.5) / 0.5                              # data.MEAN = data.STD = 0.5
    g = torch.Generator().manual_seed(0)
    grey, moved = (data.augment(normalize(x), g) * 0.5 + 0.5 for x in (plain, square))  # back to [0, 1]
    inside = grey[..., 16:48, 16:48]                                   # never reached by the border
    assert inside.min() > 0.5 * 0.95 * 0.95 - 1e-4 and inside.max() < 0.5 * 1.05 * 1.05 + 1e-4
    assert inside.mean((1, 2, 3)).std() > 0.005                        # each image its own brightness
    border = grey[grey < 0.4]                                          # what rotation and shift uncover
    assert border.numel() > 0 and border.max() < 0.05                  # black (then jittered), not grey
    coords = torch.arange(S, dtype=torch.float32)
    mass = moved[:, 0]
    centre_x = (mass.sum(1) * coords).sum(-1) / mass.sum((1, 2)) - 31.5   # the square's centre, from the image's
    centre_y = (mass.sum(2) * coords).sum(-1) / mass.sum((1, 2)) - 31.5
    shift = torch.stack([centre_x, centre_y]).abs()
    assert shift.max() <= 0.03 * S * 1.05 + 0.5 and shift.max() > 0.015 * S  # up to 3% of the side, and it moves


def test_eval_transform_is_deterministic_and_normalized(tmp_path):
    lopsided_image(tmp_path / 'a.png')
    im = data.load_image(str(tmp_path / 'a.png'))
    a, b = data.eval_transform(48)(im), data.eval_transform(48)(im)
    assert a.shape == (3, 48, 48) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.75  # mean = std = 0.5


# --- tokens and batches ----------------------------------------------------------------
@pytest.fixture(scope='module')
def tok(phantom_dir):
    return data.load_tokenizer(phantom_dir)


def test_encode_report(tok):
    report = 'Findings: The heart is normal. | Impression: No acute disease.'
    dec, labels, weights = data.encode_report(tok, 'Findings:', report, max_len=256)
    p = tok('Findings:', add_special_tokens=False)['input_ids']
    assert len(dec) == len(labels) and dec[0] == 0
    assert labels[:len(p)] == [-100] * len(p) and -100 not in labels[len(p):]
    assert labels[-1] == tok.eos_token_id
    assert dec[1:] == p + labels[len(p):-1]  # the decoder input is the target shifted right
    assert tok.decode(labels[len(p):], skip_special_tokens=True) == report[len('Findings: '):]
    assert weights is None  # finding_weight 1: every target token counts alike, the plain mean
    assert data.prompt_ids(tok, 'Findings:') == dec[:len(p) + 1]
    short, short_labels, _ = data.encode_report(tok, 'Findings:', report, max_len=6)
    assert len(short) == 6 and short_labels[-1] == tok.eos_token_id


def test_load_tokenizer_offline_hub_name_says_how_to_fix():
    with pytest.raises(OSError, match='--tokenizer='):  # how to fix it
        data.load_tokenizer('no-such-org/no-such-tokenizer')


def test_dataset_items_and_batches(phantom_dir, tok):
    from chexpert import binarize
    ds = data.ReportDataset(phantom_dir, 'train', tok, 64, train=True)
    item = ds[3]
    assert item['image'].shape == (3, 64, 64) and item['cond_labels'].shape == (14,)
    assert item['cond_labels'].dtype == torch.float32
    assert item['cond_labels'].tolist() == binarize(ds.records[3]['labels'], 'positive')
    b = data.collate([ds[i] for i in range(5)])
    T = max(len(ds[i]['labels']) for i in range(5))
    assert b['image'].shape == (5, 3, 64, 64) and b['labels'].shape == (5, T) and b['skipped'] == 0
    assert b['decoder_input_ids'].shape == (5, T) and b['cond_labels'].shape == (5, 14)
    shortest = min(range(5), key=lambda i: len(ds[i]['labels']))
    n = len(ds[shortest]['labels'])
    if n < T:
        assert (b['labels'][shortest, n:] == -100).all() and (b['decoder_input_ids'][shortest, n:] == 0).all()
    # DistributedSampler: two ranks share the data without overlap
    ranks = [list(torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0))
             for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == len(ds)


def test_bad_image_in_training_is_skipped_warned_once_and_counted(phantom_dir, tok, tmp_path, capsys):
    import shutil
    d = tmp_path / 'copy'
    shutil.copytree(phantom_dir, d)
    ds = data.ReportDataset(str(d), 'val', tok, 64)
    bad = d / ds.records[1]['image']
    bad.write_bytes(b'')
    assert ds[1] is None and ds[1] is None
    err = capsys.readouterr().err
    assert err.count(ds.records[1]['image']) == 1  # one warning naming the file
    b = data.collate([ds[0], ds[1], ds[2]])
    assert b['skipped'] == 1 and len(b['ids']) == 2 and b['image'].shape[0] == 2
    assert data.collate([None, None]) is None


def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    """Issue 26: opening a FIFO named x.png waited for a writer for ever."""
    from conftest import NeverOpened, special_files
    paths = special_files(tmp_path)
    with NeverOpened(paths[:1]) as guard:
        for path, kind in zip(paths, ('FIFO', 'directory', 'Too many levels of symbolic links', 'character device',
                                      'socket')):
            with pytest.raises(ValueError, match=rf'{path}: .*{kind}'):
                data.load_image(path)
    assert guard.released == 0
    assert data.file_problem(str(tmp_path / 'missing.png')) == 'image file not found'
    Image.new('L', (8, 8)).save(tmp_path / 'fine.png')
    assert data.file_problem(str(tmp_path / 'fine.png')) is None
