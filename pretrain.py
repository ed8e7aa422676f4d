"""
Tiny pretrained backbones for CheXQuery, made here from the phantom training split,
since no pretrained weights can be downloaded:

    python pretrain.py                              # out-pretrained/{siglip,t5,bert}
    python pretrain.py --ceiling                    # + the supervised CNN ceiling (probe.py), cached
    bash mini.sh                                    # then CheXQuery's three phases on them

- siglip/  SigLIP, vision and text towers, trained with its sigmoid image-text loss on
           image-report pairs; the phantom tokenizer beside it
- t5/      T5 encoder-decoder like Flan-T5 (gated GELU, lm_head untied from the embedding),
           trained with span corruption; its tokenizer is the phantom one plus 100
           sentinels <extra_id_N> after the words, so every word keeps its phantom id
- bert/    BERT trained as BERT was (masked tokens and next sentence), with an uncased
           WordPiece tokenizer that opens every text with [CLS]: CheXQuery embeds each
           condition name by its [CLS] vector, and the case-sensitive word-level phantom
           tokenizer reads 12 of the 14 names as <unk> only

Each backbone prints its losses and checks on the val split that it learned something; SigLIP's
check, a linear probe of its features (global and mean patch token) for the 14 labels, is printed
per condition beside what a small CNN trained on the labels themselves reaches (out_dir/ceiling.json
from --ceiling, else the one measured on the default phantom set, docs/ceiling.json).
SigLIP pairs each image with its report and no label (multi_positive: identical reports count as matches).
A backbone whose directory already exists is skipped. SigLIP trains here while T5, then
BERT, train in a second process, each on one core; then SigLIP trains on every core, from a
fixed share of its steps on, so that a tower depends on its settings and core count, not on timing.
"""
import math
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import probe
from chexpert import CONDITIONS, binarize

# -----------------------------------------------------------------------------
data_dir = 'data/phantom'
out_dir = 'out-pretrained'
image_size = 128
patch_size = 16               # SigLIP's vision patches: (image_size / patch_size)^2 visual tokens
width = 128                   # SigLIP's vision width = T5's d_model = BERT's width: CheXQuery's D, no projections
text_width = 64               # SigLIP's text tower, which only teaches the vision tower: narrow is cheaper
layers = 2                    # transformer layers per tower (T5: per stack)
heads = 4
siglip_epochs = 37            # 3,441 steps: the tiny ViT learns slowly, more steps buy probe AUC (docs/history.md)
siglip_batch_size = 32        # images seen is what counts: batch 64 for half the steps reads the same
multi_positive = False        # identical reports as each other's matches, not negatives (rare in the phantom set)
siglip_lr = 1e-3
augment = True                # SigLIP's images through data.augment, as CheXQuery's training sees them
sincos_positions = True       # SigLIP's patch positions start as MAE's 2D sine-cosine, not at random: learns faster
t5_epochs = 6
t5_lr = 2e-3
bert_epochs = 4
bert_lr = 2e-3
text_batch_size = 64          # T5 and BERT
probe_steps = 300             # logistic-regression steps of the SigLIP feature probe
parallel = True               # T5 and BERT in a second process while SigLIP trains on one core, then on all
ceiling = False               # --ceiling: train the supervised CNN ceiling again (minutes) and cache it in out_dir
seed = 1337
# -----------------------------------------------------------------------------
N_SENTINELS = 100             # T5's <extra_id_0> ... <extra_id_99>
PROBE_FILE = 'probe.json'     # in the SigLIP directory: its linear probe's val AUCs, for the table against the ceiling
CEILING_FILE = 'ceiling.json' # in out_dir: the supervised CNN's val AUCs (probe.py), trained only when asked
SIGLIP_WIDENS_AT = 0.3        # of SigLIP's steps, on one core, when T5 and BERT end on the other (2 Intel Xeon vCPUs)
# The ceiling measured once on the default phantom set (recipe, machine and data inside), printed when out_dir has
# none of its own: it takes some 10 CPU minutes, more than the miniature's budget.
REFERENCE_CEILING = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'docs', 'ceiling.json')


