"""
What training and inference read: images (DICOM too) and their transforms, the tokenizer,
the decoder's prompt, and a prepared directory's splits as batches (ReportDataset, collate).

A prepared directory holds train/val/test.jsonl (one record per frontal image: id, uid,
image, findings, impression, report, indication, labels, label_source), resized image
copies under images_<short_side>/ and a manifest.json; prepare.py writes it from a raw
download (`python prepare.py --dataset=...`), and ReportDataset reads it, whichever
dataset made it.
"""
import hashlib
import json
import os
import stat
import sys
import warnings

import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from chexpert import CONDITIONS, diagnosis_text, finding_sentences
from metrics import decide

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


def resize_copy(job):
    """job (source, dest, side): writes a copy of source with its shorter side at most `side` px
    (grayscale PNG), unless an up-to-date copy exists. Returns None, or an error message naming
    the file. The copies prepare.py makes, so that training decodes small images."""
    source, dest, side = job
    try:
        if os.path.getmtime(dest) >= os.path.getmtime(source):
            return None
    except OSError:  # no copy yet, or the source is gone since the tables were written: load_image says which
        pass
    try:
        im = load_image(source).convert('L')  # radiographs are grayscale; RGB comes back at load time
    except ValueError as e:
        return str(e)
    scale = side / min(im.size)
    if scale < 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    im.save(dest + '.tmp', format='PNG')
    os.replace(dest + '.tmp', dest)  # a killed run never leaves a half-written copy that looks done
    return None


def train_transform(size):
    """eval_transform, then augment on the one image (the DataLoader's workers draw per image)."""
    from torchvision import transforms as T
    return T.Compose([eval_transform(size), augment_one])


def eval_transform(size):
    from torchvision import transforms as T
    return T.Compose([T.Resize((size, size), antialias=True), T.ToTensor(), T.Normalize(MEAN, STD)])


def augment(pixels, generator=None):
    """The methodology's augmentations on normalized (B, 3, S, S) pixels, drawn per image: rotation
    up to 5 degrees, shift up to 3%, scale 0.97-1.03 (nearest pixel, black outside, as torchvision
    does), then brightness and contrast 0.95-1.05. No horizontal flip, ever (it would put the heart on
    the wrong side and make 'left'/'right' in reports wrong). A whole batch at once, as pretrain.py's
    SigLIP augments its in-memory images, or one image (augment_one) in the DataLoader's workers."""
    import math
    import torch.nn.functional as F
    B = pixels.shape[0]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = pixels * std + mean                                           # (B, 3, S, S) in [0, 1]
    uniform = lambda: torch.rand(B, generator=generator) * 2 - 1      # (B,) in [-1, 1)
    angle, scale = uniform() * math.radians(5), 1 + 0.03 * uniform()
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift_x, shift_y = uniform() * 0.06, uniform() * 0.06             # 3% of the side: 0.06 of the grid's [-1, 1]
    theta = torch.stack([torch.stack([cos, -sin, shift_x], -1),
                         torch.stack([sin, cos, shift_y], -1)], 1)    # (B, 2, 3): where each output pixel reads
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    brightness, contrast = (1 + 0.05 * uniform()).view(B, 1, 1, 1), (1 + 0.05 * uniform()).view(B, 1, 1, 1)
    x = (x * brightness).clamp(0, 1)
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (contrast * x + (1 - contrast) * gray.mean((2, 3), keepdim=True)).clamp(0, 1)
    return (x - mean) / std


def augment_one(pixels):
    """augment on one (3, S, S) image."""
    return augment(pixels[None])[0]


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


def prompt_tokens(tok, prompt, indication='', diagnosis=None):
    """The prompt's token ids: 'Indication: <text>.' (cut to MAX_CONTEXT_TOKENS) when there is an
    indication, then the 14 decisions in words when there is a diagnosis ('Seen: edema.'), then
    the section prompt. With the T5 encoder deleted, the decoder reads them through its own
    causal self-attention as the first tokens of the text; its cross-attention sees only the
    11 visual tokens."""
    ids = tok(prompt, add_special_tokens=False)['input_ids']
    if diagnosis is not None:
        ids = tok(diagnosis_text(diagnosis), add_special_tokens=False)['input_ids'] + ids
    text = ' '.join((indication or '').split())
    if not text:
        return ids
    text = text if text[-1] in '.?!' else text + '.'
    return tok(f"Indication: {text}", add_special_tokens=False)['input_ids'][:MAX_CONTEXT_TOKENS] + ids


def prompt_ids(tok, prompt, indication='', diagnosis=None):
    """The decoder prefix for generate: T5's start token (pad, 0) then the prompt."""
    return [tok.pad_token_id] + prompt_tokens(tok, prompt, indication, diagnosis)


def prompt_batch(tok, prompt, indications, diagnoses=None):
    """(ids, mask), both (B, P): one prefix per indication (and diagnosis), left-padded so every
    row's report starts at position P; mask is 0 on the padding (None when there is none)."""
    diagnoses = [None] * len(indications) if diagnoses is None else diagnoses
    rows = [prompt_ids(tok, prompt, indication, diagnosis) for indication, diagnosis in zip(indications, diagnoses)]
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


