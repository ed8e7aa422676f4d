"""
The scores of generated reports, as pure functions of their inputs: no config, no files.

- text: BLEU-1..4 (corpus), ROUGE-L and METEOR on normalized text, and pycocoevalcap's
  corpus BLEU and ROUGE-L on R2Gen-style text (re-implemented; the tests check them
  against pycocoevalcap);
- clinical efficacy: P/R/F1 per condition, micro and macro over the 14 and the 5 common
  conditions, from labels a labeler gave the reference and the hypothesis;
- the aux head's ROC-AUC per condition;
- grounding: where each anatomical query's attention falls against its region's box.
"""
import math
import re
import unicodedata
from collections import Counter

import numpy as np

from chexpert import COMMON5, CONDITIONS, REGIONS, binarize


# --- text ---------------------------------------------------------------------------------
def normalize(text):
    """Text as the metrics compare it: None/empty -> ''; unicode NFKC; lowercase; the
    'Findings:', 'Impression:' and '|' markers and all punctuation removed; whitespace collapsed."""
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


def nlg_metrics(refs, hyps, bertscore_model='', bertscore_layer=-1):
    """Every text metric of hypotheses against references (lists of report strings)."""
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


def clinical_metrics(refs, hyps, label, uncertain='positive'):
    """Clinical efficacy: `label` (a labeler: list of texts -> 14-lists of 1/0/-1/None) on
    both sides, uncertain counted as `uncertain`."""
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