def fit(model, loss_fn, batches, steps, lr, name, weight_decay=0.01, warmup=0.05, widen=None):
    """Trains model on loss_fn(next(batches)) for `steps` steps: AdamW, linear warmup, then
    cosine decay to lr/10, no weight decay on biases, norms and SigLIP's scale and bias.
    widen, asked before each step with the share of steps done, returns a thread count to train on
    from then on (0: not yet).
    Prints the loss ten times."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{'params': matrices, 'weight_decay': weight_decay},
                                   {'params': others, 'weight_decay': 0.0}], lr=lr)
    warm = max(1, int(warmup * steps))

    def schedule(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    t0, log_every = time.time(), max(1, steps // 10)
    for step in range(steps):
        if widen is not None and (threads := widen(step / steps)):
            torch.set_num_threads(threads)  # here, in the thread that trains: OpenMP's count is per thread
            widen = None
        loss = loss_fn(next(batches))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  {name} step {step + 1}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()


def shuffled(n, batch_size, generator):
    """Endless index batches: shuffled epochs, each without its last partial batch."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def pad(seqs, value):
    """(B, T) right-padded ids and their (B, T) attention mask."""
    ids = nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=value)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
    return ids, mask


@contextmanager
def transformers_quiet():
    """Transformers' warnings off inside: writing or reading a SigLIP directory's config, it warns
    that its own default text config (CLIP's token ids) does not fit the default vocabulary."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def save(model, tok, path, extra=None):
    """model and tokenizer (and extra: {file name: JSON}) into path, written beside it and
    renamed into place: a killed run never leaves a directory that the next run would take as done."""
    import json
    import shutil
    shutil.rmtree(path + '.tmp', ignore_errors=True)
    with transformers_quiet():
        model.save_pretrained(path + '.tmp')
    tok.save_pretrained(path + '.tmp')
    for name, content in (extra or {}).items():
        with open(os.path.join(path + '.tmp', name), 'w') as file:
            json.dump(content, file, indent=1)
    os.replace(path + '.tmp', path)


# --- 1. SigLIP --------------------------------------------------------------------
def siglip_config(vocab_size, text_len, width, text_width, layers, heads, image_size, patch_size=16):
    from transformers import SiglipConfig
    tower = lambda w: dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=layers, num_attention_heads=heads)
    return SiglipConfig(vision_config=dict(tower(width), image_size=image_size, patch_size=patch_size),
                        text_config=dict(tower(text_width), projection_size=width, vocab_size=vocab_size,
                                         max_position_embeddings=text_len, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=None))


def new_siglip(config, sincos=False):
    """A SiglipModel starting from the paper's temperature and bias (t = 10, b = -10), which
    Hugging Face's init leaves at 1 and 0; sincos: its vision tower's position embeddings (still
    learned) start as sincos_2d's, where the patches' neighbours are known from the first step."""
    from transformers import SiglipModel
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10))
        model.logit_bias.fill_(-10.0)
        if sincos:
            positions = model.vision_model.embeddings.position_embedding.weight  # (P, D), P = grid x grid
            positions.copy_(sincos_2d(positions.shape[1], math.isqrt(positions.shape[0])))
    return model.eval()


def sincos_2d(dim, grid):
    """(grid * grid, dim) 2D sine-cosine position embedding, MAE's: for the patch in row y, column x
    (row-major, as the patches are flattened), sin and cos of x, then of y, at dim / 4 frequencies
    from 1 down to 1/10,000."""
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing='ij')
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float) / (dim // 4))    # (dim / 4,)
    angles = [position.flatten()[:, None] * omega for position in (x, y)]              # 2 x (P, dim / 4)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)         # (P, dim)


def siglip_texts(tok, reports, text_len):
    """(N, text_len) ids: each report and </s>, padded on the left, then one <pad> at the last
    position, which SigLIP's text tower pools: one query for every report, reading its tokens."""
    ids = [w[:text_len - 2] + [tok.eos_token_id] for w in tok(reports)['input_ids']]  # a cut report keeps its </s>
    pad = tok.pad_token_id
    return torch.tensor([[pad] * (text_len - 1 - len(w)) + w + [pad] for w in ids])


