"""
The 14 CheXpert observations, the 6 anatomical regions, and a rule-based report
labeler in the manner of the CheXpert labeler: it reads a radiology report and says,
for each observation, positive (1), negative (0), uncertain (-1) or not mentioned (None).
Plain Python: importing it loads no torch (the phantom generator and the metrics use it).

    python chexpert.py --reports=RAW/indiana_reports.csv   # agreement with IU X-ray's MeSH/Problems

How it works, per sentence and clause:
1. mention: a phrase of the condition ('pleural effusion', 'effusions', 'nodular opacity'),
   unless an exception says it is something else ('pericardial effusion');
2. the mention's status from cues in a window of words around it, inside its clause
   (a clause ends at 'but', 'however', 'although', ';', ...):
   uncertainty phrased as a negation ('cannot exclude', 'not excluded') -> -1,
   else a negation ('no', 'without', 'free of', '... is not seen') -> 0,
   else an uncertainty ('possible', 'may', 'suspicious for', '... is suspected') -> -1,
   else 1;
3. the heart and mediastinum are named in normal reports too ('heart size is normal'), so
   for Cardiomegaly and Enlarged Cardiomediastinum a named structure counts only with a
   qualifier: enlarged/widened -> 1, normal/unremarkable -> 0, borderline -> -1;
4. per report, CheXpert's rule: any positive mention -> 1, else any uncertain -> -1, else
   any negative -> 0; No Finding is 1 when nothing but Support Devices is positive or
   uncertain, and blank otherwise.
'Lungs are clear' is a negative Lung Opacity mention, nothing more.

binarize() turns the four states into training targets; make_labeler() returns this
labeler or, given its checkpoint, CheXbert.
"""
import csv
import functools
import json
import re
import sys

# The 14 CheXpert observations, in the CheXpert labeler's order. The condition
# queries, the auxiliary head's logits and every label vector use this order.
CONDITIONS = (
    'No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
    'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis',
    'Pneumothorax', 'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices',
)
# The five most common, over which papers also report clinical F1.
COMMON5 = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion')
def diagnosis_text(decisions):
    """The 14 decisions (truthy: present) in the words a decoder reads ahead of its report
    (train.py's diagnosis_prompt): 'Seen: cardiomegaly, pleural effusion.' or 'Seen: none.'"""
    if len(decisions) != len(CONDITIONS):
        raise ValueError(f"a diagnosis needs {len(CONDITIONS)} decisions, one per condition, got {len(decisions)}")
    seen = [name.lower() for name, present in zip(CONDITIONS, decisions) if present]
    return f"Seen: {', '.join(seen) or 'none'}."


# One anatomical query per region, in this order.
REGIONS = ('cardiac', 'left lung', 'right lung', 'mediastinum', 'diaphragm', 'spine')
# The anatomical attention priors' atlas: one box [x0, y0, x1, y1] per region in image fractions
# (x to the image's right, y down; 'left lung' is the patient's left, on the image's right).
# From the phantom train split (phantom.regions): per region, the 5% quantile of x0 and y0 and the
# 95% quantile of x1 and y1, rounded outward to 0.01. A covering box, because the strict prior hides
# everything outside it (docs/priors.md says how well it covers).
# Real data: an atlas file (read_atlas).
ATLAS = {
    'cardiac': [0.34, 0.34, 0.78, 0.80],
    'left lung': [0.51, 0.11, 0.90, 0.83],
    'right lung': [0.10, 0.11, 0.49, 0.81],
    'mediastinum': [0.36, 0.11, 0.64, 0.45],
    'diaphragm': [0.10, 0.60, 0.90, 0.87],
    'spine': [0.42, 0.01, 0.58, 0.93],
}


