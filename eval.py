"""
Scores generated reports.

    python eval.py --out_dir=out-smoke --split=test          # generate for a split, then score
    python eval.py --predictions=FILE.jsonl                 # score existing predictions
    python eval.py --seeds=out-a,out-b,out-c --split=test   # several runs' metrics as mean +- std

Generation mode writes out_dir/predictions_<split>.jsonl (id, reference, hypothesis,
probabilities, labels), out_dir/metrics_<split>.json and out_dir/metrics_<split>.txt.
It reports:
- BLEU-1..4 (corpus), ROUGE-L (rouge-score) and METEOR (nltk) on normalized text;
- the R2Gen family's convention (pycocoevalcap's corpus BLEU and ROUGE-L on lowercased,
  punctuation-split text), so numbers compare with published tables;
- clinical efficacy: the labeler on hypothesis and reference, P/R/F1 per condition,
  micro and macro over the 14 and over the 5 common conditions;
- the aux head's ROC-AUC per condition (and a ROC PNG); BERTScore with a local model;
- baselines scored the same way: the most frequent training report, and retrieval of
  the training report whose image is nearest (32 x 32 thumbnails, cosine);
- on phantom data, grounding: the share of each anatomical query's attention in its region.
"""
import json
import math
import os
import re
import sys
import unicodedata
from collections import Counter

import numpy as np

from chexpert import CONDITIONS, REGIONS

# -----------------------------------------------------------------------------
out_dir = ''                  # a training run: generate for `split` with its ckpt.safetensors
ckpt = ''                     # a specific checkpoint instead of out_dir/ckpt.safetensors
split = 'test'
predictions = ''              # score this JSONL instead of generating
seeds = ''                    # comma-separated runs (out_dirs or metrics JSON files) to combine
data_dir = ''                 # predictions mode: the prepared data, for the baselines
batch_size = 16
max_samples = 0               # 0: the whole split
num_beams = 4                 # the methodology's generation defaults
no_repeat_ngram_size = 3
length_penalty = 1.0
early_stopping = True
min_length = 20
max_length = 512
uncertain = 'positive'        # how the labeler's uncertain counts in clinical F1
chexbert = ''                 # chexbert.pth for clinical labels instead of the rule-based labeler ...
bert = ''                     # ... with a local bert-base-uncased
bertscore_model = ''          # a local model directory turns BERTScore on
bertscore_layer = -1          # its hidden layer used for the token embeddings
baselines = True
device = 'auto'
# -----------------------------------------------------------------------------
COMMON5 = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion')


# --- text ---------------------------------------------------------------------------------
def normalize(text):
    """The methodology's 8.4: None/empty -> ''; lowercase; drop the 'Findings:', 'Impression:'
    and '|' markers; unicode NFKC; punctuation removed; whitespace collapsed."""
    if not text:
        return ''
    text = unicodedata.normalize('NFKC', str(text)).lower()
    text = re.sub(r'findings\s*:|impression\s*:|\|', ' ', text)
    text = ''.join(' ' if unicodedata.category(ch).startswith('P') else ch for ch in text)
    return ' '.join(text.split())


def tokenize(text):
    """NLTK's Treebank tokenizer: needs no downloaded NLTK data (word_tokenize needs punkt)."""
    from nltk.tokenize import TreebankWordTokenizer
    return TreebankWordTokenizer().tokenize(text)


def valid_pairs(refs, hyps):
    """(normalized refs, normalized hyps, skipped): a pair with an empty side is skipped and counted."""
    out_r, out_h = [], []
    for r, h in zip(refs, hyps):
        r, h = normalize(r), normalize(h)
        if r and h:
            out_r.append(r)
            out_h.append(h)
    return out_r, out_h, len(refs) - len(out_r)


def coco_text(text):
    """The R2Gen convention: lowercase, punctuation split off as its own tokens (markers dropped)."""
    text = re.sub(r'findings\s*:|impression\s*:|\|', ' ', (text or '').lower())
    return ' '.join(re.findall(r"\w+|[^\w\s]", text))


# --- NLG metrics ----------------------------------------------------------------------------
def bleu(refs, hyps):
    """Corpus BLEU-1..4 (nltk, uniform weights, no smoothing) on token lists."""
    from nltk.translate.bleu_score import corpus_bleu
    r, h = [[x] for x in refs], list(hyps)
    weights = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
    return {f'bleu{n + 1}': corpus_bleu(r, h, weights=w) for n, w in enumerate(weights)}


