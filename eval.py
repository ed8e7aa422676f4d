"""
Scores generated reports.

    python eval.py --out_dir=out-smoke --split=test          # generate for a split, then score
    python eval.py --predictions=FILE.jsonl                 # score existing predictions
    python eval.py --seeds=out-a,out-b,out-c --split=test   # several runs' metrics as mean +- std

Generation mode writes out_dir/predictions_<split>.jsonl (id, reference, hypothesis,
probabilities, labels), out_dir/metrics_<split>.json and out_dir/metrics_<split>.txt.
It reports:
- BLEU-1..4 (corpus), ROUGE-L (rouge-score) and METEOR (nltk) on normalized text;
- the paper-style row in the R2Gen family's convention (pycocoevalcap on lowercased,
  punctuation-split text): BLEU-1..4, METEOR 1.5 (its Java jar; marked unavailable without
  Java, never replaced), ROUGE-L and CIDEr-D, so numbers compare with published tables;
- clinical efficacy: the labeler on hypothesis and reference, P/R/F1 per condition,
  micro and macro over the 14 and over the 5 common conditions, and example-based (per
  report, then averaged), headed by the labeler and the uncertain policy;
- the aux head's ROC-AUC per condition (and a ROC PNG); BERTScore with a local model;
- per condition, the reports' clinical F1 (model and retrieval) beside the aux head's AUC:
  a condition the queries know (high AUC) that the decoder does not write (low F1) shows;
- faithfulness: per condition the reports' F1, the aux head's F1 at its thresholds (chosen on
  val by train.py; 0.5 where none were, and it says so) and how often the report states what
  the head decided, present or absent; one overall agreement figure;
- with oracle=True, for a diagnosis_prompt checkpoint, the reports written with the
  reference's labels in the slot: the ceiling of the decoder given perfect eyes, not a result;
- baselines scored the same way: the most frequent training report, and retrieval of
  the training report whose image is nearest (32 x 32 thumbnails, cosine);
- on phantom data, grounding of each anatomical query in its region's box: the share of its
  attention inside, and pointing, how often its peak patch touches the box, each beside chance.

Honest counting: a predictions file is checked before anything is scored (each id once, each
field of its type, 14 finite probabilities, UTF-8), errors naming the file, line and id;
an empty (or null) hypothesis stays in and scores 0 on every text metric;
a record whose reference is empty is the data's fault, left out of the text and clinical
scores and named (the aux AUC, which reads its labels, keeps it).
A report is scored on its first metrics.MAX_TOKENS (1,000) tokens (words and punctuation
marks) and metrics.MAX_CHARS (20,000) characters: a longer one (no real report is) is cut,
with a warning naming its record. That bounds time and memory: a 2,000,000-character pair,
which once took 24 GB (ROUGE-L's LCS table is tokens x tokens), scores in seconds within
the ~0.75 GB that eval.py's imports take anyway.
"""
import json
import math
import os
import sys
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import data
import hardware
from chexpert import CONDITIONS, binarize, make_labeler
from checkpoint import decision_thresholds, load_checkpoint
from chexquery import GENERATION
from metrics import (MAX_CHARS, MAX_TOKENS, Meteor15, auc_per_condition, clinical_labels, clinical_metrics, clip,
                     decide, faithfulness, grounding, nlg_metrics, normalize, region_shares)

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
meteor15 = True               # the paper-style row's METEOR 1.5 (pycocoevalcap's Java jar, ~10 s to start)
baselines = True
context = None                # None: as the checkpoint was trained (with context: both ways, an A/B table); True, False
diagnosis_prompt = None       # None: as the checkpoint was trained; True or False must match it
oracle = False                # diagnosis_prompt: also write with the reference labels in the slot (a ceiling)
section = ''                  # predictions mode: score one section ('findings', 'impression') of both reports
device = 'auto'
cpu_kernels = False           # True: hardware.py's CPU speed-ups (oneDNN linears, kept freed memory, lean beam cache)
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


