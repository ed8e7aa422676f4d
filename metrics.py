"""
The scores of generated reports, as pure functions of their inputs: no config, no files.

- text: BLEU-1..4 (corpus), ROUGE-L and METEOR on normalized text, and the paper-style row
  in pycocoevalcap's convention on R2Gen-style text: its corpus BLEU-1..4, ROUGE-L and
  CIDEr-D (re-implemented; the tests check them against pycocoevalcap) and its METEOR 1.5
  (the Java jar itself, when Java is there; never replaced by another METEOR);
- clinical efficacy: P/R/F1 per condition, micro and macro over the 14 and the 5 common
  conditions, and example-based (per report, then averaged), from labels a labeler gave the
  reference and the hypothesis;
- the aux head's ROC-AUC per condition;
- grounding: where each anatomical query's attention falls against its region's box.
"""
import math
import os
import re
import shutil
import subprocess
import unicodedata
from collections import Counter

import numpy as np

from chexpert import COMMON5, CONDITIONS, REGIONS, binarize


# --- text ---------------------------------------------------------------------------------
# A report is scored on its first MAX_TOKENS tokens and MAX_CHARS characters (clip), a token
# being a run of letters and digits or any other single non-space character: the finest split
# any metric here makes (the paper-style row's), so no metric sees more tokens than that. Real
# reports are far shorter (IU X-ray, MIMIC-CXR: tens to a few hundred words); the limits bound
# what a broken predictions file costs: ROUGE-L's LCS table is len_ref x len_hyp, and METEOR's
# alignment and the labeler's cue windows grow as fast, so a 2,000,000-character pair took 24 GB.
MAX_TOKENS = 1000
MAX_CHARS = 20000
TOKEN = re.compile(r"\w+|[^\w\s]")


def clip(text, max_tokens=MAX_TOKENS, max_chars=MAX_CHARS):
    """The text as scored: None -> ''; unchanged within both limits, else cut after its
    max_chars-th character and after its max_tokens-th token, whichever comes first."""
    head = (text or '')[:max_chars]
    ends = [m.end() for _, m in zip(range(max_tokens + 1), TOKEN.finditer(head))]
    return head[:ends[max_tokens - 1]] if len(ends) > max_tokens else head


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


def coco_text(text):
    """The R2Gen convention: lowercase, punctuation split off as its own tokens, our 'Findings:',
    'Impression:' and '|' markers dropped with the spaces around them. Other spacing stays as it
    is: pycocoevalcap's ROUGE-L splits on single spaces, so a repeated, leading or trailing space
    is an (empty) token there; on text already in this form coco_text changes nothing."""
    parts = re.split(r'\s*(?:findings\s*:|impression\s*:|\|)\s*', (text or '').lower())
    return re.sub(r'(?<=\S)(?=[^\w\s])|(?<=[^\w\s])(?=\S)', ' ', ' '.join(p for p in parts if p))