def text_inputs(texts, pad_id=0):
    """SigLIP's text inputs for siglip_texts' layout, cut to the batch's longest report: the
    padding masked out as keys, the report's tokens at positions 0, 1, ... and the pooled <pad>
    at the last one. So a report reads exactly as padded on the right to full length, in any
    batch, at the cost of the batch's longest (79 tokens in a batch of 32 here, not 106).
    Unmasked, as SigLIP was trained, the pooled position reads mostly padding, and the reports'
    pooled vectors start nearly alike (cosine 0.93 between reports here, 0.67 masked). Pooling
    each report's own </s> instead, at its own position, halved val retrieval (docs/history.md)."""
    mask = texts != pad_id                                            # (B, T): the reports' own tokens
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    positions[:, -1] = texts.shape[1] - 1                             # the pooled <pad>, where full length puts it
    first = int(mask.any(0).long().argmax())                          # the longest report's first column
    return dict(input_ids=texts[:, first:], attention_mask=mask[:, first:].long(), position_ids=positions[:, first:])


def siglip_targets(texts):
    """(B, B) targets of SigLIP's loss: +1 where text i and the report of image j are the same
    words, -1 elsewhere. Two images with one report are each other's match: scored as
    negatives, they would push apart what no picture tells apart."""
    return (texts[:, None, :] == texts[None, :, :]).all(-1).float() * 2 - 1


def siglip_loss(logits_per_text, texts):
    """SigLIP's sigmoid loss, every text against every image, summed over the images and
    averaged over the texts, with the multi-positive targets of siglip_targets."""
    return -F.logsigmoid(siglip_targets(texts) * logits_per_text).sum(-1).mean()


def stack(images, transform):
    return torch.stack([transform(im) for im in images])                # (B, 3, S, S)


@torch.no_grad()
def image_features(vision, pixels, batch_size=100):
    """SigLIP's image features (N, 2D) of (N, 3, S, S) pixels: the global token beside the mean of
    the patch tokens, as CheXQuery reads both (the gate the one, the queries the others). The
    global token alone carries less: a probe read 0.785 from it and 0.817 from both (docs/history.md)."""
    features = []
    for i in range(0, len(pixels), batch_size):
        out = vision(pixel_values=pixels[i:i + batch_size])
        features.append(torch.cat([out.pooler_output, out.last_hidden_state.mean(1)], -1))  # (B, 2D)
    return torch.cat(features)


@torch.no_grad()
def retrieval(model, pixels, texts):
    """Image-to-report retrieval: the share of images whose own report scores highest (top-1)
    and is among the best five (top-5), over all the split's reports."""
    image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text = F.normalize(model.get_text_features(**text_inputs(texts)).pooler_output, dim=-1)
    best = (image @ text.T).topk(5, dim=1).indices                   # (N, 5)
    own = best == torch.arange(len(pixels))[:, None]
    return own[:, 0].float().mean().item(), own.any(1).float().mean().item()


def siglip_checks(model, train, val, probe_steps):
    """(retrieval top-1, top-5, probe mean AUC, per-condition AUCs) of a SigLIP on the val split."""
    top1, top5 = retrieval(model, val['pixels'], val['texts'])
    features = [image_features(model.vision_model, split['pixels']) for split in (train, val)]
    auc, aucs = probe.linear_probe_auc(features[0], train['labels'], features[1], val['labels'], probe_steps)
    return top1, top5, auc, aucs