def baseline_reports(data_dir, test_records, target='both'):
    """{baseline: [report per test record]}: the most frequent training report for every image,
    and the report of the nearest training image (cosine on 32 x 32 thumbnails); the target
    section of it when the model writes one section only."""
    train = [r for r in data.read_split(data_dir, 'train') if data.target_text(r, target)]
    for r in train:
        r['report'] = data.target_text(r, target)
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
                         cpu_kernels=False, context=None, diagnosis=None, oracle=False, **generation):
    """Runs a run's checkpoint over a split, with the indication ahead of the prompt or not
    (context None: as it was trained) and, for a diagnosis_prompt checkpoint, the aux head's
    decisions in the slot (oracle: the reference's labels, binarized as in training); returns
    the prediction records and the run config."""
    dev = hardware.resolve_device(device)
    model, meta = load_checkpoint(ckpt or run_dir, dev, merge_lora=True)
    if dev == 'cpu' and cpu_kernels:
        hardware.use_cpu_kernels(model)
    cfg, tok = meta['config'], data.run_tokenizer(meta['config'])
    context, target = data.check_context(context, cfg, ckpt or run_dir), cfg.get('target', 'both')
    diagnosis = data.check_diagnosis(diagnosis, cfg, ckpt or run_dir)
    thresholds, thresholds_from = decision_thresholds(meta)
    if oracle and not diagnosis:
        raise ValueError(f"oracle=True puts the reference labels in the diagnosis slot, but {ckpt or run_dir} was "
                         f"trained without diagnosis_prompt")
    ds = data.ReportDataset(cfg['data_dir'], split_name, tok, model.cfg.image_size, train=False, target=target,
                            context=context, max_len=cfg['max_len'], uncertain=cfg['uncertain'])
    if ds.left_out:
        print(f"target={target}: {ds.left_out} {split_name} studies with an empty {target} section left out")
    n = min(len(ds), max_samples) if max_samples else len(ds)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(n)), batch_size=batch_size,
                                         collate_fn=data.collate)
    by_id = {r['id']: r for r in ds.records}
    records = []
    for b in loader:
        if b is None:
            continue
        indications = [by_id[k].get('indication', '') if context else '' for k in b['ids']]
        with torch.no_grad():
            enc = model.encode(b['image'].to(dev), return_attention=True)  # once, for report and probabilities
        probs = enc['cond_logits'].float().sigmoid().cpu().numpy()
        decisions = decide(probs, thresholds)
        slots = None if not diagnosis else (b['cond_labels'] > 0.5).tolist() if oracle else decisions.tolist()
        with torch.no_grad():
            reports = data.write_reports(model, tok, enc['visual_tokens'], ds.prompt, indications, slots, **generation)
        attention = enc['attention'].float().cpu().numpy()
        for i, (k, hyp) in enumerate(zip(b['ids'], reports)):
            r = by_id[k]
            rec = dict(id=k, reference=data.target_text(r, target), hypothesis=hyp, probabilities=probs[i].round(5).tolist(),
                       decisions=decisions[i].astype(int).tolist(), thresholds_chosen=meta.get('thresholds') is not None,
                       labels=r['labels'], image=r['image'], target=target, context=context)
            if diagnosis:
                rec['diagnosis'] = 'reference labels (oracle)' if oracle else 'aux head'
            if indications[i]:
                rec['indication'] = indications[i]  # input, kept apart: never in the reference or the hypothesis
            if r.get('regions'):
                rec['grounding'] = region_shares(attention[i], r['regions'])
            records.append(rec)
    print(f"generated {len(records)} reports for {cfg['data_dir']} {split_name} ({n - len(records)} images skipped), "
          f"target {target}, context {'on' if context else 'off'}, diagnosis prompt "
          f"{('from the reference labels (the oracle)' if oracle else 'from the aux head') if diagnosis else 'off'}; "
          f"thresholds: {thresholds_from}")
    return records, cfg


def section_of(text, name):
    """One section of a 'Findings: ... | Impression: ...' report, label included; '' when it has none."""
    for part in (text or '').split('|'):
        if part.strip().lower().startswith(name + ':'):
            return part.strip()
    return ''


def cut_to_section(records, name):
    """The records with reference and hypothesis cut to one section; those whose reference
    lacks it are left out (counted), so a findings-only model and a both-sections model
    are scored on the same studies and the same text."""
    data.section_prompt(name)  # a known section, or an error naming it
    kept = [dict(r, reference=section_of(r['reference'], name), hypothesis=section_of(r.get('hypothesis'), name))
            for r in records if section_of(r['reference'], name)]
    print(f"section={name}: scoring {len(kept)} records, {len(records) - len(kept)} without that section left out")
    return kept