# --- NLG metrics ----------------------------------------------------------------------------
def bleu(refs, hyps):
    """Corpus BLEU-1..4 (nltk, uniform weights, no smoothing) on token lists."""
    from nltk.translate.bleu_score import corpus_bleu
    r, h = [[x] for x in refs], list(hyps)
    weights = [(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
    return {f'bleu{n + 1}': corpus_bleu(r, h, weights=w) for n, w in enumerate(weights)}


def rouge_l(refs, hyps):
    """Mean ROUGE-L F-measure over pairs (rouge-score); an empty hypothesis scores 0."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(['rougeL'])
    return float(np.mean([scorer.score(r, h)['rougeL'].fmeasure if h else 0.0 for r, h in zip(refs, hyps)]))


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
    """(mean METEOR, synonyms on?) with nltk's meteor_score on token lists; an empty
    hypothesis scores 0."""
    from nltk.translate.meteor_score import meteor_score
    wn = wordnet_or_none()
    scores = [meteor_score([r], h, wordnet=wn or NoWordNet()) if h else 0.0 for r, h in zip(refs, hyps)]
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
    """pycocoevalcap's ROUGE-L: LCS-based F with beta 1.2 on tokens split at single spaces,
    averaged over pairs. As in pycocoevalcap, '' is one empty token, which matches an empty
    token of the other text (a repeated, leading or trailing space)."""
    scores = []
    for ref, hyp in zip(refs, hyps):
        r, h = ref.split(' '), hyp.split(' ')
        m = lcs(r, h)
        p, rec = m / len(h), m / len(r)
        scores.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return float(np.mean(scores))


def coco_cider(refs, hyps, n=4, sigma=6.0):
    """pycocoevalcap's CIDEr-D (its Cider class), one reference per image: tf-idf vectors of
    1..4-grams with the idf from this corpus's references, each hypothesis weight clipped at the
    reference's, cosine per n, times a Gaussian penalty (sigma 6) on the length difference, mean
    over n, times 10. Its quirk kept: a text's 'length' is its number of bigrams."""
    def grams(text):
        w = text.split()
        return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))
    ref_grams, hyp_grams = [grams(r) for r in refs], [grams(h) for h in hyps]
    df = Counter(g for c in ref_grams for g in c)  # in how many references each n-gram occurs
    log_docs = math.log(len(refs))

    def vector(counts):
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = tf * (log_docs - math.log(max(1.0, df[g])))
            norm[k] += vec[k][g] ** 2
            length += tf if k == 1 else 0
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for r, h in zip(ref_grams, hyp_grams):
        (vh, nh, lh), (vr, nr, lr) = vector(h), vector(r)
        penalty = math.exp(-(lh - lr) ** 2 / (2 * sigma ** 2))
        sims = []
        for k in range(n):
            dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
            sims.append((dot / (nh[k] * nr[k]) if nh[k] and nr[k] else dot) * penalty)
        scores.append(10.0 * float(np.mean(sims)))
    return float(np.mean(scores))