def pretrain_siglip(model, train, val, tok, path, epochs, batch_size, lr, augment, probe_steps, seed,
                    multi_positive=False, widen=None):
    """Trains a new SigLIP on train's image-report pairs (multi_positive: identical reports are
    matches; widen: fit's), prints its checks next to the same checks before training, saves it
    with tok into path; returns (model, results)."""
    evaluate = data.eval_transform(model.config.vision_config.image_size)
    train, val = (dict(split, pixels=stack(split['images'], evaluate)) for split in (train, val))  # (N, 3, S, S)
    chance = siglip_checks(model, train, val, probe_steps)
    generator = torch.Generator().manual_seed(seed)

    def loss(batch):
        images = data.augment(train['pixels'][batch], generator) if augment else train['pixels'][batch]
        texts = train['texts'][batch]
        if multi_positive:
            return siglip_loss(model(**text_inputs(texts), pixel_values=images).logits_per_text, texts)
        return model(**text_inputs(texts), pixel_values=images, return_loss=True).loss

    steps = epochs * (len(train['images']) // batch_size)
    fit(model, loss, shuffled(len(train['images']), batch_size, generator), steps, lr, 'siglip', widen=widen)
    top1, top5, auc, aucs = siglip_checks(model, train, val, probe_steps)
    n = len(val['images'])
    print(f"siglip: val image->report retrieval top-1 {top1:.3f}, top-5 {top5:.3f} (chance {1 / n:.3f}, "
          f"{5 / n:.3f}; random init {chance[0]:.3f}, {chance[1]:.3f})")
    print(f"siglip: linear probe of global and mean patch features, val mean AUC {auc:.3f} "
          f"(random init {chance[2]:.3f})")
    results = dict(top1=top1, top5=top5, auc=auc, aucs=dict(zip(CONDITIONS, aucs.tolist())),
                   random_init=dict(top1=chance[0], top5=chance[1], auc=chance[2]))
    save(model, tok, path, {PROBE_FILE: results})
    return model, results


def check_unseen(data_dir):
    """Raises unless no train image is also a val or test image, by file name or by content:
    the probe is read on val and the miniature is scored on test, so pretraining must not see them."""
    import hashlib

    def images(split):
        records = data.read_split(data_dir, split)
        paths = [os.path.normpath(r['image']) for r in records]
        digests = []
        for path in paths:
            with open(os.path.join(data_dir, path), 'rb') as file:
                digests.append(hashlib.sha1(file.read()).hexdigest())
        return dict(zip(paths, digests))

    train, held_out = images('train'), {**images('val'), **images('test')}
    by_content = {digest: path for path, digest in held_out.items()}
    for path, digest in train.items():
        if path in held_out or digest in by_content:
            raise ValueError(f"pretrain: {data_dir}: train image {path} is also a val or test image "
                             f"({by_content.get(digest, path)}); pretraining must not see them")


def image_text_split(data_dir, split, tok, text_len):
    """A split's images (PIL, in memory), fixed-length report ids and binarized labels."""
    records = data.read_split(data_dir, split)
    return dict(images=[data.load_image(os.path.join(data_dir, r['image'])) for r in records],
                texts=siglip_texts(tok, [r['report'] for r in records], text_len),
                labels=torch.tensor([binarize(r['labels']) for r in records]))


# --- 2. T5 ------------------------------------------------------------------------
def t5_tokenizer(data_dir):
    """The phantom tokenizer plus T5's sentinels, numbered after its words."""
    tok = data.load_tokenizer(data_dir)
    tok.add_special_tokens({'additional_special_tokens': [f'<extra_id_{i}>' for i in range(N_SENTINELS)]})
    return tok


def t5_model(vocab_size, width, layers, heads):
    """A Flan-T5-shaped T5: gated GELU, no output rescaling, its own lm_head."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=width // heads, d_ff=2 * width, num_layers=layers,
                      num_decoder_layers=layers, num_heads=heads, feed_forward_proj='gated-gelu', dropout_rate=0.1,
                      tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    # transformers ties lm_head to the embedding at construction, whatever the config says
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * width ** -0.5)
    return model


def noise_mask(length, generator, density=0.15, mean_span=3.0):
    """T5's random_spans_noise_mask: `length` booleans, True on the corrupted tokens, which
    make round(density * length) tokens in spans of mean length mean_span."""
    n_noise = min(max(round(length * density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span), 1)

    def split(total):  # `total` items cut into n_spans non-empty runs at random
        cuts = (torch.randperm(total - 1, generator=generator)[:n_spans - 1] + 1).sort().values.tolist()
        return [b - a for a, b in zip([0] + cuts, cuts + [total])]

    mask = []
    for keep, noise in zip(split(length - n_noise), split(n_noise)):
        mask += [False] * keep + [True] * noise
    return mask


def span_corrupt(ids, sentinels, eos, generator):
    """(inputs, targets) of T5's span corruption: each corrupted span is replaced in the input
    by the next sentinel; the target lists the sentinels, each followed by its span."""
    mask = noise_mask(len(ids), generator)
    inputs, targets, k = [], [], 0
    for i, (token, noisy) in enumerate(zip(ids, mask)):
        if noisy and (i == 0 or not mask[i - 1]):
            inputs.append(sentinels[k])
            targets.append(sentinels[k])
            k += 1
        (targets if noisy else inputs).append(token)
    return inputs + [eos], targets + [sentinels[k], eos]


def t5_batch(texts, sentinels, eos, generator):
    pairs = [span_corrupt(ids, sentinels, eos, generator) for ids in texts]
    input_ids, attention_mask = pad([p[0] for p in pairs], 0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=pad([p[1] for p in pairs], -100)[0])


@torch.no_grad()
def masked_scores(model, batches):
    """(loss, accuracy) over the target tokens (labels != -100) of a list of batches."""
    total, correct, n = 0.0, 0, 0
    for batch in batches:
        logits = model(**batch).logits
        labels = batch['labels']
        keep = labels != -100
        total += F.cross_entropy(logits[keep], labels[keep], reduction='sum').item()
        correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
        n += keep.sum().item()
    return total / n, correct / n


def pretrain_t5(model, train, val, tok, path, epochs, batch_size, lr, seed):
    """Trains a new T5 with span corruption on the train reports' ids, prints val loss and
    accuracy before and after, saves it with tok into path; returns (model, results)."""
    sentinels = tok.convert_tokens_to_ids([f'<extra_id_{i}>' for i in range(N_SENTINELS)])
    make = lambda texts, g: t5_batch(texts, sentinels, tok.eos_token_id, g)
    val_batches = lambda g: [make(val[i:i + 100], g) for i in range(0, len(val), 100)]
    before = masked_scores(model, val_batches(torch.Generator().manual_seed(seed)))
    generator = torch.Generator().manual_seed(seed)
    loss = lambda batch: model(**make([train[i] for i in batch], generator)).loss
    fit(model, loss, shuffled(len(train), batch_size, generator), epochs * (len(train) // batch_size), lr, 't5')
    after = masked_scores(model, val_batches(torch.Generator().manual_seed(seed)))  # the same corruption as before
    print(f"t5: val span-corruption loss {after[0]:.3f}, target token accuracy {after[1]:.3f} "
          f"(at the first step: {before[0]:.3f}, {before[1]:.3f})")
    save(model, tok, path)
    return model, dict(loss=after[0], accuracy=after[1], first=before)


# --- 3. BERT ----------------------------------------------------------------------
def bert_tokenizer(reports):
    """An uncased WordPiece tokenizer over the words of the reports, '[CLS] text [SEP]' like
    BERT's. A word it never saw is spelled in pieces ('finding' -> f ##i ##n ##d ##i ##n ##g),
    not one [UNK]. Built, not trained: tokenizers' WordPiece trainer breaks ties differently
    on every run, and so would every model and number downstream."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for r in reports for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(r))})
    chars = sorted({c for w in words for c in w})
    special = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    pieces = list(dict.fromkeys(special + words + chars + ['##' + c for c in chars]))
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token='[UNK]'))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1', special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
                                   sep_token='[SEP]', mask_token='[MASK]',
                                   model_input_names=['input_ids', 'token_type_ids', 'attention_mask'])