def prediction_problem(r):
    """What is wrong with a prediction record's fields, or None: every one that is scored has
    its type checked here, so a bad file is named before anything is scored."""
    k = r['id']
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        return f"id must be text or an integer, not {type(k).__name__} {str(k)[:40]}"
    for key in ('reference', 'hypothesis'):
        if r[key] is not None and not isinstance(r[key], str):
            return f"record {k!r}: {key} must be text (or null), not {type(r[key]).__name__} {str(r[key])[:40]}"
    for key, ok, what in (('probabilities', lambda v: is_number(v) and math.isfinite(v), 'finite numbers'),
                          ('labels', lambda v: v is None or (is_number(v) and v in (-1, 0, 1)),
                           'labels (1, 0, -1 or null)')):
        v = r.get(key)
        if key not in r:
            continue
        if not isinstance(v, list) or len(v) != len(CONDITIONS):
            return (f"record {k!r}: {key} must be a list of {len(CONDITIONS)} {what}, one per condition, "
                    f"not {json.dumps(v)[:80]}")
        bad = [j for j, x in enumerate(v) if not ok(x)]
        if bad:
            return (f"record {k!r}: {key} must be {what}, but {CONDITIONS[bad[0]]}'s (entry {bad[0]}) is "
                    f"{json.dumps(v[bad[0]])}")
    if r.get('target', 'both') not in data.TARGETS:
        return f"record {k!r}: target must be one of {', '.join(data.TARGETS)}, not {r['target']!r}"
    return None


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_predictions(path):
    """The records of a predictions file, each checked (prediction_problem) and each id once: a
    repeated prediction would be scored twice. Errors name the file, the line and the id."""
    records = data.read_jsonl(path, ('id', 'reference', 'hypothesis'), prediction_problem, unique='id')
    if not records:
        raise ValueError(f"{path} holds no predictions")
    return records


# --- scoring and reporting ----------------------------------------------------------------------
def named(ids, most=10):
    return ', '.join(map(str, ids[:most])) + (f" and {len(ids) - most} more" if len(ids) > most else '')


def score(records, train_dir='', uncertain='positive', chexbert='', bert='', bertscore_model='',
          bertscore_layer=-1, meteor15=False, target='both'):
    """Every metric of a list of prediction records; the baselines too when train_dir (the
    prepared data) is given; CheXbert's labels instead of the rule labeler's with chexbert;
    METEOR 1.5 in the paper-style row with meteor15 (starts Java once). Records with an empty
    reference and records cut to the length limit are named on stderr and in the result."""
    label = make_labeler(chexbert=chexbert or None, bert=bert or None)
    refs, hyps = [r['reference'] for r in records], [r.get('hypothesis') for r in records]
    empty_refs = [r['id'] for r in records if not normalize(clip(r['reference']))]
    clipped = [r['id'] for r, a, b in zip(records, refs, hyps) if clip(a) != (a or '') or clip(b) != (b or '')]
    if empty_refs:
        print(f"warning: {len(empty_refs)} records with an empty reference are left out of the text and "
              f"clinical scores: {named(empty_refs)}", file=sys.stderr)
    if clipped:
        print(f"warning: {len(clipped)} records longer than the scoring limit are scored on their first "
              f"{metrics_limits()}: {named(clipped)}", file=sys.stderr)
    systems = {'model': hyps}
    if train_dir:
        systems.update(baseline_reports(train_dir, records, target))
    with Meteor15() if meteor15 else nullcontext() as m15:
        out = {name: dict(nlg=nlg_metrics(refs, h, bertscore_model, bertscore_layer, m15),
                          clinical=clinical_metrics(refs, h, label, uncertain)) for name, h in systems.items()}
    metrics = dict(n=len(records), labeler='CheXbert' if chexbert else 'rule-based', systems=out,
                   empty_reference_ids=empty_refs, clipped_ids=clipped)
    if all('probabilities' in r and 'labels' in r for r in records):
        targets = np.array([binarize(r['labels'], uncertain) for r in records])
        probs = np.array([r['probabilities'] for r in records])
        aucs = auc_per_condition(targets, probs)
        valid = [a for a in aucs if a == a]
        metrics['aux_auc'] = dict(zip(CONDITIONS, aucs), mean=float(np.mean(valid)) if valid else float('nan'))
    if all('decisions' in r for r in records):
        kept, true, stated = clinical_labels(refs, hyps, label, uncertain)
        decided = np.array([records[i]['decisions'] for i in kept], dtype=bool).reshape(-1, len(CONDITIONS))
        metrics['faithfulness'] = dict(faithfulness(true, stated, decided),
                                       thresholds_chosen=all(r.get('thresholds_chosen', False) for r in records))
    g = grounding(records)
    if g:
        metrics['grounding'] = g
    return metrics