class Meteor15:
    """pycocoevalcap's METEOR 1.5: its Java jar, run as pycocoevalcap runs it (-l en -norm, stdio),
    started once and reused for every call of score(). `reason` says why it is unavailable
    (pycocoevalcap or Java missing, or the jar failed); score() then returns None, so METEOR 1.5
    is marked unavailable and never replaced by another METEOR. Use it as a context manager."""

    def __init__(self):
        self.proc, self.reason = None, None
        try:
            import pycocoevalcap
            jar = os.path.join(list(pycocoevalcap.__path__)[0], 'meteor', 'meteor-1.5.jar')
        except ImportError:
            self.reason = 'pycocoevalcap is not installed'
            return
        if not shutil.which('java'):
            self.reason = 'java is not on PATH'
        elif not os.path.isfile(jar):
            self.reason = f'{jar} is missing'
        else:
            self.proc = subprocess.Popen(['java', '-jar', '-Xmx2G', jar, '-', '-', '-stdio', '-l', 'en', '-norm'],
                                         cwd=os.path.dirname(jar), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)

    def ask(self, line):
        self.proc.stdin.write((line + '\n').encode())
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().strip()

    def score(self, refs, hyps):
        """pycocoevalcap's corpus METEOR (the jar's aggregate over all pairs, as R2Gen reports it)
        of one-line texts, or None when unavailable."""
        if self.proc is None:
            return None
        def line(text):  # one line for the jar, whose tokens do not depend on the spacing
            return ' '.join(text.replace('|||', '').split())
        try:
            stats = [self.ask(' ||| '.join(('SCORE', line(r), line(h)))) for r, h in zip(refs, hyps)]
            self.ask('EVAL ||| ' + ' ||| '.join(stats))       # first the score of each pair ...
            for _ in range(len(refs) - 1):
                self.proc.stdout.readline()
            return float(self.proc.stdout.readline().strip())  # ... then the corpus score
        except (OSError, ValueError) as e:
            self.reason = f'the METEOR 1.5 jar failed ({type(e).__name__}: {e})'
            self.close()
            return None

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bertscore(refs, hyps, model_dir, layer=-1, batch=16):
    """BERTScore F1 (greedy cosine matching of token embeddings, no idf, no rescaling); an
    empty hypothesis scores 0."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()

    @torch.no_grad()
    def embed(texts):
        enc = tok(texts, padding=True, truncation=True, return_tensors='pt')
        h = model(**enc, output_hidden_states=True).hidden_states[layer]
        return [torch.nn.functional.normalize(h[i][enc['attention_mask'][i].bool()][1:-1], dim=-1)
                for i in range(len(texts))]
    f1 = [0.0] * len(refs)
    scored = [i for i, h in enumerate(hyps) if h]
    for s in range(0, len(scored), batch):
        part = scored[s:s + batch]
        for i, r, h in zip(part, embed([refs[i] for i in part]), embed([hyps[i] for i in part])):
            sim = h @ r.T                                                      # (Th, Tr)
            p, rec = sim.max(1).values.mean().item(), sim.max(0).values.mean().item()
            f1[i] = 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
    return float(np.mean(f1))


def nlg_metrics(refs, hyps, bertscore_model='', bertscore_layer=-1, meteor15=None):
    """Every text metric of hypotheses against references (lists of report strings), each
    clipped first (MAX_TOKENS, MAX_CHARS). A pair whose reference is empty (None, missing or
    nothing left after normalize) is the data's fault: left out and counted. An empty or missing
    hypothesis stays in and scores 0 on every metric: no matches and no length, while its
    reference's length still counts in BLEU's brevity penalty, as in pycocoevalcap (nltk, for
    the plain BLEU, also counts one n-gram guess per order for it: its max(1, .) denominator).
    meteor15: a Meteor15 for the paper-style row's METEOR 1.5, else it says unavailable."""
    keep = [i for i, r in enumerate(refs) if normalize(clip(r))]
    if not keep:
        raise ValueError(f"no pair with a non-empty reference among {len(refs)}")
    raw_r, raw_h = [clip(refs[i]) for i in keep], [clip(hyps[i]) for i in keep]
    r, h = [normalize(x) for x in raw_r], [normalize(x) for x in raw_h]
    rt, ht = [tokenize(x) for x in r], [tokenize(x) if x else [] for x in h]
    out = dict(bleu(rt, ht), rouge_l=rouge_l(r, h))
    out['meteor'], out['meteor_synonyms'] = meteor(rt, ht)
    cr, ch = [coco_text(x) for x in raw_r], [coco_text(x) if y else '' for x, y in zip(raw_h, h)]
    # an empty hypothesis scores 0 here too, though pycocoevalcap's ROUGE-L would match its
    # empty token to one a repeated space leaves in the reference
    rouge = float(np.mean([coco_rouge_l([a], [b]) if b else 0.0 for a, b in zip(cr, ch)]))
    out['coco'] = dict(coco_bleu(cr, ch), rouge_l=rouge, cider=coco_cider(cr, ch))
    m = meteor15.score(cr, ch) if meteor15 is not None else None
    if m is not None:
        out['coco']['meteor'] = m
    else:
        out['coco']['meteor_unavailable'] = meteor15.reason if meteor15 is not None else 'not asked for'
    if bertscore_model:
        out['bertscore_f1'] = bertscore(r, h, bertscore_model, bertscore_layer)
    out['pairs'], out['empty_hypotheses'], out['skipped_references'] = len(r), h.count(''), len(refs) - len(r)
    return out


# --- clinical efficacy and the aux head ----------------------------------------------------
def prf(tp, fp, fn):
    p, r = tp / max(1, tp + fp), tp / max(1, tp + fn)
    return dict(precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0)


def clinical_scores(true, pred):
    """P/R/F1 and the number of positive references per condition, micro and macro P/R/F1
    over the 14 and the 5 common ones, from binary (N, 14) arrays: reference labels and
    hypothesis labels."""
    true, pred = np.asarray(true, bool), np.asarray(pred, bool)
    tp, fp, fn = (true & pred).sum(0), (~true & pred).sum(0), (true & ~pred).sum(0)
    out = {c: dict(prf(tp[i], fp[i], fn[i]), positives=int(tp[i] + fn[i])) for i, c in enumerate(CONDITIONS)}
    for name, conds in (('14', CONDITIONS), ('5', COMMON5)):
        idx = [CONDITIONS.index(c) for c in conds]
        out[f'micro{name}'] = prf(tp[idx].sum(), fp[idx].sum(), fn[idx].sum())
        out[f'macro{name}'] = {k: float(np.mean([out[c][k] for c in conds])) for k in ('precision', 'recall', 'f1')}
    return out