def rouge_l(refs, hyps):
    """Mean ROUGE-L F-measure over pairs (rouge-score)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(['rougeL'])
    return float(np.mean([scorer.score(r, h)['rougeL'].fmeasure for r, h in zip(refs, hyps)]))


class NoWordNet:
    """Stands in for WordNet when its data is not installed: no synonyms, so METEOR counts
    exact and stem matches only (and the output says so)."""
    def synsets(self, *args, **kwargs):
        return []


def wordnet_or_none():
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        return None


def meteor(refs, hyps):
    """(mean METEOR, synonyms on?) with nltk's meteor_score on token lists."""
    from nltk.translate.meteor_score import meteor_score
    wn = wordnet_or_none()
    scores = [meteor_score([r], h, wordnet=wn or NoWordNet()) for r, h in zip(refs, hyps)]
    return float(np.mean(scores)), wn is not None


def coco_bleu(refs, hyps, n=4):
    """pycocoevalcap's corpus BLEU: clipped n-gram counts summed over the corpus, brevity
    penalty from each pair's closest reference length, and its 1e-9 / 1e-15 constants."""
    small, tiny = 1e-9, 1e-15
    correct, guess, testlen, reflen = [0] * n, [0] * n, 0, 0
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(), hyp.split()
        testlen, reflen = testlen + len(h), reflen + len(r)
        for k in range(1, n + 1):
            rc = Counter(tuple(r[i:i + k]) for i in range(len(r) - k + 1))
            hc = Counter(tuple(h[i:i + k]) for i in range(len(h) - k + 1))
            correct[k - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            guess[k - 1] += max(0, len(h) - k + 1)
    out, score = {}, 1.0
    ratio = (testlen + tiny) / (reflen + small)
    for k in range(n):
        score *= (correct[k] + tiny) / (guess[k] + small)
        out[f'bleu{k + 1}'] = score ** (1 / (k + 1)) * (math.exp(1 - 1 / ratio) if ratio < 1 else 1)
    return out


def lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def coco_rouge_l(refs, hyps, beta=1.2):
    """pycocoevalcap's ROUGE-L: LCS-based F with beta 1.2, averaged over pairs."""
    scores = []
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(' '), hyp.split(' ')
        m = lcs(r, h)
        p, rec = m / len(h), m / len(r)
        scores.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return float(np.mean(scores))


def bertscore(refs, hyps, model_dir, layer=-1, batch=16):
    """BERTScore F1 (greedy cosine matching of token embeddings, no idf, no rescaling)."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, return_tensors='pt')
        h = model(**enc, output_hidden_states=True).hidden_states[layer]
        return [torch.nn.functional.normalize(h[i][enc['attention_mask'][i].bool()][1:-1], dim=-1)
                for i in range(len(texts))]
    f1 = []
    for i in range(0, len(refs), batch):
        for r, h in zip(embed(refs[i:i + batch]), embed(hyps[i:i + batch])):
            sim = h @ r.T                                                      # (Th, Tr)
            p, rec = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
            f1.append(2 * p * rec / (p + rec) if p + rec > 0 else 0.0)
    return float(np.mean(f1))


def nlg_metrics(refs, hyps):
    r, h, skipped = valid_pairs(refs, hyps)
    if not r:
        raise ValueError(f"no valid (non-empty) reference/hypothesis pairs among {len(refs)}")
    rt, ht = [tokenize(x) for x in r], [tokenize(x) for x in h]
    out = dict(bleu(rt, ht), rouge_l=rouge_l(r, h))
    out['meteor'], out['meteor_synonyms'] = meteor(rt, ht)
    pairs = [(coco_text(a), coco_text(b)) for a, b in zip(refs, hyps) if normalize(a) and normalize(b)]
    cr, ch = [a for a, _ in pairs], [b for _, b in pairs]
    out['coco'] = dict(coco_bleu(cr, ch), rouge_l=coco_rouge_l(cr, ch))
    if bertscore_model:
        out['bertscore_f1'] = bertscore(r, h, bertscore_model, bertscore_layer)
    out['pairs'], out['skipped_pairs'] = len(r), skipped
    return out


# --- clinical efficacy and the aux head ----------------------------------------------------
def prf(tp, fp, fn):
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)


def clinical_scores(true, pred):
    """P/R/F1 per condition, micro and macro over the 14 and the 5 common ones, from
    binary (N, 14) arrays: reference labels and hypothesis labels."""
    true, pred = np.asarray(true, bool), np.asarray(pred, bool)
    tp, fp, fn = (true & pred).sum(0), (~true & pred).sum(0), (true & ~pred).sum(0)
    out = {c: prf(tp[i], fp[i], fn[i]) for i, c in enumerate(CONDITIONS)}
    for name, conds in (('14', CONDITIONS), ('5', COMMON5)):
        idx = [CONDITIONS.index(c) for c in conds]
        out[f'micro{name}'] = prf(tp[idx].sum(), fp[idx].sum(), fn[idx].sum())
        out[f'macro{name}'] = {k: float(np.mean([out[c][k] for c in conds])) for k in ('precision', 'recall', 'f1')}
    return out


def clinical_metrics(refs, hyps, label):
    from chexpert import binarize
    true = [binarize(x, uncertain) for x in label(refs)]
    pred = [binarize(x, uncertain) for x in label(hyps)]
    return dict(clinical_scores(true, pred), uncertain_policy=f"uncertain counted as {uncertain}")


def auc_per_condition(targets, probs):
    """ROC-AUC of each column (Mann-Whitney, ties averaged); NaN where one class is missing."""
    targets, probs = np.asarray(targets) > 0.5, np.asarray(probs, dtype=np.float64)
    out = []
    for j in range(targets.shape[1]):
        t, s = targets[:, j], probs[:, j]
        n_pos, n_neg = int(t.sum()), int((~t).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(float('nan'))
            continue
        order = np.argsort(s, kind='mergesort')
        ranks = np.empty(len(s))
        ranks[order] = np.arange(1, len(s) + 1)
        for v in np.unique(s):  # ties share their mean rank
            tie = s == v
            ranks[tie] = ranks[tie].mean()
        out.append(float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)))
    return out


def roc_png(targets, probs, path, cell=150):
    """ROC curves of the 14 conditions, one small plot each, drawn with PIL."""
    from PIL import Image, ImageDraw
    targets, probs = np.asarray(targets) > 0.5, np.asarray(probs)
    aucs = auc_per_condition(targets, probs)
    img = Image.new('RGB', (4 * cell, 4 * cell), 'white')
    d = ImageDraw.Draw(img)
    for j, c in enumerate(CONDITIONS):
        x0, y0, m = (j % 4) * cell, (j // 4) * cell, 18
        box = (x0 + m, y0 + m, x0 + cell - 6, y0 + cell - 6)
        d.rectangle(box, outline='gray')
        d.line([box[0], box[3], box[2], box[1]], fill=(200, 200, 200))  # chance
        d.text((x0 + 4, y0 + 3), f"{c[:17]} {aucs[j]:.2f}", fill='black')
        t, s = targets[:, j], probs[:, j]
        if t.any() and (~t).any():
            order = np.argsort(-s, kind='mergesort')
            tpr = np.concatenate([[0], np.cumsum(t[order]) / t.sum()])
            fpr = np.concatenate([[0], np.cumsum(~t[order]) / (~t).sum()])
            w, h = box[2] - box[0], box[3] - box[1]
            d.line([(box[0] + f * w, box[3] - r * h) for f, r in zip(fpr, tpr)], fill='red', width=2)
    img.save(path)


def grounding(records):
    """Mean share of each anatomical query's attention that falls inside its region's box."""
    shares = {r: [] for r in REGIONS}
    chance = {r: [] for r in REGIONS}
    for rec in records:
        for r, v in (rec.get('grounding') or {}).items():
            shares[r].append(v['share'])
            chance[r].append(v['area'])
    if not any(shares.values()):
        return None
    out = {r: dict(share=float(np.mean(shares[r])), chance=float(np.mean(chance[r]))) for r in REGIONS if shares[r]}
    out['mean'] = dict(share=float(np.mean([v['share'] for v in out.values()])),
                       chance=float(np.mean([v['chance'] for v in out.values()])))
    return out


def region_shares(attention, regions):
    """{region: {share, area}} for one image's (20, N) attention and its region boxes."""
    g = int(round(attention.shape[-1] ** 0.5))
    centers = (np.arange(g) + 0.5) / g
    out = {}
    for j, r in enumerate(REGIONS):
        if r not in regions:
            continue
        x0, y0, x1, y1 = regions[r]
        inside = ((centers[None, :] >= x0) & (centers[None, :] <= x1) & (centers[:, None] >= y0) & (centers[:, None] <= y1))
        a = attention[len(CONDITIONS) + j].reshape(g, g)
        out[r] = dict(share=float(a[inside].sum() / max(a.sum(), 1e-12)), area=float(inside.mean()))
    return out


# --- baselines -------------------------------------------------------------------------------
def thumbnail(path, size=32):
    import data
    im = data.load_image(path).convert('L').resize((size, size))
    v = np.asarray(im, dtype=np.float32).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def baseline_reports(data_dir, test_records):
    """{baseline: [report per test record]}: the most frequent training report for every image,
    and the report of the nearest training image (cosine on 32 x 32 thumbnails)."""
    import data
    train = data.read_split(data_dir, 'train')
    out = {'most frequent train report': [Counter(r['report'] for r in train).most_common(1)[0][0]] * len(test_records)}
    try:
        tr = np.stack([thumbnail(os.path.join(data_dir, r['image'])) for r in train])      # (N_train, 1024)
        te = np.stack([thumbnail(os.path.join(data_dir, r['image'])) for r in test_records])
        out['nearest train image'] = [train[i]['report'] for i in (te @ tr.T).argmax(1)]
    except ValueError as e:  # an unreadable image: the retrieval baseline is left out, saying why
        print(f"retrieval baseline skipped: {e}")
    return out


# --- predictions ------------------------------------------------------------------------------
def generate_predictions(run_dir, split_name):
    """Runs the checkpoint over a split; returns the prediction records (and the run config)."""
    import torch
    import data
    from sample import load_model
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    model, tok, cfg = load_model(run_dir, ckpt, dev)
    ds = data.ReportDataset(cfg['data_dir'], split_name, tok, model.cfg.image_size, train=False,
                            prompt=cfg['prompt'], max_len=cfg['max_len'], uncertain=cfg['uncertain'])
    n = min(len(ds), max_samples) if max_samples else len(ds)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size,
                                         collate_fn=data.collate)
    prompt = data.prompt_ids(tok, cfg['prompt'])
    by_id = {r['id']: r for r in ds.records}
    records = []
    for b in loader:
        if b is None:
            continue
        with torch.no_grad():
            features = model.vision_features(b['image'].to(dev))  # SigLIP once for report and probabilities
            enc = model.encode(features=features, return_attention=True)
            ids = model.generate(None, prompt, features=features, num_beams=num_beams, min_length=min_length,
                                 no_repeat_ngram_size=no_repeat_ngram_size, length_penalty=length_penalty,
                                 early_stopping=early_stopping, max_length=max_length)
        probs = enc['cond_logits'].float().sigmoid().cpu().numpy()
        attention = enc['attention'].float().cpu().numpy()
        for i, (k, hyp) in enumerate(zip(b['ids'], tok.batch_decode(ids, skip_special_tokens=True))):
            r = by_id[k]
            rec = dict(id=k, reference=r['report'], hypothesis=hyp.strip(), probabilities=probs[i].round(5).tolist(),
                       labels=r['labels'], image=r['image'])
            if r.get('regions'):
                rec['grounding'] = region_shares(attention[i], r['regions'])
            records.append(rec)
    print(f"generated {len(records)} reports for {cfg['data_dir']} {split_name} ({n - len(records)} images skipped)")
    return records, cfg


