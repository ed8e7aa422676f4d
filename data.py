"""
What training and inference read: images (DICOM too) and their transforms, the tokenizer,
the decoder's prompt, and a prepared directory's splits as batches (ReportDataset, collate).

A prepared directory holds train/val/test.jsonl (one record per frontal image: id, uid,
image, findings, impression, report, indication, labels, label_source), resized image
copies under images_<short_side>/ and a manifest.json; prepare.py writes it from a raw
download, and ReportDataset reads it, whichever dataset made it. `python data.py
--dataset=...` runs prepare.py's command line.
"""
import hashlib
import json
import os
import stat
import sys
import warnings

import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from chexpert import CONDITIONS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image
MEAN = STD = (0.5, 0.5, 0.5)             # SigLIP's normalization


# --- images ----------------------------------------------------------------------
DICOM_EXTENSIONS = ('.dcm', '.dicom')
# stat's tests of the kinds of file that are not regular files, and their names
SPECIAL_FILES = ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO (named pipe)'), (stat.S_ISSOCK, 'a socket'),
                 (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))


def file_problem(path):
    """Why `path` cannot be read as an image file, or None when it is a regular file (a symlink
    is followed). Asked of the file's stat before anything opens it: opening a FIFO waits for
    a writer forever, and a device or a directory is never an image."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return 'image file not found'
    except OSError as e:  # a symlink loop, no permission, a name too long
        return f"cannot be opened ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in SPECIAL_FILES if test(mode)), 'not a regular file') + ', not an image file'


def image_files(directory, extensions):
    """The paths of a directory's entries whose names end in one of `extensions` (any case),
    sorted; whether each is a readable file is left to its reader (file_problem)."""
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.lower().endswith(extensions))


def load_image(path):
    """An RGB PIL image from any common mode (L, I;16, I, F, RGB, RGBA, LA, P), or from a
    DICOM file (.dcm, or any file with DICOM's 'DICM' preamble; needs pydicom).
    Raises ValueError naming the file for anything unreadable, and for anything that is not
    a regular file (a FIFO, a directory, ...) before opening it."""
    problem = file_problem(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if str(path).lower().endswith(DICOM_EXTENSIONS):
        return load_dicom(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit: make every bomb an error
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except UnidentifiedImageError:
        if is_dicom(path):  # hospital exports often carry no extension
            return load_dicom(path)
        raise ValueError(f"{path}: not a readable image ({unreadable_reason(path, 'cannot identify image file')})") \
            from None
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: not a readable image ({unreadable_reason(path, e)})") from None


def unreadable_reason(path, e):
    # PIL's own message names the file again: the error says it once
    if os.path.exists(path) and os.path.getsize(path) == 0:
        return 'empty (0 bytes)'
    return str(e).replace(f" '{path}'", '').replace(f' {path!r}', '')


def is_dicom(path):
    """Whether the file starts with DICOM's 128-byte preamble and 'DICM'."""
    try:
        with open(path, 'rb') as f:
            return f.read(132)[128:] == b'DICM'
    except OSError:
        return False


def load_dicom(path):
    """A DICOM radiograph as an RGB PIL image, as a viewer would show it: the modality LUT
    (or rescale) and the first VOI window (or VOI LUT) applied, then min-max scaled to 8 bits
    (12 to 16-bit data; 8-bit data already in 0..255 is kept), MONOCHROME1 inverted so bone is
    white. The first frame of a multi-frame file. Raises ImportError without pydicom, and
    ValueError naming the file for anything pydicom can't read or decode (a compressed transfer
    syntax without its decoder plugin, no pixel data, ...)."""
    import numpy as np
    try:
        import pydicom
    except ImportError:
        raise ImportError(f"{path}: reading DICOM files needs pydicom, which is not installed: "
                          f"pip install pydicom") from None
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > Image.MAX_IMAGE_PIXELS:  # the same bomb limit as PIL's, checked before decoding
            raise ValueError(f"{rows} x {cols} pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS} "
                             f"(a decompression bomb?)")
        a = ds.pixel_array
        if int(ds.get('NumberOfFrames', 1) or 1) > 1:
            a = a[0]
        bits = int(ds.get('BitsStored', 8))
        photometric = str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).upper()
        if int(ds.get('SamplesPerPixel', 1)) == 1:
            a = apply_voi_lut(apply_modality_lut(a, ds), ds)
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except Exception as e:  # pydicom's errors are of many types; each makes this file unreadable
        reason = unreadable_reason(path, f"{type(e).__name__}: {' '.join(str(e).split())}")  # one line
        raise ValueError(f"{path}: not a readable DICOM image ({reason})") from None
    a = np.asarray(a, dtype=np.float64)
    if bits > 8 or a.min() < 0 or a.max() > 255:
        a = stretch_to_8bit(a)  # min-max of the windowed signal
    if photometric == 'MONOCHROME1':  # 0 is white in MONOCHROME1
        a = 255.0 - a
    return Image.fromarray(a.round().astype(np.uint8)).convert('RGB')  # (H, W) -> L, (H, W, 3) -> RGB