def example_scores(true, pred):
    """Example-based P/R/F1 from binary (N, 14) arrays: per report, precision, recall and F1 over
    its positive labels (F1 = 2 tp / (2 tp + fp + fn)), then the mean over all N reports, as the
    papers that report 'example-based' clinical efficacy compute it (CvT2DistilGPT2's CheXbert
    metrics and those following it; sklearn's average='samples' with zero_division=0). A report
    with no positive label in either reference or hypothesis has 0/0 for all three: it counts as 0
    and stays in the mean; `no_positives` says how many there were."""
    true, pred = np.asarray(true, bool), np.asarray(pred, bool)
    tp, fp, fn = (true & pred).sum(1), (~true & pred).sum(1), (true & ~pred).sum(1)

    def ratio(a, b):  # 0/0 -> 0
        return np.divide(a, b, out=np.zeros(len(a)), where=b > 0)
    return dict(precision=float(ratio(tp, tp + fp).mean()), recall=float(ratio(tp, tp + fn).mean()),
                f1=float(ratio(2 * tp, 2 * tp + fp + fn).mean()), reports=len(true),
                no_positives=int((tp + fp + fn == 0).sum()))


def clinical_labels(refs, hyps, label, uncertain='positive'):
    """(kept, true, pred): the indices of the pairs with a reference, and binary (N, 14) labels of
    their references and reports: `label` (a labeler: list of texts -> 14-lists of 1/0/-1/None)
    on both sides, clipped, uncertain counted as `uncertain`. An empty report states no
    condition (not even No Finding, which the labeler would give a text that mentions nothing)."""
    kept = [i for i, r in enumerate(refs) if normalize(clip(r))]
    refs, hyps = [clip(refs[i]) for i in kept], [clip(hyps[i]) for i in kept]
    said = [i for i, h in enumerate(hyps) if normalize(h)]
    true = [binarize(x, uncertain) for x in label(refs)]
    pred = [[0.0] * len(CONDITIONS) for _ in hyps]
    for i, x in zip(said, label([hyps[i] for i in said])):
        pred[i] = binarize(x, uncertain)
    return kept, np.reshape(true, (-1, len(CONDITIONS))) > 0.5, np.reshape(pred, (-1, len(CONDITIONS))) > 0.5


def clinical_metrics(refs, hyps, label, uncertain='positive'):
    """Clinical efficacy on the same pairs as nlg_metrics (clipped, those with an empty reference
    left out): clinical_scores and example_scores of clinical_labels."""
    _, true, pred = clinical_labels(refs, hyps, label, uncertain)
    return dict(clinical_scores(true, pred), example=example_scores(true, pred),
                uncertain_policy=f"uncertain counted as {uncertain}")


def faithfulness(true, stated, decided):
    """Whether the reports say what the model sees, from binary (N, 14) arrays: the references'
    labels, what the reports state (the labeler) and what the model's own aux head decided. Per
    condition: the reports' F1 and the head's F1 against the reference, and the agreement of
    report and head; 'agreement': over all N x 14 pairs."""
    report, head, same = clinical_scores(true, stated), clinical_scores(true, decided), agreement(stated, decided)
    out = {c: dict(report_f1=report[c]['f1'], head_f1=head[c]['f1'], agreement=same[c], positives=report[c]['positives'])
           for c in CONDITIONS}
    return dict(out, agreement=same['overall'], head_micro14_f1=head['micro14']['f1'],
                head_macro14_f1=head['macro14']['f1'])