def metrics_limits():
    return f"{MAX_TOKENS:,} tokens and {MAX_CHARS:,} characters"


def fmt(x, spec='.4f'):
    return 'n/a' if x is None or x != x else format(x, spec)


def condition_table(metrics):
    """Per condition: positives among the references (labeler), the reports' clinical F1
    (model, retrieval) and the aux head's AUC."""
    systems, auc = metrics['systems'], metrics.get('aux_auc', {})
    retrieval = systems.get('nearest train image', {}).get('clinical')
    lines = [f"{'per condition':<28}{'n pos':>7}{'F1 model':>10}{'F1 retrieval':>14}{'aux AUC':>9}"]
    for c in CONDITIONS:
        m = systems['model']['clinical'][c]
        lines.append(f"{c:<28}{m['positives']:>7}{fmt(m['f1'], '.3f'):>10}"
                     f"{fmt(retrieval[c]['f1'] if retrieval else None, '.3f'):>14}{fmt(auc.get(c), '.3f'):>9}")
    return lines


def clinical_table(metrics):
    """Clinical efficacy in the usual definitions, per system: micro P/R/F1 over the 14 conditions,
    macro F1 over the 14, micro and macro F1 over the 5 common ones, example-based P/R/F1; headed by
    the labeler and the uncertain policy the labels were made with."""
    model = metrics['systems']['model']['clinical']
    lines = [f"clinical efficacy: labels from the {metrics['labeler']} labeler on reference and report, "
             f"{model['uncertain_policy']} (blank and negative: 0)"]
    if 'positive' in model['uncertain_policy']:
        lines.append("(R2Gen-family papers count uncertain as negative: --uncertain=negative for their convention)")
    ex = model.get('example', {})
    lines += [f"example-based: per report over its positive labels, then the mean over the {ex.get('reports', 0)} "
              f"reports; {ex.get('no_positives', 0)} with no positive label on either side count as 0",
              f"{'system':<28}" + ''.join(f"{c:>9}" for c in ('P mic14', 'R mic14', 'F1 mic14', 'F1 mac14', 'F1 mic5',
                                                                 'F1 mac5', 'P ex', 'R ex', 'F1 ex'))]
    for name, m in metrics['systems'].items():
        c, e = m['clinical'], m['clinical'].get('example', {})
        values = (c['micro14']['precision'], c['micro14']['recall'], c['micro14']['f1'], c['macro14']['f1'],
                  c['micro5']['f1'], c['macro5']['f1'], e.get('precision'), e.get('recall'), e.get('f1'))
        lines.append(f"{name:<28}" + ''.join(f"{fmt(v):>9}" for v in values))
    return lines


def faithfulness_table(f):
    """Per condition: the reports' F1, the head's F1 at its thresholds, and how often the report
    states what the head decided; '<' marks a condition the head finds (F1 >= 0.5) that the
    reports state at less than 0.8 of the head's F1."""
    lines = ["faithfulness: does the report say what the model's own aux head decided? (the head at its "
             + ("per-condition thresholds chosen on val)" if f['thresholds_chosen'] else "default 0.5: no thresholds "
                "were chosen)"),
             f"{'per condition':<28}{'F1 report':>10}{'F1 head':>9}{'agree':>8}"]
    for c in CONDITIONS:
        v = f[c]
        gap = v['head_f1'] >= 0.5 and v['report_f1'] < 0.8 * v['head_f1']
        lines.append(f"{c:<28}{v['report_f1']:>10.3f}{v['head_f1']:>9.3f}{v['agreement']:>8.3f}" + ('  <' if gap else ''))
    lines.append(f"agreement of report and head over all conditions: {f['agreement']:.4f}; the head alone: "
                 f"micro-14 F1 {f['head_micro14_f1']:.4f}, macro-14 {f['head_macro14_f1']:.4f}")
    return lines


def grounding_table(g):
    lines = ["grounding of the anatomical queries: the share of the attention inside the region's box, beside the",
             "box's share of the image (uniform attention); pointing: how often the attention peak touches the box,",
             "beside the share of the patches that touch it (a peak at a random patch)",
             f"{'region':<28}{'share':>7}{'chance':>8}{'pointing':>10}{'chance':>8}"]
    for r, v in g.items():
        lines.append(f"{r:<28}{v['share']:>7.3f}{v['chance']:>8.3f}{fmt(v.get('pointing'), '.3f'):>10}"
                     f"{fmt(v.get('pointing_chance'), '.3f'):>8}")
    return lines