def stretch_to_8bit(a):
    """min..max of an array to 0..255 (floats): all of the signal kept, none clipped at 255
    as PIL's convert('L') would; a flat image is 0."""
    import numpy as np
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)


def to_rgb(im):
    if im.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):  # 16-bit and float radiographs
        import numpy as np
        a = stretch_to_8bit(np.asarray(im, dtype=np.float32))
        im = Image.fromarray(a.round().astype(np.uint8), 'L')
    if im.mode in ('RGBA', 'LA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        flat = Image.new('RGBA', im.size, (0, 0, 0, 255))  # transparent = black, like air on a film
        im = Image.alpha_composite(flat, im)
    return im.convert('RGB')


def train_transform(size):
    """The methodology's augmentations, exactly: no horizontal flip, ever (it would put
    the heart on the wrong side and make 'left'/'right' in reports wrong)."""
    from torchvision import transforms as T
    return T.Compose([
        T.Resize((size, size), antialias=True),
        T.RandomRotation(5),
        T.RandomAffine(degrees=0, translate=(0.03, 0.03), scale=(0.97, 1.03)),
        T.ColorJitter(brightness=0.05, contrast=0.05),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def eval_transform(size):
    from torchvision import transforms as T
    return T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])


# --- tokens ----------------------------------------------------------------------
def load_tokenizer(name_or_dir):
    """The phantom set's own tokenizer.json, or a Hugging Face tokenizer by hub name or local dir."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path = os.path.join(name_or_dir, 'tokenizer.json')
    if os.path.isfile(path) and not os.path.isfile(os.path.join(name_or_dir, 'tokenizer_config.json')):
        return PreTrainedTokenizerFast(tokenizer_file=path, pad_token='<pad>', eos_token='</s>', unk_token='<unk>')
    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the tokenizer {name_or_dir!r}: {e}\nOffline, or no such hub name? "
                      f"Download it once (e.g. huggingface-cli download google/flan-t5-base) and pass "
                      f"--tokenizer=/path/to/local/dir") from None


def run_tokenizer(config):
    """The tokenizer of a training run, from its config: `tokenizer` when given, else the
    tiny model's data set's own (tokenizer.json), else the text model's."""
    if config.get('tokenizer'):
        return load_tokenizer(config['tokenizer'])
    return load_tokenizer(config['data_dir'] if config['model_size'] == 'tiny' else config['text_model'])


def tokenizer_meta(tok):
    """What a checkpoint records of its run's tokenizer, for check_tokenizer: the vocabulary's
    size, its special ids and a digest of the whole vocabulary."""
    vocab = json.dumps(sorted(tok.get_vocab().items()))
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                vocab_sha256=hashlib.sha256(vocab.encode()).hexdigest()[:16])


def check_tokenizer(tok, decoder_config, source, saved=None):
    """Raises ValueError saying what differs when tok cannot drive a T5 decoder (its config:
    every id within the embedding's rows, pad = decoder start, eos) or is not the tokenizer
    a checkpoint was trained with (saved: its tokenizer_meta). source names the checkpoint."""
    c = decoder_config
    problems = []
    if len(tok) > c.vocab_size:
        problems.append(f"the tokenizer has {len(tok)} tokens but the decoder's embedding has {c.vocab_size} rows")
    for what, mine, theirs in (('pad id', tok.pad_token_id, c.pad_token_id),
                               ('pad id (the decoder start)', tok.pad_token_id, c.decoder_start_token_id),
                               ('eos id', tok.eos_token_id, c.eos_token_id)):
        if mine != theirs:
            problems.append(f"the tokenizer's {what} is {mine}, the decoder's {theirs}")
    now = tokenizer_meta(tok)
    for key, value in (saved or {}).items():
        if now.get(key) != value:
            problems.append(f"{key} {now.get(key)} here, {value} in the tokenizer it was trained with")
    if problems:
        raise ValueError(f"{source}: the tokenizer does not fit: {'; '.join(problems)}. Use the tokenizer it "
                         f"was trained with (--tokenizer=DIR, or the data_dir whose tokenizer.json it used)")