def bert_model(vocab_size, width, layers, heads):
    """BERT with both of its pretraining heads: masked tokens, and whether the second text follows."""
    from transformers import BertConfig, BertForPreTraining
    return BertForPreTraining(BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=4 * width,
                                         max_position_embeddings=256, pad_token_id=0))


def mask_tokens(input_ids, tok, generator, rate=0.15):
    """(input ids, labels) of BERT's masking: `rate` of the non-special tokens become targets;
    of those 80% read [MASK], 10% a random token and 10% stay."""
    special = torch.tensor([tok.pad_token_id, tok.cls_token_id, tok.sep_token_id])
    chosen = (torch.rand(input_ids.shape, generator=generator) < rate) & ~torch.isin(input_ids, special)
    labels = input_ids.masked_fill(~chosen, -100)
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tok.all_special_tokens), len(tok), input_ids.shape, generator=generator)
    input_ids = torch.where(chosen & (roll < 0.8), tok.mask_token_id, input_ids)
    return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, input_ids), labels


def bert_batch(sections, batch, tok, generator):
    """BERT's two tasks on reports: '[CLS] findings [SEP] impression [SEP]' with tokens masked,
    and for half of them another report's impression (next_sentence_label 1) to be told apart."""
    swap = torch.rand(len(batch), generator=generator) < 0.5
    others = torch.randint(len(sections), (len(batch),), generator=generator).tolist()
    second = [sections[j if s else i][1] for i, j, s in zip(batch, others, swap.tolist())]
    enc = tok([sections[i][0] for i in batch], second, truncation=True, max_length=256, padding=True,
              return_tensors='pt')
    input_ids, labels = mask_tokens(enc['input_ids'], tok, generator)
    return dict(input_ids=input_ids, attention_mask=enc['attention_mask'], token_type_ids=enc['token_type_ids'],
                labels=labels, next_sentence_label=swap.long())