def table(metrics):
    """The human-readable summary: one row per system, the paper-style row, the per-condition
    table, then grounding."""
    cols = ('bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'meteor')
    model = metrics['systems']['model']['nlg']
    lines = [f"{metrics['n']} reports, {model['pairs']} pairs scored; clinical labels: {metrics['labeler']} labeler, "
             f"{metrics['systems']['model']['clinical']['uncertain_policy']}",
             f"{model['empty_hypotheses']} empty model reports scored 0; {model['skipped_references']} records "
             f"with an empty reference skipped; {len(metrics.get('clipped_ids', []))} records cut to "
             f"{metrics_limits()}",
             f"{'system':<28}" + ''.join(f"{c:>8}" for c in cols)
             + ''.join(f"{c:>9}" for c in ('F1mic14', 'F1mac14', 'F1mic5', 'F1mac5'))]
    for name, m in metrics['systems'].items():
        n, c = m['nlg'], m['clinical']
        lines.append(f"{name:<28}" + ''.join(f"{n[k]:>8.4f}" for k in cols)
                     + ''.join(f"{c[k]['f1']:>9.4f}" for k in ('micro14', 'macro14', 'micro5', 'macro5')))
    synonyms = 'on (WordNet)' if model['meteor_synonyms'] else 'off (WordNet not installed)'
    lines.append(f"METEOR (nltk) synonyms: {synonyms}")
    lines += ['', "paper-style row, pycocoevalcap's convention (lowercased, punctuation split; "
                  "METEOR 1.5 = its Java jar)",
              f"{'system':<28}" + ''.join(f"{c:>8}" for c in ('BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4', 'METEOR',
                                                               'ROUGE-L', 'CIDEr-D'))]
    for name, m in metrics['systems'].items():
        c = m['nlg']['coco']
        lines.append(f"{name:<28}" + ''.join(f"{fmt(c.get(k)):>8}" for k in ('bleu1', 'bleu2', 'bleu3', 'bleu4',
                                                                            'meteor', 'rouge_l', 'cider')))
    if 'meteor_unavailable' in model['coco']:
        lines.append(f"METEOR 1.5 unavailable: {model['coco']['meteor_unavailable']}")
    if 'bertscore_f1' in model:
        lines.append(f"BERTScore F1: {model['bertscore_f1']:.4f}")
    lines += [''] + clinical_table(metrics)
    lines += [''] + condition_table(metrics)
    if 'aux_auc' in metrics:
        lines.append(f"aux head ROC-AUC mean {metrics['aux_auc']['mean']:.4f}")
    if 'faithfulness' in metrics:
        lines += [''] + faithfulness_table(metrics['faithfulness'])
    if 'grounding' in metrics:
        lines += [''] + grounding_table(metrics['grounding'])
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
    """mean +- std (ddof 1; NaN for one run) over runs of every number in their metrics JSON."""
    runs = []
    for p in paths:
        f = os.path.join(p, f'metrics_{split_name}.json') if os.path.isdir(p) else p
        with open(f) as fh:
            runs.append(flatten(json.load(fh)))
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: dict(mean=float(np.mean([r[k] for r in runs])),
                    std=float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else float('nan')) for k in keys}


# The numbers --seeds prints: (name, key in the flattened metrics JSON).
HEADLINE = (('clinical F1 micro-14', 'systems.model.clinical.micro14.f1'),
            ('clinical F1 macro-14', 'systems.model.clinical.macro14.f1'),
            ('clinical F1 micro-5', 'systems.model.clinical.micro5.f1'),
            ('example-based F1', 'systems.model.clinical.example.f1'),
            ('agreement of report and head', 'faithfulness.agreement'),
            ('aux AUC mean', 'aux_auc.mean'),
            ('BLEU-4', 'systems.model.nlg.bleu4'),
            ('BLEU-4 (pycocoevalcap)', 'systems.model.nlg.coco.bleu4'),
            ('CIDEr-D', 'systems.model.nlg.coco.cider'),
            ('grounding share', 'grounding.mean.share'),
            ('grounding pointing', 'grounding.mean.pointing'))


def headline(combined):
    """One line per headline metric: 'name: mean ± std', or why it is missing."""
    return [f"{name}: {combined[k]['mean']:.4f} ± {fmt(combined[k]['std'])}" if k in combined else
            f"{name}: not in every run" for name, k in HEADLINE]