def best_thresholds(targets, probs):
    """Per condition, the probability threshold with the best F1 on (targets, probs), both (N, 14):
    halfway between the last score called positive and the next one down. None for a condition
    with no positive or no negative target, where F1 cannot choose."""
    targets, probs = np.asarray(targets) > 0.5, np.asarray(probs, dtype=np.float64)
    out = []
    for t, s in zip(targets.T, probs.T):
        if t.all() or not t.any():
            out.append(None)
            continue
        order = np.argsort(-s, kind='mergesort')
        s, t = s[order], t[order]
        cuts = np.flatnonzero(np.diff(s) < 0) + 1          # call the first k positive, k at a change of score
        cuts = np.append(cuts, len(s))
        f1 = 2 * np.cumsum(t)[cuts - 1] / (cuts + t.sum())   # F1 = 2 tp / (predicted + actual)
        k = cuts[int(np.argmax(f1))]
        out.append(float((s[k - 1] + s[k]) / 2) if k < len(s) else float(s[-1] / 2))
    return out


def decide(probs, thresholds=None):
    """(N, 14) decisions: probs at or above each condition's threshold (0.5 where it is None, and
    for all without thresholds)."""
    thresholds = np.array([0.5 if t is None else t for t in thresholds or [None] * np.shape(probs)[-1]])
    return np.asarray(probs) >= thresholds


def agreement(stated, decided):
    """How often the reports state what the model's own head decided, from binary (N, 14) arrays
    (the labeler on the reports, the head's decisions): per condition, and over all N x 14 pairs."""
    same = np.asarray(stated, bool) == np.asarray(decided, bool)
    return dict({c: float(same[:, i].mean()) for i, c in enumerate(CONDITIONS)}, overall=float(same.mean()))


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
    """Per region and mean over the regions, for the anatomical queries: `share`, the mean share
    of the query's attention inside its region's box, beside `chance`, the box's share of the
    image (what uniform attention would give); `pointing`, how often its attention peak (the
    argmax patch) touches the box, beside `pointing_chance`, the share of the patches that do
    (what a peak at a random patch would give)."""
    per = {r: [] for r in REGIONS}
    for rec in records:
        for r, v in (rec.get('grounding') or {}).items():
            per[r].append(v)
    if not any(per.values()):
        return None
    out = {}
    for r, vs in per.items():
        if vs:
            out[r] = dict(share=float(np.mean([v['share'] for v in vs])),
                          chance=float(np.mean([v['area'] for v in vs])))
            if all('hit' in v for v in vs):  # predictions written before pointing was measured have no 'hit'
                out[r]['pointing'] = float(np.mean([v['hit'] for v in vs]))
                out[r]['pointing_chance'] = float(np.mean([v['touched'] for v in vs]))
    keys = set.intersection(*(set(v) for v in out.values()))
    out['mean'] = {k: float(np.mean([v[k] for v in out.values()]))
                   for k in ('share', 'chance', 'pointing', 'pointing_chance') if k in keys}
    return out


def region_shares(attention, regions):
    """{region: {share, area, hit, touched}} for one image's (20, N) attention over a square grid
    of patches and its region boxes (x0, y0, x1, y1 as fractions of the image). A patch counts by
    the fraction of its area inside the box, so a box narrower than a patch (the spine, on the
    tiny model's 8 x 8 grid) still has its share: `share` of the region query's attention, and
    `area`, the box's share of the image. `hit`: the query's peak patch touches the box;
    `touched`: the share of the patches that do."""
    g = int(round(attention.shape[-1] ** 0.5))
    edges = np.arange(g + 1) / g

    def inside(lo, hi):  # per row or column of patches: the fraction of it within [lo, hi]
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) * g
    out = {}
    for j, r in enumerate(REGIONS[:attention.shape[0] - len(CONDITIONS)]):  # none without anatomical queries
        if r not in regions:
            continue
        x0, y0, x1, y1 = regions[r]
        w = inside(y0, y1)[:, None] * inside(x0, x1)[None, :]            # (g, g) in [0, 1]
        a = attention[len(CONDITIONS) + j].reshape(g, g)
        out[r] = dict(share=float((a * w).sum() / max(a.sum(), 1e-12)), area=float(w.mean()),
                      hit=bool(w.ravel()[a.argmax()] > 0), touched=float((w > 0).mean()))
    return out