def check_diagnosis(diagnosis, config, source):
    """Whether the decoder's prompt states the 14 decisions (diagnosis_prompt) for a checkpoint
    whose run config is `config`: its own setting for None. A setting that differs from how
    it was trained is an error naming `source`: the decoder learned to write with that slot,
    or never saw it."""
    trained = bool(config.get('diagnosis_prompt', False))
    if diagnosis is not None and bool(diagnosis) != trained:
        raise ValueError(f"{source} was trained {'with' if trained else 'without'} diagnosis_prompt, so "
                         f"diagnosis_prompt={bool(diagnosis)} does not fit it: leave the setting out (it follows the "
                         f"checkpoint), or use a run trained {'without' if trained else 'with'} it")
    return trained


def decode_reports(tok, ids, n_prompt, prompt):
    """The reports in generate's output (B, T): what follows the n_prompt prompt positions,
    behind the section prompt. The indication is input, never part of the report."""
    return [f"{prompt} {text.strip()}".strip() for text in tok.batch_decode(ids[:, n_prompt:], skip_special_tokens=True)]


def write_reports(model, tok, visual_tokens, prompt, indications, diagnoses=None, **generation):
    """The reports a CheXQuery writes from encode's visual tokens (B, 11, D), one per row: each
    row's indication ('' for none) and diagnosis (14 decisions, or None) ahead of the section
    prompt, which the reports start with; generation overrides CheXQuery.generate's settings."""
    ids, mask = prompt_batch(tok, prompt, indications, diagnoses)
    device = visual_tokens.device
    out = model.generate(None, ids.to(device), visual_tokens=visual_tokens,
                         prompt_mask=None if mask is None else mask.to(device), **generation)
    return decode_reports(tok, out, ids.shape[1], prompt)


def encode_report(tok, prompt, report, max_len, indication='', diagnosis=None, finding_weight=1.0):
    """(decoder_input_ids, labels, weights): the decoder reads [start] + prompt + target[:-1] and
    predicts target + eos; labels are -100 on the prompt (and the indication and diagnosis
    ahead of it) so it is given, never learned. weights: None when every target counts alike
    (finding_weight 1), else each label's weight in the loss (finding_weights; 0 on the prompt)."""
    p = prompt_tokens(tok, prompt, indication, diagnosis)
    target = (report[len(prompt):] if report.startswith(prompt) else report).strip()
    t = tok(target, add_special_tokens=False)['input_ids'][:max(1, max_len - len(p) - 1)] + [tok.eos_token_id]
    seq = p + t
    weights = None
    if finding_weight != 1:  # the prompt counts 0, eos 1, the report's tokens as finding_weights says
        weights = [0.0] * len(p) + finding_weights(tok, target, finding_weight)[:len(t) - 1] + [1.0]
    return [tok.pad_token_id] + seq[:-1], [-100] * len(p) + t, weights


def finding_weights(tok, text, weight):
    """One loss weight per token of `text`: `weight` on the tokens of the sentences that state a
    finding (chexpert.finding_sentences), 1 on the rest (normal statements, section headers).
    DiseaseT5 weighs them x5: the words that differ between reports are few beside the template."""
    if not getattr(tok, 'is_fast', False):
        raise ValueError(f"finding_weight needs a fast tokenizer (its offsets), got {type(tok).__name__}")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = finding_sentences(text)
    # a token belongs to a sentence it overlaps (SentencePiece's '_Mild' starts at the space before it)
    return [weight if any(start < b and end > a for a, b in spans) else 1.0 for start, end in enc['offset_mapping']]