def read_predictions(path):
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in ('id', 'reference', 'hypothesis') if k not in r]
            if missing:
                raise ValueError(f"{path}:{n}: missing keys {missing} (each line needs id, reference, hypothesis)")
            records.append(r)
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


# --- scoring and reporting ----------------------------------------------------------------------
def score(records, train_dir=''):
    """Every metric of a list of prediction records, baselines included when train_dir is given."""
    from chexpert import make_labeler
    label = make_labeler(chexbert=chexbert or None, bert=bert or None)
    refs, hyps = [r['reference'] for r in records], [r['hypothesis'] for r in records]
    systems = {'model': hyps}
    if train_dir and baselines:
        systems.update(baseline_reports(train_dir, records))
    out = {name: dict(nlg=nlg_metrics(refs, h), clinical=clinical_metrics(refs, h, label)) for name, h in systems.items()}
    metrics = dict(n=len(records), labeler='CheXbert' if chexbert else 'rule-based', systems=out)
    if all('probabilities' in r and 'labels' in r for r in records):
        from chexpert import binarize
        targets = np.array([binarize(r['labels'], uncertain) for r in records])
        probs = np.array([r['probabilities'] for r in records])
        aucs = auc_per_condition(targets, probs)
        valid = [a for a in aucs if a == a]
        metrics['aux_auc'] = dict(zip(CONDITIONS, aucs), mean=float(np.mean(valid)) if valid else float('nan'))
    g = grounding(records)
    if g:
        metrics['grounding'] = g
    return metrics