# --- the decoder's prompt: the target section and the clinical context ---------------------
TARGETS = ('both', 'findings', 'impression')
MAX_CONTEXT_TOKENS = 64  # an indication is cut here, so a long history cannot crowd out the report


def section_prompt(target):
    """The prompt that starts the report: the first section's label. The loss ignores it."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return 'Impression:' if target == 'impression' else 'Findings:'


def target_text(record, target):
    """What the decoder learns to write for a record: the whole report, or one section with
    its label; '' when that section is empty (the study then has no place in that mode)."""
    if target == 'both':
        return record['report']
    text = (record.get(target) or '').strip()
    return f"{section_prompt(target)} {text}" if text else ''


def prompt_tokens(tok, prompt, indication=''):
    """The prompt's token ids: 'Indication: <text>.' (cut to MAX_CONTEXT_TOKENS) ahead of the
    section prompt when there is an indication, else the section prompt alone. With the T5
    encoder deleted, the decoder reads the indication through its own causal self-attention
    as the first tokens of the text; its cross-attention sees only the 11 visual tokens."""
    ids = tok(prompt, add_special_tokens=False)['input_ids']
    text = ' '.join((indication or '').split())
    if not text:
        return ids
    text = text if text[-1] in '.?!' else text + '.'
    return tok(f"Indication: {text}", add_special_tokens=False)['input_ids'][:MAX_CONTEXT_TOKENS] + ids


def prompt_ids(tok, prompt, indication=''):
    """The decoder prefix for generate: T5's start token (pad, 0) then the prompt."""
    return [tok.pad_token_id] + prompt_tokens(tok, prompt, indication)


def prompt_batch(tok, prompt, indications):
    """(ids, mask), both (B, P): one prefix per indication, left-padded so every row's
    report starts at position P; mask is 0 on the padding (None when there is none)."""
    rows = [prompt_ids(tok, prompt, indication) for indication in indications]
    P = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    return ids, (mask if (mask == 0).any() else None)


def check_context(context, config, source):
    """Whether to put the indication ahead of the prompt for a checkpoint whose run config is
    `config`: its own setting for context None. True for a checkpoint trained without context
    is an error naming `source`: it never learned to read an indication."""
    trained = bool(config.get('context', False))
    if context and not trained:
        raise ValueError(f"{source} was trained without clinical context: it never learned to read an indication "
                         f"ahead of its prompt. Leave the indication out (context=False), or use a run trained "
                         f"with context")
    return trained if context is None else bool(context)


def decode_reports(tok, ids, n_prompt, prompt):
    """The reports in generate's output (B, T): what follows the n_prompt prompt positions,
    behind the section prompt. The indication is input, never part of the report."""
    return [f"{prompt} {text.strip()}".strip() for text in tok.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)]


def encode_report(tok, prompt, report, max_len, indication=''):
    """(decoder_input_ids, labels): the decoder reads [start] + prompt + target[:-1] and
    predicts target + eos; labels are -100 on the prompt (and the indication ahead of it)
    so it is given, never learned."""
    p = prompt_tokens(tok, prompt, indication)
    target = report[len(prompt):] if report.startswith(prompt) else report
    t = tok(target.strip(), add_special_tokens=False)['input_ids'][:max(1, max_len - len(p) - 1)] + [tok.eos_token_id]
    seq = p + t
    return [tok.pad_token_id] + seq[:-1], [-100] * len(p) + t


# --- paths from the data ---------------------------------------------------------
def path_problem(name):
    """Why `name`, a file name read from a data file, is not a relative path that stays
    inside its root directory; None when it is. Checked on the text, so symlinks below
    the root (images on another disk) still work."""
    if not isinstance(name, str) or not name.strip() or '\0' in name:
        return f"{name!r} is not a file name"
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return f"{name!r} is an absolute path, not one relative to its directory"
    norm = os.path.normpath(name)
    if norm in ('.', '..') or norm.startswith('..' + os.sep):
        return f"{name!r} leads outside its directory"
    return None


# --- dataset ---------------------------------------------------------------------
def read_jsonl(path, required, check=None, unique=None):
    """The records of a UTF-8 JSON-lines file, each checked for the `required` keys and by
    check(record), which returns what is wrong or None; with `unique`, that key's value may
    not repeat. Errors name the file and line (and the first line of a repeated value)."""
    records, seen = [], {}
    with open(path, 'rb') as f:  # decoded line by line, so a bad byte is named by its line
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") \
                    from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise ValueError(f"{path}:{n}: missing keys {missing} (each record needs {', '.join(required)})")
            problem = check(record) if check else None
            if problem:
                raise ValueError(f"{path}:{n}: {problem}")
            if unique:
                key = str(record[unique])
                if key in seen:
                    raise ValueError(f"{path}:{n}: {unique} {key!r} again (first at line {seen[key]}): "
                                     f"each record must be there once")
                seen[key] = n
            records.append(record)
    return records