@torch.no_grad()
def bert_scores(model, batches):
    """(masked-token accuracy, next-report accuracy) over a list of batches."""
    masked = next_report = n_masked = n = 0
    for batch in batches:
        out = model(**batch)
        keep = batch['labels'] != -100
        masked += (out.prediction_logits.argmax(-1)[keep] == batch['labels'][keep]).sum().item()
        next_report += (out.seq_relationship_logits.argmax(-1) == batch['next_sentence_label']).sum().item()
        n_masked, n = n_masked + keep.sum().item(), n + len(batch['labels'])
    return masked / n_masked, next_report / n


def pretrain_bert(model, tok, train_reports, val_reports, path, epochs, batch_size, lr, seed):
    """Trains a new BERT on the train reports as BERT and BioBERT were trained: masked tokens and
    next sentence, the impression after the findings. The second task is what trains [CLS], whose
    vector CheXQuery takes for each condition name: with masking alone it never has a target, and
    the 14 names' [CLS] vectors came out nearly one (cosine 0.9997 apart). Prints val accuracies
    before and after, saves it with tok into path; returns (model, results)."""
    train, val = ([r.partition(' | ')[::2] for r in reports] for reports in (train_reports, val_reports))
    val_batches = lambda g: [bert_batch(val, range(i, min(i + 100, len(val))), tok, g) for i in range(0, len(val), 100)]
    before = bert_scores(model, val_batches(torch.Generator().manual_seed(seed)))
    generator = torch.Generator().manual_seed(seed)
    loss = lambda batch: model(**bert_batch(train, batch, tok, generator)).loss
    fit(model, loss, shuffled(len(train), batch_size, generator), epochs * (len(train) // batch_size), lr, 'bert')
    after = bert_scores(model, val_batches(torch.Generator().manual_seed(seed)))
    print(f"bert: val masked-token accuracy {after[0]:.3f}, next-sentence accuracy {after[1]:.3f} "
          f"(at the first step: {before[0]:.3f}, {before[1]:.3f})")
    save(model, tok, path)
    return model, dict(accuracy=after[0], next_accuracy=after[1], first=before)


# --- the script -------------------------------------------------------------------
def run(name, path, data_dir, settings, widen=None):
    """Builds, trains and saves one backbone (settings: the script's config); returns its wall
    and CPU seconds. On one thread while the other core trains the other backbones; SigLIP
    then takes torch's threads (fit's widen, siglip_threads): 1.75x faster steps on two."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.manual_seed(settings['seed'])
    t0, cpu0, c = time.time(), time.process_time(), settings
    train_reports = [r['report'] for r in data.read_split(data_dir, 'train')]
    if name == 'ceiling':
        tok = data.load_tokenizer(data_dir)
        train, val = (image_text_split(data_dir, split, tok, 1) for split in ('train', 'val'))
        probe.ceiling(train, val, data.train_transform(c['image_size']), data.eval_transform(c['image_size']), path,
                        seed=c['seed'], data=phantom_identity(data_dir))
        return time.time() - t0, time.process_time() - cpu0
    if name == 'siglip':
        tok = data.load_tokenizer(data_dir)
        text_len = max(len(w) for w in tok(train_reports)['input_ids']) + 2  # </s> and the pooled <pad>
        model = new_siglip(siglip_config(len(tok), text_len, c['width'], c['text_width'], c['layers'], c['heads'],
                                         c['image_size'], c['patch_size']), c['sincos_positions'])
        check_unseen(data_dir)
        train, val = (image_text_split(data_dir, split, tok, text_len) for split in ('train', 'val'))
        pretrain_siglip(model, train, val, tok, path, c['siglip_epochs'], c['siglip_batch_size'], c['siglip_lr'],
                        c['augment'], c['probe_steps'], c['seed'], c['multi_positive'], widen)
        return time.time() - t0, time.process_time() - cpu0
    val_reports = [r['report'] for r in data.read_split(data_dir, 'val')]
    if name == 't5':
        tok = t5_tokenizer(data_dir)
        model = t5_model(len(tok), c['width'], c['layers'], c['heads'])
        pretrain_t5(model, tok(train_reports)['input_ids'], tok(val_reports)['input_ids'], tok, path, c['t5_epochs'],
                    c['text_batch_size'], c['t5_lr'], c['seed'])
    else:
        tok = bert_tokenizer(train_reports)
        model = bert_model(len(tok), c['width'], c['layers'], c['heads'])
        pretrain_bert(model, tok, train_reports, val_reports, path, c['bert_epochs'], c['text_batch_size'],
                      c['bert_lr'], c['seed'])
    return time.time() - t0, time.process_time() - cpu0


def phantom_identity(data_dir):
    """What names the phantom set in data_dir, for the ceiling: generator version and parameters."""
    import phantom
    manifest = phantom.read_manifest(data_dir) or {}
    return dict(generator_version=manifest.get('generator_version'), params=manifest.get('params'))


def siglip_threads(jobs, cores, share=SIGLIP_WIDENS_AT):
    """fit's widen for SigLIP: every core from `share` of its steps on, once the jobs (T5's and
    BERT's Futures) are done, waiting for them if need be. The thread count changes the sums, so
    the step it changes at must not follow timing. A failed job raises its error at once."""
    def widen(done):
        for job in jobs:
            if job.done() and job.exception() is not None:
                raise job.exception()
        if done < share:
            return 0
        for job in jobs:
            job.result()
        return cores
    return widen


def vocabulary_problem(path, data_dir):
    """Why a backbone directory made from the phantom tokenizer does not fit data_dir's (an older
    phantom set numbered its words differently); None when it fits or holds no tokenizer."""
    if not os.path.isfile(os.path.join(path, 'tokenizer.json')):
        return None
    with transformers_quiet():
        saved, words = data.load_tokenizer(path).get_vocab(), data.load_tokenizer(data_dir).get_vocab()
    differ = sorted(w for w, i in words.items() if saved.get(w) != i)
    if differ:
        return (f"{path} was made from another phantom vocabulary than {data_dir}'s ({len(differ)} of {len(words)} "
                f"words differ, e.g. {differ[0]!r}): delete it to pretrain it again")
    return None


def main(settings):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    import phantom
    t0 = time.time()
    phantom.ensure_phantom(data_dir)
    todo = {}
    for name in ('siglip', 't5', 'bert'):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            problem = vocabulary_problem(path, data_dir) if name in ('siglip', 't5') else None
            if problem:
                sys.exit(problem)
            print(f"{name}: {path} exists, skipping it (delete it to train it again)")
        else:
            todo[name] = path
    # T5 then BERT in a second process while SigLIP, the longest, trains here, then on torch's threads (its
    # physical cores, or OMP_NUM_THREADS: set it to 1 on a busy machine), the same steps with or without `parallel`.
    cores = torch.get_num_threads()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        text = {name: pool.submit(run, name, todo[name], data_dir, settings)
                for name in ('t5', 'bert') if name in todo and parallel}
        widen = siglip_threads(list(text.values()), cores)
        seconds = {name: run(name, todo[name], data_dir, settings, widen) for name in todo if name not in text}
        seconds.update({name: job.result() for name, job in text.items()})
    if ceiling:
        todo['ceiling'] = os.path.join(out_dir, CEILING_FILE)
        seconds['ceiling'] = run('ceiling', todo['ceiling'], data_dir, settings)
    for name in todo:
        print(f"{name}: saved {todo[name]} in {seconds[name][0]:.0f} s ({seconds[name][1]:.0f} s of CPU)")
    print('\n'.join(probe.against_ceiling(os.path.join(out_dir, 'siglip', PROBE_FILE),
                                         [os.path.join(out_dir, CEILING_FILE), REFERENCE_CEILING],
                                         phantom_identity(data_dir))))
    print(f"pretrain.py: {time.time() - t0:.0f} s in all")


if __name__ == '__main__':
    from configurator import configure
    main(configure(globals(), sys.argv[1:]))