def pad_tokens(rows):
    """(decoder_input_ids, labels, weights), each (B, T): each row's (ids, labels, weights),
    lists or tensors, padded with 0, -100 and 0; weights None when the rows have none."""
    pad = torch.nn.utils.rnn.pad_sequence
    ids, labels, weights = zip(*rows)
    return (pad([torch.as_tensor(x) for x in ids], batch_first=True, padding_value=0),
            pad([torch.as_tensor(x) for x in labels], batch_first=True, padding_value=-100),
            None if weights[0] is None else pad([torch.as_tensor(x, dtype=torch.float32) for x in weights],
                                                batch_first=True, padding_value=0.0))


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
        raise FileNotFoundError(f"{path} not found: prepare the data first (python prepare.py --dataset=... "
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
    share context_dropout of the samples; finding_weight weighs the loss on finding sentences
    (finding_weights; 'weights' is None at 1); with diagnosis, the reference labels (binarized as
    the aux targets are) go ahead of the section prompt in words, and a share own_diagnosis
    of the samples is marked 'own': train.py puts the aux head's decisions there instead.
    Both draws are per sample, from torch's generator."""

    def __init__(self, data_dir, split, tokenizer, image_size, train=False, target='both', context=False,
                 context_dropout=0.0, max_len=256, uncertain='positive', diagnosis=False, own_diagnosis=0.0,
                 finding_weight=1.0):
        from chexpert import binarize
        for name, share in (('context_dropout', context_dropout), ('own_diagnosis', own_diagnosis)):
            if not 0 <= share <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        self.data_dir, self.prompt = data_dir, section_prompt(target)
        records = read_split(data_dir, split)
        self.records = [r for r in records if target_text(r, target)]
        self.left_out = len(records) - len(self.records)
        self.transform = train_transform(image_size) if train else eval_transform(image_size)
        self.context_dropout, self.diagnosis, self.own_diagnosis = context_dropout, diagnosis, own_diagnosis
        self.cond_labels = torch.tensor([binarize(r['labels'], uncertain) for r in self.records], dtype=torch.float32)
        self.texts = [target_text(r, target) for r in self.records]
        # the indication only where there is one (an empty one is the same as no context)
        self.indications = [' '.join((r.get('indication') or '').split()) if context else '' for r in self.records]
        diagnoses = [(y > 0.5).tolist() if diagnosis else None for y in self.cond_labels]
        self.tokens = [encode_report(tokenizer, self.prompt, text, max_len, '', d, finding_weight)
                       for text, d in zip(self.texts, diagnoses)]
        self.context_tokens = [encode_report(tokenizer, self.prompt, text, max_len, indication, d, finding_weight)
                               if indication else None
                               for text, indication, d in zip(self.texts, self.indications, diagnoses)]
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
        (decoder_input_ids, labels, weights), indication = self.tokens[i], ''
        if self.context_tokens[i] and (self.context_dropout == 0 or torch.rand(()).item() >= self.context_dropout):
            (decoder_input_ids, labels, weights), indication = self.context_tokens[i], self.indications[i]
        sample = dict(id=r['id'], image=image, decoder_input_ids=torch.tensor(decoder_input_ids),
                      labels=torch.tensor(labels), weights=weights, cond_labels=self.cond_labels[i])
        if self.diagnosis:  # what train.py needs to write the head's decisions into the slot instead
            own = self.own_diagnosis >= 1 or (self.own_diagnosis > 0 and torch.rand(()).item() < self.own_diagnosis)
            sample.update(text=self.texts[i], indication=indication, own=own)
        return sample


def collate(batch):
    """Pads a list of samples into a batch (decoder inputs with pad 0, labels with -100);
    None samples (bad images) are dropped and counted in 'skipped'. None if all were bad."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    decoder_input_ids, labels, weights = pad_tokens([(b['decoder_input_ids'], b['labels'], b['weights'])
                                                     for b in good])  # (B, T) each, weights None or float
    out = dict(ids=[b['id'] for b in good], skipped=len(batch) - len(good),
               image=torch.stack(images) if (images := [b['image'] for b in good if b['image'] is not None]) else None,
               has_image=[b['image'] is not None for b in good],  # all True unless train.py caches features
               decoder_input_ids=decoder_input_ids, labels=labels, weights=weights,
               cond_labels=torch.stack([b['cond_labels'] for b in good]))                # (B, 14)
    if 'own' in good[0]:
        out.update({k: [b[k] for b in good] for k in ('text', 'indication', 'own')})
    return out


def own_diagnosis_tokens(tok, prompt, batch, max_len, thresholds, logits, finding_weight=1.0):
    """(decoder_input_ids, labels, weights), (B, T), for a collated batch of a diagnosis dataset: each
    sample's slot holds the aux head's decisions (its condition logits (B, 14) at `thresholds`)
    where batch['own'] is set, the reference labels elsewhere; the rest as the dataset made it."""
    decisions = decide(logits.float().sigmoid().cpu().numpy(), thresholds).tolist()
    references = (batch['cond_labels'] > 0.5).tolist()
    return pad_tokens([encode_report(tok, prompt, text, max_len, indication, own_decisions if own else reference,
                                     finding_weight)
                       for text, indication, own, own_decisions, reference in
                       zip(batch['text'], batch['indication'], batch['own'], decisions, references)])


class FeatureCache:
    """Phase 1's frozen SigLIP outputs, kept after the first epoch: id -> (global (D,), patches
    (N, D)), in float16 on the host to halve the memory. A dataset whose `cached` set holds an
    id leaves that image undecoded (collate's has_image says which samples carry one)."""

    def __init__(self):
        self.features = {}

    def __call__(self, b, encode, device):
        """(global (B, D), patches (B, N, D)) for batch b: encode(images) for the images it
        carries, which were not seen before, and the cache for the rest."""
        if b['image'] is not None:
            with torch.no_grad():  # SigLIP is frozen
                g, p = encode(b['image'])
            new = [k for k, has in zip(b['ids'], b['has_image']) if has]
            for i, k in enumerate(new):
                self.features[k] = (g[i].half().cpu(), p[i].half().cpu())
        g, p = zip(*(self.features[k] for k in b['ids']))
        return torch.stack(g).to(device).float(), torch.stack(p).to(device).float()