def check_atlas(atlas, source='the atlas'):
    """{region: [x0, y0, x1, y1]} in REGIONS order, or a ValueError naming source and region."""
    if not isinstance(atlas, dict):
        raise ValueError(f"{source}: an atlas is a JSON object {{region: [x0, y0, x1, y1]}}, "
                         f"got {type(atlas).__name__}")
    unknown = [r for r in atlas if r not in REGIONS]
    if unknown:
        raise ValueError(f"{source}: unknown region(s) {unknown}; the regions are {list(REGIONS)}")
    out = {}
    for r in REGIONS:
        box = atlas.get(r)
        if box is None:
            raise ValueError(f"{source}: region '{r}' is missing; every one of {list(REGIONS)} needs a box")
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"{source}: region '{r}' needs 4 numbers [x0, y0, x1, y1], got {box!r}")
        if not all(0 <= v <= 1 for v in box):  # NaN fails this too
            raise ValueError(f"{source}: region '{r}' box {box} is outside [0, 1] (fractions of the image)")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"{source}: region '{r}' box {box} is in the wrong order: need x0 < x1 and y0 < y1")
        out[r] = [float(v) for v in box]
    return out


def read_atlas(path):
    """A checked atlas from a JSON file {region: [x0, y0, x1, y1]} (image fractions)."""
    with open(path) as f:  # a missing file: FileNotFoundError names it
        try:
            atlas = json.load(f)
        except ValueError as e:
            raise ValueError(f"atlas file {path} is not JSON ({e})") from None
    return check_atlas(atlas, f"atlas file {path}")


# -----------------------------------------------------------------------------
reports = ''                  # the CLI: IU X-ray's indiana_reports.csv
# -----------------------------------------------------------------------------

# Mention phrases (regexes on lowercased text). Order inside a list does not matter.
MENTIONS = {
    'Lung Opacity': [r'opaci(?:ty|ties|fication|fied)', r'infiltrat(?:e|es|ion|ive)', r'air ?-?space (?:disease|process)',
                     r'(?:increased |nodular )?densit(?:y|ies)', r'interstitial (?:marking|pattern|opacit|lung disease)\w*',
                     r'reticula(?:r|tion)\w*', r'ground[- ]glass', r'hazy|haziness', r'scarring|scar\b'],
    'Lung Lesion': [r'nodul(?:e|es|ar)', r'mass(?:es)?(?:[- ]?like)?\b', r'tumou?r', r'neoplasm', r'carcinoma',
                    r'cavitary lesion', r'lung lesion'],
    'Edema': [r'edema', r'(?:vascular|pulmonary) congestion', r'\bchf\b', r'heart failure', r'fluid overload'],
    'Consolidation': [r'consolidat\w*'],
    'Pneumonia': [r'pneumonia', r'infectio(?:n|us)'],
    'Atelectasis': [r'atelecta\w*'],
    'Pneumothorax': [r'pneumothora(?:x|ces)'],
    'Pleural Effusion': [r'effusions?', r'pleural fluid', r'hydrothorax'],
    'Pleural Other': [r'pleural (?:thickening|plaques?|scarring|calcification)', r'fibrothorax', r'pleural reaction'],
    'Fracture': [r'fractur\w*'],
    'Support Devices': [r'\btubes?\b', r'catheters?', r'(?:picc|central|venous|midline|arterial|jugular|subclavian) lines?',
                        r'\bpicc\b', r'pacemaker', r'\bpacer\b', r'defibrillator', r'\bicd\b', r'port-?a-?cath',
                        r'\bports?\b', r'\bstents?\b', r'\bdrains?\b', r'\bdevices?\b', r'stimulator',
                        r'(?:sternotomy |surgical )?wires', r'\bleads\b', r'prosthe(?:sis|tic)', r'valve replacement'],
}
# Mentions that are something else, removed from the text before matching.
UNMENTIONS = [r'pericardial effusion', r'joint effusion', r'soft tissue edema', r'\btuber\w*',
              r'bone density', r'osseous lesion', r'(?:breast|nipple|soft tissue) (?:shadow|density|mass)',
              r'no (?:significant |interval |appreciable )?change', r'without (?:significant |interval )?change',
              r'mass effect', r'no acute osseous abnormality']
# Heart and mediastinum: a structure word, judged by its qualifier in the same clause.
STRUCTURES = {
    'Cardiomegaly': r'heart|cardiac (?:silhouette|size|contour|shadow)s?',
    'Enlarged Cardiomediastinum': r'cardiomediastinal (?:silhouette|contour|shadow)s?|mediastin(?:um|al)(?: (?:contour|silhouette|width)s?)?',
}
DIRECT = {'Cardiomegaly': [r'cardiomegaly', r'cardiac enlargement', r'enlarged heart'],
          'Enlarged Cardiomediastinum': [r'widened mediastinum', r'mediastinal widening', r'widening of the mediastinum']}