def read_split(data_dir, split):
    path = os.path.join(data_dir, f'{split}.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first (python data.py --dataset=... "
                                f"--data_dir={data_dir})")
    def check(r):
        if not isinstance(r['labels'], list) or len(r['labels']) != len(CONDITIONS):
            return f"record {r['id']!r} needs {len(CONDITIONS)} labels, has {r['labels']}"
        if path_problem(r['image']):
            return f"record {r['id']!r}: image {path_problem(r['image'])} ({data_dir})"
    return read_jsonl(path, ('id', 'image', 'report', 'labels'), check)


class ReportDataset(torch.utils.data.Dataset):
    """(image, decoder tokens, 14 condition targets) per frontal image of a prepared split.
    Tokenized once up front, so a worker only decodes and augments the image. A bad image
    gives None (one warning naming the file); collate drops it and counts the skip.
    target picks the section to write (studies where it is empty are left out and counted
    in self.left_out); with context, the indication goes ahead of the prompt, dropped for a
    share context_dropout of the samples (drawn per sample from torch's generator)."""

    def __init__(self, data_dir, split, tokenizer, image_size, train=False, target='both', context=False,
                 context_dropout=0.0, max_len=256, uncertain='positive'):
        from chexpert import binarize
        if not 0 <= context_dropout <= 1:
            raise ValueError(f"context_dropout must be in [0, 1], got {context_dropout}")
        self.data_dir, self.prompt = data_dir, section_prompt(target)
        records = read_split(data_dir, split)
        self.records = [r for r in records if target_text(r, target)]
        self.left_out = len(records) - len(self.records)
        self.transform = train_transform(image_size) if train else eval_transform(image_size)
        self.context_dropout = context_dropout
        self.tokens = [encode_report(tokenizer, self.prompt, target_text(r, target), max_len) for r in self.records]
        # with the indication: only where there is one (an empty one is the same as no context)
        self.context_tokens = [encode_report(tokenizer, self.prompt, target_text(r, target), max_len,
                                             r.get('indication', '')) if context and (r.get('indication') or '').strip()
                               else None for r in self.records]
        self.cond_labels = torch.tensor([binarize(r['labels'], uncertain) for r in self.records], dtype=torch.float32)
        self.warned = set()
        self.cached = set()  # ids whose image train.py no longer needs (it has their encoder outputs)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        path = os.path.join(self.data_dir, r['image'])
        image = None
        try:
            if r['id'] not in self.cached:
                image = self.transform(load_image(path))                        # (3, S, S)
        except ValueError as e:
            if path not in self.warned:
                self.warned.add(path)
                print(f"warning: skipping sample {r['id']}: {e}", file=sys.stderr)
            return None
        decoder_input_ids, labels = self.tokens[i]
        if self.context_tokens[i] and (self.context_dropout == 0 or torch.rand(()).item() >= self.context_dropout):
            decoder_input_ids, labels = self.context_tokens[i]
        return dict(id=r['id'], image=image, decoder_input_ids=torch.tensor(decoder_input_ids),
                    labels=torch.tensor(labels), cond_labels=self.cond_labels[i])


def collate(batch):
    """Pads a list of samples into a batch (decoder inputs with pad 0, labels with -100);
    None samples (bad images) are dropped and counted in 'skipped'. None if all were bad."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    pad = torch.nn.utils.rnn.pad_sequence
    return dict(ids=[b['id'] for b in good], skipped=len(batch) - len(good),
                image=torch.stack(images) if (images := [b['image'] for b in good if b['image'] is not None]) else None,
                has_image=[b['image'] is not None for b in good],  # all True unless train.py caches features
                decoder_input_ids=pad([b['decoder_input_ids'] for b in good], batch_first=True, padding_value=0),
                labels=pad([b['labels'] for b in good], batch_first=True, padding_value=-100),  # (B, T)
                cond_labels=torch.stack([b['cond_labels'] for b in good]))                # (B, 14)


if __name__ == '__main__':
    import prepare  # the README's `python data.py --dataset=...` keeps working: it is prepare.py's command line
    prepare.main(sys.argv[1:])
