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
import os
import sys
from collections import Counter

import numpy as np
import torch

import data
import hardware
from chexpert import CONDITIONS, binarize, make_labeler
from chexquery import GENERATION, load_checkpoint
from metrics import auc_per_condition, clinical_metrics, grounding, nlg_metrics, region_shares

# -----------------------------------------------------------------------------
out_dir = ''                  # a training run: generate for `split` with its ckpt.safetensors
ckpt = ''                     # a specific checkpoint instead of out_dir/ckpt.safetensors
split = 'test'
predictions = ''              # score this JSONL instead of generating
seeds = ''                    # comma-separated runs (out_dirs or metrics JSON files) to combine
data_dir = ''                 # predictions mode: the prepared data, for the baselines
batch_size = 16
max_samples = 0               # 0: the whole split
uncertain = 'positive'        # how the labeler's uncertain counts in clinical F1
chexbert = ''                 # chexbert.pth for clinical labels instead of the rule-based labeler ...
bert = ''                     # ... with a local bert-base-uncased
bertscore_model = ''          # a local model directory turns BERTScore on
bertscore_layer = -1          # its hidden layer used for the token embeddings
baselines = True
device = 'auto'
cpu_kernels = True            # on the CPU: oneDNN linears, kept freed memory, lean beam cache (hardware.py)
globals().update(GENERATION)  # num_beams, no_repeat_ngram_size, ... : the model's defaults, overridable here
# -----------------------------------------------------------------------------


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


# --- baselines -------------------------------------------------------------------------------
def thumbnail(path, size=32):
    im = data.load_image(path).convert('L').resize((size, size))
    v = np.asarray(im, dtype=np.float32).ravel()
    v = v - v.mean()
    return v / (np.linalg.norm(v) + 1e-6)


def baseline_reports(data_dir, test_records):
    """{baseline: [report per test record]}: the most frequent training report for every image,
    and the report of the nearest training image (cosine on 32 x 32 thumbnails)."""
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
def generate_predictions(run_dir, split_name, ckpt='', device='auto', batch_size=16, max_samples=0,
                         cpu_kernels=True, **generation):
    """Runs a run's checkpoint over a split; returns the prediction records and the run config."""
    dev = hardware.resolve_device(device)
    model, meta = load_checkpoint(ckpt or run_dir, dev, merge_lora=True)
    if dev == 'cpu' and cpu_kernels:
        hardware.use_cpu_kernels(model)
    cfg, tok = meta['config'], data.run_tokenizer(meta['config'])
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
            enc = model.encode(b['image'].to(dev), return_attention=True)  # once, for report and probabilities
            ids = model.generate(None, prompt, visual_tokens=enc['visual_tokens'], **generation)
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
    records = data.read_jsonl(path, ('id', 'reference', 'hypothesis'))
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


# --- scoring and reporting ----------------------------------------------------------------------
def score(records, train_dir='', uncertain='positive', chexbert='', bert='', bertscore_model='',
          bertscore_layer=-1):
    """Every metric of a list of prediction records; the baselines too when train_dir (the
    prepared data) is given; CheXbert's labels instead of the rule labeler's with chexbert."""
    label = make_labeler(chexbert=chexbert or None, bert=bert or None)
    refs, hyps = [r['reference'] for r in records], [r['hypothesis'] for r in records]
    systems = {'model': hyps}
    if train_dir:
        systems.update(baseline_reports(train_dir, records))
    out = {name: dict(nlg=nlg_metrics(refs, h, bertscore_model, bertscore_layer),
                      clinical=clinical_metrics(refs, h, label, uncertain)) for name, h in systems.items()}
    metrics = dict(n=len(records), labeler='CheXbert' if chexbert else 'rule-based', systems=out)
    if all('probabilities' in r and 'labels' in r for r in records):
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
        records, cfg = generate_predictions(out_dir, split, ckpt, device, batch_size, max_samples, cpu_kernels,
                                            **{k: globals()[k] for k in GENERATION})
        target, train_dir = os.path.join(out_dir, f'predictions_{split}'), cfg['data_dir']
        with open(target + '.jsonl', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in records)
        target = os.path.join(out_dir, f'metrics_{split}')
    else:
        sys.exit("give --out_dir=RUN (generate and score), --predictions=FILE.jsonl or --seeds=RUN1,RUN2")
    metrics = score(records, train_dir if baselines else '', uncertain, chexbert, bert, bertscore_model,
                    bertscore_layer)
    text = table(metrics)
    print(text)
    with open(target + '.json', 'w') as f:
        json.dump(metrics, f, indent=1)
    with open(target + '.txt', 'w') as f:
        f.write(text + '\n')
    if 'aux_auc' in metrics:
        roc_png([binarize(r['labels'], uncertain) for r in records], [r['probabilities'] for r in records],
                target + '_roc.png')
    print(f"wrote {target}.json, {target}.txt" + (f", {target}_roc.png" if 'aux_auc' in metrics else ''))


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