ENLARGED = r'enlarg\w*|widen\w*|large\b|increased|prominen\w*'
NORMAL = r'normal|unremarkable|not enlarged|stable|unchanged'
BORDERLINE = r'borderline|upper limits? of normal|top (?:normal|of normal)|mildly prominent'
CLEAR_LUNGS = r'\blungs? (?:are |is )?(?:\w+ ){0,3}clear\b|\bclear lungs?\b|\blungs?,? clear\b'

# Cues. Pre-cues are looked for in the WINDOW words before a mention, post-cues after it.
WINDOW = 10
UNCERTAIN_NEGATED_PRE = r'cannot (?:be )?exclude|can ?not (?:be )?exclude|not (?:be )?excluded|rule out|cannot rule out|r/o'
UNCERTAIN_NEGATED_POST = r'^[^.]*?(?:cannot|can not|could not|not) be (?:excluded|ruled out)|^[^.]*?not (?:excluded|ruled out)'
NEGATION_PRE = (r'\bno\b|\bnot\b|\bwithout\b|negative for|free of|absence of|\babsent\b|clear of|resolution of|'
                r'resolved|removal of|\bnor\b|\bnever\b|\bnone\b')
NEGATION_POST = (r'^\W*(?:\w+\W+){0,4}?(?:(?:is|are|was|were|has|have|been)\s+)*(?:not (?:seen|identified|present|'
                 r'visualized|demonstrated|evident|appreciated)|absent|resolved|removed)\b')
UNCERTAIN_PRE = (r'possibl[ey]|probabl[ey]|\bmay\b|\bmight\b|\bcould\b|questionabl[ey]|question of|suspicious for|'
                 r'suspect\w*|concern\w* for|suggest\w*|likely|\bvs\.?\b|versus|differential|equivocal|'
                 r'borderline|cannot be characterized|not certain|indeterminate|presumably|may represent')
UNCERTAIN_POST = r'^[^.]*?(?:is|are) (?:possible|suspected|questioned|likely|not certain)\b|^\W*\?'
CLAUSE_BREAK = r'\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhich\b|\bexcept\b|\baside from\b|\bapart from\b|;|:|, and there'


def sentences(text):
    text = re.sub(r'\s+', ' ', (text or '').lower())
    text = re.sub(r'findings:|impression:|\|', '. ', text)  # our target's section markers end a sentence
    for pattern in UNMENTIONS:
        text = re.sub(pattern, ' ', text)
    return [s for s in re.split(r'(?<=[.!?])\s+|\n', text) if s.strip()]


def clauses(sentence):
    return [c for c in re.split(CLAUSE_BREAK, sentence) if c.strip()]


def status(clause, start, end):
    """1, 0 or -1 for the mention at clause[start:end], from the cues around it."""
    pre = ' '.join(clause[:start].split()[-WINDOW:])
    post = clause[end:]
    if re.search(UNCERTAIN_NEGATED_PRE, pre) or re.search(UNCERTAIN_NEGATED_POST, post):
        return -1
    if re.search(NEGATION_PRE, pre) or re.search(NEGATION_POST, post):
        return 0
    if re.search(UNCERTAIN_PRE, pre) or re.search(UNCERTAIN_POST, post):
        return -1
    return 1


def structure_status(clause, start, end):
    """Cardiomegaly / Enlarged Cardiomediastinum from a named structure: its qualifier decides."""
    rest = clause[:start][-60:] + ' ' + clause[end:]
    if re.search(BORDERLINE, rest):
        return -1
    if re.search(ENLARGED, rest):
        negated = re.search(r'\bnot (?:\w+ )?(?:' + ENLARGED + ')', rest) or re.search(r'\bno\b', clause[:start])
        return 0 if negated else status(clause, start, end)
    if re.search(NORMAL, rest):
        return 0
    return None


def combine(values):
    """CheXpert's rule for several mentions of one observation."""
    for v in (1, -1, 0):
        if v in values:
            return v
    return None