# The A/B table's rows: (name, key in the flattened metrics JSON).
AB_ROWS = (('BLEU-1', 'systems.model.nlg.coco.bleu1'), ('BLEU-4', 'systems.model.nlg.coco.bleu4'),
           ('METEOR 1.5', 'systems.model.nlg.coco.meteor'), ('ROUGE-L', 'systems.model.nlg.coco.rouge_l'),
           ('CIDEr-D', 'systems.model.nlg.coco.cider'), ('METEOR (nltk)', 'systems.model.nlg.meteor'),
           ('clinical F1 micro-14', 'systems.model.clinical.micro14.f1'),
           ('clinical F1 macro-14', 'systems.model.clinical.macro14.f1'),
           ('clinical F1 micro-5', 'systems.model.clinical.micro5.f1'),
           ('clinical F1 macro-5', 'systems.model.clinical.macro5.f1'),
           ('example-based F1', 'systems.model.clinical.example.f1'),
           ('agreement', 'faithfulness.agreement'),
           ('aux AUC mean', 'aux_auc.mean'))


def ab_table(on, off, title="clinical context A/B (one checkpoint, the same images; the aux head does not read "
                            "the context)", names=('context ON', 'OFF')):
    """Two ways of writing with one checkpoint on one split: every headline metric side by side."""
    on, off = flatten(on), flatten(off)
    lines = [title, f"{'metric':<24}{names[0]:>12}{names[1]:>10}{'difference':>12}"]
    for name, k in AB_ROWS:
        a, b = on.get(k), off.get(k)
        lines.append(f"{name:<24}{fmt(a):>12}{fmt(b):>10}{fmt(a - b if a is not None and b is not None else None, '+.4f'):>12}")
    return '\n'.join(lines)


def score_and_write(records, stem, train_dir, target):
    """Scores predictions, prints the table and writes stem.json, stem.txt (and stem_roc.png)."""
    metrics = score(records, train_dir if baselines else '', uncertain, chexbert, bert, bertscore_model,
                    bertscore_layer, meteor15, target)
    text = table(metrics)
    print(text)
    with open(stem + '.json', 'w') as f:
        json.dump(metrics, f, indent=1)
    with open(stem + '.txt', 'w') as f:
        f.write(text + '\n')
    if 'aux_auc' in metrics:
        roc_png([binarize(r['labels'], uncertain) for r in records], [r['probabilities'] for r in records],
                stem + '_roc.png')
    print(f"wrote {stem}.json, {stem}.txt" + (f", {stem}_roc.png" if 'aux_auc' in metrics else ''))
    return metrics


def generate_and_score(context, suffix='', oracle=False):
    records, cfg = generate_predictions(out_dir, split, ckpt, device, batch_size, max_samples, cpu_kernels, context,
                                        diagnosis_prompt, oracle, **{k: globals()[k] for k in GENERATION})
    with open(os.path.join(out_dir, f'predictions_{split}{suffix}.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    return score_and_write(records, os.path.join(out_dir, f'metrics_{split}{suffix}'), cfg['data_dir'],
                           cfg.get('target', 'both')), cfg


def main():
    if seeds:  # prints, writes nothing
        print('\n'.join(headline(combine_seeds([s for s in seeds.split(',') if s], split))))
        return
    if predictions:
        records, stem = read_predictions(predictions), os.path.splitext(predictions)[0] + '_metrics'
        if section:
            records, stem = cut_to_section(records, section), f"{stem}_{section}"
        score_and_write(records, stem, data_dir, section or records[0].get('target', 'both'))
    elif out_dir:
        metrics, cfg = generate_and_score(context)
        if context is None and cfg.get('context'):  # trained with context: the A/B test on the same checkpoint
            off, _ = generate_and_score(False, '_nocontext')
            text = ab_table(metrics, off)
            print('\n' + text)
            with open(os.path.join(out_dir, f'metrics_{split}_ab.txt'), 'w') as f:
                f.write(text + '\n')
        if oracle:  # the same checkpoint with the reference's labels in the slot: the decoder's ceiling
            ceiling, _ = generate_and_score(context, '_oracle', oracle=True)
            text = ab_table(ceiling, metrics, "diagnosis prompt: the reference's labels in the slot (ORACLE: a ceiling "
                            "given perfect eyes, not a result) beside the aux head's decisions", ('oracle', 'head'))
            print('\n' + text)
            with open(os.path.join(out_dir, f'metrics_{split}_oracle.txt'), 'w') as f:
                f.write(text + '\n')
    else:
        sys.exit("give --out_dir=RUN (generate and score), --predictions=FILE.jsonl or --seeds=RUN1,RUN2")


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