def table(metrics):
    """The human-readable summary: one row per system, then AUC and grounding."""
    cols = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'meteor')
    lines = [f"{metrics['n']} reports; clinical labels: {metrics['labeler']} labeler, "
             f"{next(iter(metrics['systems'].values()))['clinical']['uncertain_policy']}",
             f"{'system':<28}" + ''.join(f"{c:>8}" for c in cols) + f"{'cocoB4':>8}{'cocoRL':>8}"
             + ''.join(f"{c:>9}" for c in ('F1mic14', 'F1mac14', 'F1mic5', 'F1mac5'))]
    for name, m in metrics['systems'].items():
        n, c = m['nlg'], m['clinical']
        lines.append(f"{name:<28}" + ''.join(f"{n[k]:>8.4f}" for k in cols) + f"{n['coco']['bleu4']:>8.4f}"
                     f"{n['coco']['rouge_l']:>8.4f}" + ''.join(f"{c[k]['f1']:>9.4f}" for k in ('micro14', 'macro14', 'micro5', 'macro5')))
    model = metrics['systems']['model']['nlg']
    lines.append(f"METEOR synonyms: {'on (WordNet)' if model['meteor_synonyms'] else 'off (WordNet not installed)'}; "
                 f"{model['skipped_pairs']} pairs with an empty side skipped")
    if 'bertscore_f1' in model:
        lines.append(f"BERTScore F1: {model['bertscore_f1']:.4f}")
    lines.append('per condition (model): ' + ', '.join(f"{c} F1 {metrics['systems']['model']['clinical'][c]['f1']:.2f}"
                                                       for c in CONDITIONS))
    if 'aux_auc' in metrics:
        lines.append(f"aux head ROC-AUC mean {metrics['aux_auc']['mean']:.4f}: " +
                     ', '.join(f"{c} {metrics['aux_auc'][c]:.2f}" for c in CONDITIONS))
    if 'grounding' in metrics:
        lines.append("grounding (attention share inside the region / uniform chance): " +
                     ', '.join(f"{r} {v['share']:.2f}/{v['chance']:.2f}" for r, v in metrics['grounding'].items()))
    return '\n'.join(lines)


def flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f'{prefix}{k}.'))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f'{prefix}{k}'] = v
    return out


def combine_seeds(paths, split_name):
    """mean +- std over runs of every number in their metrics JSON."""
    runs = []
    for p in paths:
        f = os.path.join(p, f'metrics_{split_name}.json') if os.path.isdir(p) else p
        with open(f) as fh:
            runs.append(flatten(json.load(fh)))
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: dict(mean=float(np.mean([r[k] for r in runs])), std=float(np.std([r[k] for r in runs], ddof=1))
                    if len(runs) > 1 else 0.0) for k in keys}


def main():
    if seeds:
        combined = combine_seeds([s for s in seeds.split(',') if s], split)
        for k, v in combined.items():
            if k.startswith('systems.model.') or k.startswith('aux_auc.mean'):
                print(f"{k:<55} {v['mean']:.4f} +- {v['std']:.4f}")
        return
    if predictions:
        records, target, train_dir = read_predictions(predictions), os.path.splitext(predictions)[0] + '_metrics', data_dir
    elif out_dir:
        records, cfg = generate_predictions(out_dir, split)
        target, train_dir = os.path.join(out_dir, f'predictions_{split}'), cfg['data_dir']
        with open(target + '.jsonl', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)
        target = os.path.join(out_dir, f'metrics_{split}')
    else:
        sys.exit("give --out_dir=RUN (generate and score), --predictions=FILE.jsonl or --seeds=RUN1,RUN2")
    metrics = score(records, train_dir)
    text = table(metrics)
    print(text)
    with open(target + '.json', 'w') as f:
        json.dump(metrics, f, indent=1)
    with open(target + '.txt', 'w') as f:
        f.write(text + '\n')
    if 'aux_auc' in metrics:
        from chexpert import binarize
        roc_png([binarize(r['labels'], uncertain) for r in records], [r['probabilities'] for r in records],
                target + '_roc.png')
    print(f"wrote {target}.json, {target}.txt" + (f", {target}_roc.png" if 'aux_auc' in metrics else ''))


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