def label_report(text):
    """The 14 CheXpert observations of a report, each 1, 0, -1 or None (not mentioned)."""
    found = {c: [] for c in CONDITIONS}
    for sentence in sentences(text):
        for clause in clauses(sentence):
            for cond, patterns in MENTIONS.items():
                for m in re.finditer('|'.join(f'(?:{p})' for p in patterns), clause):
                    found[cond].append(status(clause, m.start(), m.end()))
            for cond, patterns in DIRECT.items():
                for m in re.finditer('|'.join(patterns), clause):
                    found[cond].append(status(clause, m.start(), m.end()))
            for cond, pattern in STRUCTURES.items():
                for m in re.finditer(rf'\b(?:{pattern})\b', clause):
                    v = structure_status(clause, m.start(), m.end())
                    if v is not None:
                        found[cond].append(v)
            if re.search(CLEAR_LUNGS, clause):
                found['Lung Opacity'].append(0)
    labels = {c: combine(v) for c, v in found.items()}
    others = [labels[c] for c in CONDITIONS if c not in ('No Finding', 'Support Devices')]
    labels['No Finding'] = None if any(v in (1, -1) for v in others) else 1
    return [labels[c] for c in CONDITIONS]


@functools.lru_cache(maxsize=1 << 16)  # template sentences repeat across reports
def states_finding(sentence):
    """Whether the labeler reads a condition other than No Finding as present or uncertain."""
    return any(v in (1, -1) for v in label_report(sentence)[1:])


SENTENCE = re.compile(r'[^\s|][^|]*?(?:\.(?=\s|$)|(?=\s*\|)|$)')  # up to a period before a space, or a section's end
SECTION_HEADER = re.compile(r'(?:Findings|Impression):\s*')


def finding_sentences(text):
    """[(start, end)]: the character spans of a report's sentences that state a finding
    (states_finding), section headers ('Impression: ') left out."""
    spans = []
    for m in SENTENCE.finditer(text):
        header = SECTION_HEADER.match(m.group())
        start = m.start() + (header.end() if header else 0)
        if states_finding(text[start:m.end()]):
            spans.append((start, m.end()))
    return spans


def binarize(labels, uncertain='positive'):
    """Training targets from 4-state labels: positive -> 1, negative and blank -> 0, and
    uncertain -> 1 ('positive', the default, as in U-Ones) or 0 ('negative', U-Zeros)."""
    if uncertain not in ('positive', 'negative'):
        raise ValueError(f"uncertain must be 'positive' or 'negative', got {uncertain!r}")
    u = 1.0 if uncertain == 'positive' else 0.0
    return [1.0 if v == 1 else u if v == -1 else 0.0 for v in labels]


# --- optional CheXbert -----------------------------------------------------------------
# CheXbert (Smit et al. 2020): bert-base-uncased, then on [CLS] 13 heads of 4 classes
# (blank, positive, negative, uncertain) and one of 2 (blank, positive) for No Finding.
CHEXBERT_ORDER = ('Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity', 'Lung Lesion', 'Edema',
                  'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax', 'Pleural Effusion', 'Pleural Other',
                  'Fracture', 'Support Devices', 'No Finding')
CHEXBERT_CLASSES = (None, 1, 0, -1)


def load_chexbert(checkpoint, bert):
    """(model, tokenizer) from chexbert.pth and a local bert-base-uncased directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)
    state = state.get('model_state_dict', state)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    cfg = BertConfig.from_pretrained(bert)
    model = torch.nn.Module()
    model.bert = BertModel(cfg, add_pooling_layer=False)
    model.linear_heads = torch.nn.ModuleList([torch.nn.Linear(cfg.hidden_size, 4) for _ in range(13)] +
                                             [torch.nn.Linear(cfg.hidden_size, 2)])
    state = {k: v for k, v in state.items() if not k.startswith('bert.pooler.')}  # unused by the heads
    import lora
    lora.check_state_dict(model.state_dict(), state, f"{checkpoint} (a CheXbert checkpoint for {bert}?)")
    model.load_state_dict(state)
    return model.eval(), AutoTokenizer.from_pretrained(bert)


def labeled_once(label):
    """label (list[str] -> labels), asked only for the texts it has not labeled before, each
    once: eval.py labels the references for every system it scores, and the model's reports
    for clinical F1 and again for faithfulness; template reports repeat."""
    known = {}

    def cached(texts):
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            known.update(zip(new, label(new)))
        return [known[t] for t in texts]
    return cached


def make_labeler(kind='rule', chexbert=None, bert=None, batch_size=16):
    """A function list[str] -> list of 14-lists (1, 0, -1, None): the rule-based labeler,
    or CheXbert when its checkpoint and a local bert-base-uncased are given. Each distinct
    text is labeled once per labeler (labeled_once)."""
    if chexbert is None:
        if kind != 'rule':
            raise ValueError(f"kind={kind!r} needs chexbert=path/to/chexbert.pth and bert=local/bert-base-uncased")
        return labeled_once(lambda texts: [label_report(t) for t in texts])
    import torch
    model, tok = load_chexbert(chexbert, bert)

    @torch.no_grad()
    def label(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok([t or '' for t in texts[i:i + batch_size]], padding=True, truncation=True, max_length=512,
                      return_tensors='pt')
            cls = model.bert(**enc).last_hidden_state[:, 0]                        # (B, H)
            classes = [head(cls).argmax(-1).tolist() for head in model.linear_heads]  # 14 x (B,)
            for b in range(cls.shape[0]):
                by_name = {c: CHEXBERT_CLASSES[classes[j][b]] for j, c in enumerate(CHEXBERT_ORDER)}
                out.append([by_name[c] for c in CONDITIONS])
        return out
    return labeled_once(label)


# --- agreement with IU X-ray's MeSH and Problems columns ---------------------------------
MESH = {  # IU X-ray term (before any '/') -> CheXpert condition, where one clearly exists
    'normal': 'No Finding', 'Cardiomegaly': 'Cardiomegaly', 'Pleural Effusion': 'Pleural Effusion',
    'Pneumothorax': 'Pneumothorax', 'Pulmonary Atelectasis': 'Atelectasis', 'Atelectasis': 'Atelectasis',
    'Pulmonary Edema': 'Edema', 'Edema': 'Edema', 'Pulmonary Congestion': 'Edema', 'Pneumonia': 'Pneumonia',
    'Consolidation': 'Consolidation', 'Fractures, Bone': 'Fracture', 'Opacity': 'Lung Opacity',
    'Infiltrate': 'Lung Opacity', 'Airspace Disease': 'Lung Opacity', 'Nodule': 'Lung Lesion', 'Mass': 'Lung Lesion',
    'Catheters, Indwelling': 'Support Devices', 'Implanted Medical Device': 'Support Devices',
    'Tube, Inserted': 'Support Devices', 'Medical Device': 'Support Devices', 'Stents': 'Support Devices',
}


def agreement(rows, column):
    """{condition: (n positive by the column, recall, precision, accuracy)} of the labeler
    (uncertain counted positive) against the terms of `column`."""
    conds = sorted(set(MESH.values()), key=CONDITIONS.index)
    stats = {c: [0, 0, 0, 0] for c in conds}  # tp, fp, fn, tn
    for r in rows:
        terms = {MESH.get(t.split('/')[0].strip()) for t in r[column].split(';')}
        pred = binarize(label_report(f"{r['findings']} {r['impression']}"))
        for c in conds:
            truth, guess = c in terms, pred[CONDITIONS.index(c)] == 1
            stats[c][(0 if guess else 2) if truth else (1 if guess else 3)] += 1
    out = {}
    for c, (tp, fp, fn, tn) in stats.items():
        out[c] = (tp + fn, tp / max(1, tp + fn), tp / max(1, tp + fp), (tp + tn) / max(1, tp + fp + fn + tn))
    return out


def print_agreement(path):
    with open(path, newline='') as f:
        rows = [r for r in csv.DictReader(f) if (r.get('findings') or r.get('impression'))]
    for column in ('MeSH', 'Problems'):
        print(f"\nlabeler vs IU X-ray {column} over {len(rows)} reports (uncertain counted positive)")
        print(f"{'condition':<28}{'n positive':>11}{'recall':>9}{'precision':>11}{'accuracy':>10}")
        for c, (n, rec, prec, acc) in agreement(rows, column).items():
            print(f"{c:<28}{n:>11}{rec:>9.3f}{prec:>11.3f}{acc:>10.3f}")


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    if not reports:
        sys.exit("give --reports=PATH/indiana_reports.csv (IU X-ray's report table)")
    print_agreement(reports)
