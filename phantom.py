"""
The phantom dataset: synthetic chest radiographs with reports and exact labels,
so the whole system runs and learns on a CPU with nothing downloaded.

    python phantom.py --data_dir=data/phantom [--n_train=3000 --image_size=128 --seed=1337]

Each patient is drawn from a seed and its index: anatomy (body, lungs, heart,
mediastinum, spine, ribs, clavicles, diaphragm domes, vessels) varies in size,
position, rotation, exposure and noise; 0-3 of the 13 CheXpert findings (or
none) are painted in with side and severity; a report is written from varied
templates that say what is there and negate what is normal, and the labels are
known exactly from what was written. Density is built up like an X-ray (air
dark, soft tissue grey, bone and metal bright) in an upright "canonical"
patient, then the whole picture is moved by one affine transform.
Writes the prepared-dataset format (see README): train/val/test.jsonl, images/,
manifest.json, tokenizer.json, and preview.png to look at.
"""
import json
import os
import re
import shutil
import sys
import textwrap
import time
from collections import Counter
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from chexpert import CONDITIONS, REGIONS

# -----------------------------------------------------------------------------
# CLI defaults (python phantom.py --key=value)
data_dir = 'data/phantom'
n_train = 3000
n_val = 300
n_test = 300
image_size = 128
seed = 1337
workers = os.cpu_count() or 1
force = False  # regenerate even when data_dir already holds this exact set

VERSION = 3    # bump whenever the output for a given seed changes
PAD = 0.15     # the canonical canvas reaches PAD beyond the image, so moving it shows no edges
P_NORMAL, P_DEVICES, P_UNCERTAIN = 0.38, 0.12, 0.15
# Relative frequency of each finding among abnormal studies. Lung Opacity is low
# because it is also positive whenever one of its children is (CheXpert's hierarchy).
WEIGHTS = {'Enlarged Cardiomediastinum': 0.8, 'Cardiomegaly': 1.2, 'Lung Opacity': 0.6,
           'Lung Lesion': 0.9, 'Edema': 0.9, 'Consolidation': 0.9, 'Pneumonia': 0.9,
           'Atelectasis': 1.0, 'Pneumothorax': 1.0, 'Pleural Effusion': 1.3, 'Pleural Other': 0.8,
           'Fracture': 0.9}
OPACITY_CHILDREN = ('Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis')
LOBES = {'right upper lobe': (-1, 0.5, 0.25), 'right middle lobe': (-1, 0.35, 0.62),
         'right lower lobe': (-1, 0.6, 0.8), 'left upper lobe': (1, 0.5, 0.3),
         'left lower lobe': (1, 0.6, 0.8)}  # image side (-1 = image left = patient right), fx, fy
SIDE = {'right': -1, 'left': 1}  # the patient's right lies on the image's left in a PA view
ZONE = {'upper': 0.25, 'mid': 0.5, 'lower': 0.78}

# -----------------------------------------------------------------------------
# Report templates. {Key} is {key} capitalized. Every value a slot can take is in
# FILL, so the tokenizer's vocabulary can be enumerated from this section alone.
FILL = dict(side=('right', 'left'), bside=('right', 'left', 'bilateral'), sev=('small', 'moderate', 'large'),
            csev=('mild', 'moderate', 'marked'), adv=('mildly', 'moderately', 'markedly'),
            esev=('mild', 'moderate'), lobe=tuple(LOBES), zone=tuple(ZONE),
            size=('8 mm', '1.2 cm', '1.5 cm', '2.1 cm', '2.4 cm'), msize=('3.5 cm', '4.2 cm', '5.0 cm', '6.1 cm'),
            rib=('5th', '6th', '7th', '8th', '9th'), k=('3', '4', '5'), s=('', 's'), isa=('is a', 'are'))
FIND = {  # key: (findings sentences, impression sentences)
    'Enlarged Cardiomediastinum': (["The mediastinum is widened.", "The superior mediastinum is widened.",
                                    "There is widening of the mediastinum."], ["Widened mediastinum."]),
    'Cardiomegaly': (["{Csev} cardiomegaly.", "The heart is {adv} enlarged.",
                      "The cardiac silhouette is {adv} enlarged."], ["{Csev} cardiomegaly."]),
    'Lung Opacity': (["There is patchy opacity in the {side} {zone} lung.",
                      "Patchy airspace opacity in the {side} {zone} lung zone."], ["Patchy {side} {zone} lung opacity."]),
    'Lung Lesion/nodule': (["There is a {size} nodular opacity in the {lobe}.",
                            "A {size} nodular opacity is seen in the {lobe}."], ["{Size} {lobe} nodule."]),
    'Lung Lesion/mass': (["There is a {msize} masslike opacity in the {lobe}.",
                          "A {msize} mass-like opacity is present in the {lobe}."], ["{Msize} {lobe} mass."]),
    'Edema': (["{Esev} pulmonary edema with bilateral perihilar hazy opacities.",
               "There are bilateral perihilar hazy opacities with {esev} interstitial edema."], ["{Esev} pulmonary edema."]),
    'Consolidation': (["{Lobe} consolidation with dense airspace opacity.",
                       "There is a dense airspace opacity with consolidation in the {lobe}."], ["{Lobe} consolidation."]),
    'Pneumonia': (["{Lobe} pneumonia with patchy airspace opacity.",
                   "There is patchy airspace opacity in the {lobe} due to pneumonia."], ["{Lobe} pneumonia."]),
    'Atelectasis': (["{Side} basilar atelectasis with a linear band of opacity.",
                     "Linear atelectatic opacity at the {side} lung base."], ["{Side} basilar atelectasis."]),
    'Pneumothorax': (["There is a {sev} {side} pneumothorax.", "A {sev} {side}-sided pneumothorax is present.",
                      "{Sev} {side} apical pneumothorax with a visible visceral pleural line."],
                     ["{Sev} {side} pneumothorax."]),
    'Pleural Effusion': (["{Sev} {bside} pleural effusion{s} blunting the costophrenic angle{s}.",
                          "There {isa} {sev} {bside} pleural effusion{s}."], ["{Sev} {bside} pleural effusion{s}."]),
    'Pleural Other': (["{Side} apical pleural thickening.", "There is {side} apical pleural thickening."],
                      ["{Side} apical pleural thickening."]),
    'Fracture': (["There is an acute fracture of the {side} {rib} rib.", "Displaced fracture of the {side} {rib} posterior rib."],
                 ["{Side} {rib} rib fracture."]),
    'Support Devices/ett': (["Endotracheal tube tip is {k} cm above the carina.",
                             "An endotracheal tube terminates {k} cm above the carina."], []),
    'Support Devices/ng': (["An enteric tube courses below the diaphragm.", "Nasogastric tube tip is in the stomach."], []),
    'Support Devices/cvc': (["{Side} internal jugular central venous catheter tip in the SVC.",
                             "The {side} internal jugular catheter terminates in the SVC."], []),
    'Support Devices/pacer': (["Left chest wall pacemaker with leads in the right atrium and right ventricle.",
                               "A left-sided pacemaker is in place."], []),
    'Support Devices': ([], ["Support devices in place."]),
}
HEDGED = {  # the uncertain (-1) phrasings
    'Pleural Effusion': (["Possible small {bside} pleural effusion.", "A small {bside} pleural effusion cannot be excluded."],
                         ["Possible small {bside} pleural effusion."]),
    'Pneumothorax': (["Possible small {side} apical pneumothorax.", "A tiny {side} apical pneumothorax cannot be excluded."],
                     ["Possible small {side} pneumothorax."]),
    'Fracture': (["Possible nondisplaced fracture of the {side} {rib} rib.",
                  "A nondisplaced {side} {rib} rib fracture cannot be excluded."], ["Possible {side} {rib} rib fracture."]),
}
ECM, CM, PTX, EFF = 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Pneumothorax', 'Pleural Effusion'
NEGATIONS = {  # group: [(sentence, conditions it negates)]
    'heart': [("Heart size is normal.", (CM,)), ("The heart is normal in size.", (CM,))],
    'heart+mediastinum': [("The heart size and mediastinal contours are normal.", (CM, ECM)),
                          ("Heart size and mediastinal contours are within normal limits.", (CM, ECM)),
                          ("The cardiomediastinal silhouette is within normal limits.", (ECM,))],
    'mediastinum': [("The mediastinal contours are normal.", (ECM,))],
    'clear': [("The lungs are clear.", ('Lung Opacity',)), ("Lungs are clear bilaterally.", ('Lung Opacity',)),
              ("The lungs are well expanded and clear.", ('Lung Opacity',))],  # clear lungs: no opacity
    'lungs': [("No focal consolidation.", ('Consolidation',)), ("There is no focal airspace opacity.", ('Lung Opacity',)),
              ("No evidence of pneumonia.", ('Pneumonia',))],
    'edema': [("There is no pulmonary edema.", ('Edema',)), ("No pulmonary edema.", ('Edema',))],
    'lesion': [("No suspicious pulmonary nodule or mass.", ('Lung Lesion',))],
    'pleura': [("No pneumothorax or pleural effusion.", (PTX, EFF)), ("There is no pleural effusion or pneumothorax.", (PTX, EFF))],
    'pleura+lungs': [("No focal consolidation, pleural effusion, or pneumothorax.", ('Consolidation', EFF, PTX))],
    'pneumothorax': [("No pneumothorax.", (PTX,)), ("There is no pneumothorax.", (PTX,))],
    'effusion': [("No pleural effusion.", (EFF,)), ("There is no pleural effusion.", (EFF,))],
    'bones': [("No acute osseous abnormality.", ()), ("No displaced rib fracture.", ('Fracture',)),
              ("No acute fracture is seen.", ('Fracture',))],
}
NORMAL_IMPRESSION = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                     "No acute cardiopulmonary disease.", "No acute cardiopulmonary findings."]
INDICATIONS = ["Chest pain.", "Shortness of breath.", "Cough and fever.", "Preoperative evaluation.",
               "Follow-up.", "Dyspnea on exertion.", "Trauma.", "Hypoxia."]


def fill(template, vals):
    vals = dict(vals, **{k.capitalize(): v[:1].upper() + v[1:] for k, v in vals.items()})
    return template.format(**vals)


def lexicon():
    """Every sentence shape with every slot value, one slot varied at a time: a text
    whose words are all the words any report can contain."""
    texts = [t for group in NEGATIONS.values() for t, _ in group] + NORMAL_IMPRESSION + ['Findings: | Impression:']
    for f, i in list(FIND.values()) + list(HEDGED.values()):
        for t in f + i:
            first = {k: v[0] for k, v in FILL.items()}
            slots = set(re.findall(r'\{(\w+)\}', t.lower()))
            texts += [fill(t, dict(first, **{k: v})) for k in slots for v in FILL[k]] or [t]
    return texts


# -----------------------------------------------------------------------------
# Sampling a patient: anatomy, findings, then the report and its labels

SLOTS = {ECM: (), CM: ('csev',), 'Lung Opacity': ('side', 'zone'), 'Lung Lesion': ('lobe',), 'Edema': ('esev',),
         'Consolidation': ('lobe',), 'Pneumonia': ('lobe',), 'Atelectasis': ('side',), PTX: ('side', 'sev'),
         EFF: ('bside', 'sev'), 'Pleural Other': ('side',), 'Fracture': ('side', 'rib'), 'Support Devices': ('side', 'k')}


def make_finding(cond, rng=None, certain=True, **vals):
    """One finding: its template key, text slots and render parameters; vals
    override the random choices (the tests paint a chosen finding this way)."""
    if cond not in SLOTS:
        raise ValueError(f"unknown condition {cond!r}; expected one of {list(SLOTS)}")
    rng = rng if rng is not None else np.random.default_rng(0)
    pick = lambda key, options=None: vals[key] if key in vals else str(rng.choice(options or FILL[key]))
    hedged = dict(bside=FILL['side'], sev=('small',)) if not certain else {}  # hedges are about small, one-sided things
    v = {slot: pick(slot, hedged.get(slot)) for slot in SLOTS[cond]}
    f = dict(cond=cond, key=cond, certain=certain, vals=v)
    if cond == ECM:
        f['widen'] = rng.uniform(1.5, 1.8)
    elif cond == CM:
        v['adv'] = FILL['adv'][FILL['csev'].index(v['csev'])]
        f['ctr'] = rng.uniform(*{'mild': (0.54, 0.58), 'moderate': (0.58, 0.63), 'marked': (0.63, 0.69)}[v['csev']])
    elif cond == 'Lung Lesion':
        kind = pick('kind', ('nodule', 'mass'))
        slot = 'size' if kind == 'nodule' else 'msize'
        f['key'], v[slot] = f'{cond}/{kind}', pick(slot)
        number, unit = v[slot].split()
        f['cm'] = float(number) / (10 if unit == 'mm' else 1)
    elif cond == EFF:
        v.update(s='s', isa='are') if v['bside'] == 'bilateral' else v.update(s='', isa='is a')
    elif cond == 'Support Devices':
        f['devices'] = vals.get('devices') or sorted(rng.choice(['cvc', 'ett', 'ng', 'pacer'], rng.integers(1, 3), replace=False).tolist())
    return f


def sample_case(seed, index):
    """A patient from (seed, index) alone, so any worker can draw any sample."""
    rng = np.random.default_rng([seed, index])
    anatomy = dict(hw=rng.uniform(0.34, 0.39), apex=rng.uniform(0.12, 0.17), cp=rng.uniform(0.76, 0.82),
                   rdome=rng.uniform(0.015, 0.04), dome=rng.uniform(0.04, 0.07), mw=rng.uniform(0.075, 0.09),
                   ctr=rng.uniform(0.38, 0.46), scale=rng.uniform(0.9, 1.02), rot=rng.uniform(-4, 4),
                   dx=rng.uniform(-0.03, 0.03), dy=rng.uniform(-0.03, 0.03), exposure=rng.uniform(0.9, 1.3),
                   gamma=rng.uniform(0.85, 1.15), noise=rng.uniform(0.01, 0.03), render_seed=int(rng.integers(2**31)))
    findings = []
    if rng.random() > P_NORMAL:
        conds = list(WEIGHTS)
        p = np.array([WEIGHTS[c] for c in conds]) / sum(WEIGHTS.values())
        for c in rng.choice(conds, rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]), replace=False, p=p):
            hedge = c in HEDGED and rng.random() < P_UNCERTAIN
            findings.append(make_finding(str(c), rng, certain=not hedge))
    if rng.random() < P_DEVICES:
        findings.append(make_finding('Support Devices', rng))
    return dict(anatomy=anatomy, findings=findings, text_seed=int(rng.integers(2**31)),
                indication=str(rng.choice(INDICATIONS)))


def write_report(case):
    """(findings, impression, labels): the report read in the usual order (devices,
    heart and mediastinum, lungs, pleura, bones) and exactly what it says."""
    rng = np.random.default_rng(case['text_seed'])
    pick = lambda options: options[rng.integers(len(options))]
    present = {f['cond']: f for f in case['findings']}
    labels = dict.fromkeys(CONDITIONS)
    findings, impression = [], []

    def positive(cond):
        f = present[cond]
        text, imp = (FIND if f['certain'] else HEDGED)[f['key'] if f['certain'] else cond]
        findings.append(fill(pick(text), f['vals']))
        impression.append(fill(pick(imp), f['vals']))
        labels[cond] = 1 if f['certain'] else -1

    def negative(group, p=1.0):
        if rng.random() < p:
            text, negated = pick(NEGATIONS[group])
            findings.append(text)
            labels.update(dict.fromkeys(negated, 0))

    if 'Support Devices' in present:
        f = present['Support Devices']
        findings.extend(fill(pick(FIND[f'Support Devices/{d}'][0]), f['vals']) for d in f['devices'])
        labels['Support Devices'] = 1
    if CM in present:
        positive(CM)
        positive(ECM) if ECM in present else negative('mediastinum', 0.5)
    elif ECM in present:
        positive(ECM)
        negative('heart')
    else:
        negative(pick(['heart', 'heart+mediastinum']))
    lung = [c for c in ('Lung Opacity', 'Consolidation', 'Pneumonia', 'Edema', 'Atelectasis', 'Lung Lesion') if c in present]
    for c in lung:
        positive(c)
    pleural_free = [c for c in (PTX, EFF) if c not in present]
    if not lung and not (set(present) & {PTX, EFF, 'Pleural Other'}):
        negative('clear')
    if not lung:  # a consolidation is only denied when no opacity is described
        negative('pleura+lungs' if len(pleural_free) == 2 and rng.random() < 0.3 else 'lungs', 0.5)
    if 'Edema' not in present:
        negative('edema', 0.25)
    if 'Lung Lesion' not in present:
        negative('lesion', 0.15)
    for c in (PTX, EFF, 'Pleural Other'):
        if c in present:
            positive(c)
    pleural_free = [c for c in pleural_free if labels[c] is None]  # the three-way sentence may have said it
    if pleural_free:
        negative('pleura' if len(pleural_free) == 2 else 'pneumothorax' if pleural_free == [PTX] else 'effusion')
    positive('Fracture') if 'Fracture' in present else negative('bones', 0.4)
    if any(labels[c] in (1, -1) for c in CONDITIONS[1:-1]):
        labels['Lung Opacity'] = 1 if any(labels[c] == 1 for c in OPACITY_CHILDREN) else labels['Lung Opacity']
    else:  # CheXpert: No Finding when nothing but support devices is positive or uncertain
        labels['No Finding'] = 1
        impression = ([pick(FIND['Support Devices'][1])] if labels['Support Devices'] and rng.random() < 0.5 else [])
        impression.append(pick(NORMAL_IMPRESSION))
    return ' '.join(findings), ' '.join(impression), [labels[c] for c in CONDITIONS]


# -----------------------------------------------------------------------------
# Drawing: geometry of the upright canonical patient, in fractions of the image

def geometry(case):
    """Polygons and landmarks of the canonical patient, findings that change the
    anatomy (a big heart, a wide mediastinum) included. Side -1 is the image's
    left (the patient's right), +1 the image's right."""
    a, present = case['anatomy'], {f['cond']: f for f in case['findings']}
    hw, A = a['hw'], a['apex']
    mw = a['mw'] * (present[ECM]['widen'] if ECM in present else 1)
    mwb = 0.055  # the lower medial lung border, hidden behind the heart anyway
    C = {-1: a['cp'] - a['rdome'], 1: a['cp']}  # the right hemidiaphragm sits higher
    yt = A + 0.36 * (C[1] - A)  # the top of the heart
    g = dict(hw=hw, A=A, mw=mw, mwb=mwb, C=C, yt=yt, lungs={}, lateral={}, dome={})
    for s in (-1, 1):
        xm, xl, xa, Cm = 0.5 + s * mwb, 0.5 + s * hw, 0.5 + s * (mw + 0.35 * (hw - mw)), C[s] - 0.03
        t = np.linspace(0, 1, 20)
        lateral = np.stack([xa + (xl - xa) * np.sin(np.pi / 2 * t) ** 0.5, A + (C[s] - A) * t], 1)
        # the dome rises steeply from the lateral wall: a sharp costophrenic angle
        u = t[1:]
        dome = np.stack([xl + (xm - xl) * u, C[s] + (Cm - C[s]) * u - a['dome'] * np.sin(np.pi * u)], 1)
        medial = [(xm, yt + 0.05), (0.5 + s * mw, yt - 0.03), (0.5 + s * mw, A + 0.07)]
        apex = [(0.5 + s * mw + (xa - 0.5 - s * mw) * v, A + 0.07 * (1 - v) ** 2) for v in (0.3, 0.6, 0.85)]
        g['lateral'][s], g['dome'][s] = [tuple(p) for p in lateral], [tuple(p) for p in dome]
        g['lungs'][s] = g['lateral'][s] + g['dome'][s] + medial + apex
    # the heart: wider on the patient's left (image right), its bottom cut by the diaphragm
    ctr = present[CM]['ctr'] if CM in present else a['ctr']
    W, yb = ctr * 2 * hw, C[1] - 0.03
    x0, x1 = 0.5 - 0.36 * W, 0.5 + 0.64 * W
    ry = (yb + 0.06 - yt) / 2
    phi = np.linspace(0, 2 * np.pi, 48)
    g['heart'] = [((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(p), min(yt + ry + ry * np.sin(p), yb)) for p in phi]
    g.update(yb=yb, carina=A + 0.2, ctr=ctr,
             knob=(0.5 + mw - 0.01, A + 0.14, 0.032),  # the aortic knob on the mediastinum's left
             hila={s: (0.5 + s * (mwb + 0.05), yt + 0.02) for s in (-1, 1)})
    bw = hw + 0.06  # the chest wall; the outline runs up the image-left side and down the right
    half = [(0.075, -0.3), (0.075, A - 0.07), (bw + 0.05, A - 0.03), (0.7, A), (0.7, A + 0.2),
            (bw, A + 0.28), (bw + 0.01, C[1]), (bw - 0.02, 1.3)]
    g['body'] = [(0.5 - x, y) for x, y in half[::-1]] + [(0.5 + x, y) for x, y in half]
    g['arms'] = [[(0.5 + s * x, y) for x, y in [(bw + 0.045, A + 0.27), (0.7, A + 0.17), (0.7, 1.3), (bw + 0.07, 1.3)]]
                 for s in (-1, 1)]
    return g


def transform(a):
    """The forward map canonical (u, v) -> image fractions: scale, rotate, shift."""
    c, s = np.cos(np.radians(a['rot'])), np.sin(np.radians(a['rot']))
    return lambda u, v: (0.5 + a['dx'] + a['scale'] * (c * (u - 0.5) - s * (v - 0.5)),
                         0.5 + a['dy'] + a['scale'] * (s * (u - 0.5) + c * (v - 0.5)))


def regions(case, g=None):
    """Boxes [x0, y0, x1, y1] of the 6 REGIONS in image fractions, for attention checks."""
    g = g or geometry(case)
    fwd = transform(case['anatomy'])
    box = lambda x0, y0, x1, y1: [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]
    dome_top = min(y for s in (-1, 1) for x, y in g['dome'][s])
    pts = {'cardiac': g['heart'], 'left lung': g['lungs'][1], 'right lung': g['lungs'][-1],
           'mediastinum': box(0.5 - g['mw'], g['A'], 0.5 + g['mw'], g['yt'] + 0.03),
           'diaphragm': box(0.5 - g['hw'], dome_top - 0.02, 0.5 + g['hw'], max(g['C'].values()) + 0.03),
           'spine': box(0.465, g['A'] - 0.1, 0.535, max(g['C'].values()) + 0.1)}
    out = {}
    for name in REGIONS:
        xy = np.array([fwd(u, v) for u, v in pts[name]]).clip(0, 1)
        out[name] = [round(float(v), 4) for v in (*xy.min(0), *xy.max(0))]
    return out


def render(case, size):
    """The radiograph of a case: (size, size) uint8, bright = dense."""
    a, g, S = case['anatomy'], geometry(case), size
    M = int(round(S * (1 + 2 * PAD)))
    P = lambda pts: [((x + PAD) * S, (y + PAD) * S) for x, y in pts]
    lw = lambda frac: max(1, int(round(frac * S)))
    U = ((np.arange(M) + 0.5) / S - PAD)[None, :]
    V = ((np.arange(M) + 0.5) / S - PAD)[:, None]
    rng = np.random.default_rng(a['render_seed'])
    frng = np.random.default_rng([a['render_seed'], 1])  # findings get their own stream: noise stays put

    def layer(*shapes, blur=0.0):
        """Shapes ('poly'|'line'|'ellipse', points or box, value[, width]) on an 8-bit canvas, blurred; [0, 1]."""
        im = Image.new('L', (M, M))
        draw = ImageDraw.Draw(im)
        for kind, pts, value, *width in shapes:
            if kind == 'poly':
                draw.polygon(P(pts), fill=value)
            elif kind == 'line':
                draw.line(P(pts), fill=value, width=lw(width[0]), joint='curve')
            else:
                (x, y, r), ry = pts, (width[0] if width else pts[2])
                draw.ellipse(P([(x - r, y - ry), (x + r, y + ry)]), fill=value)
        if blur:
            im = im.filter(ImageFilter.GaussianBlur(blur * S))
        return np.asarray(im, np.float32) / 255

    present = {f['cond']: f for f in case['findings']}
    body = layer(('poly', g['body'], 255), *[('poly', arm, 255) for arm in g['arms']], blur=0.006)
    d = body * (0.55 + 0.5 * layer(('poly', g['body'], 255), blur=0.08))  # thicker in the middle
    lungs = {s: layer(('poly', g['lungs'][s], 255), blur=0.003) for s in (-1, 1)}
    aerated, space = dict(lungs), {s: 0.0 for s in (-1, 1)}
    heart = layer(('poly', g['heart'], 255), ('ellipse', g['knob'], 255), blur=0.006)
    # vessels fan out from the hila and fade towards the periphery
    vessels = []
    for s in (-1, 1):
        for _ in range(12):
            theta, length, (x, y) = rng.uniform(-1.2, 1.3), rng.uniform(0.15, 0.32), g['hila'][s]
            for k in range(5):
                theta += rng.normal(0, 0.15)
                nx, ny = x + s * np.cos(theta) * length / 5, y + np.sin(theta) * length / 5
                vessels.append(('line', [(x, y), (nx, ny)], int(230 * (1 - k / 6)), 0.006))
                if k == 2:
                    vessels.append(('line', [(x, y), (x + s * np.cos(theta + 0.5) * length / 3,
                                                      y + np.sin(theta + 0.5) * length / 3)], 120, 0.004))
                x, y = nx, ny
    vessels = layer(*vessels, blur=0.003)
    if PTX in present:  # the lung falls away from the chest wall towards the base
        f = present[PTX]
        s = SIDE[f['vals']['side']]
        k = {'small': 0.9, 'moderate': 0.8, 'large': 0.66}[f['vals']['sev']]
        ax, ay = 0.5 + s * g['mwb'], g['C'][s]
        shrink = lambda pts: [(ax + (x - ax) * k, ay + (y - ay) * k) for x, y in pts]
        aerated[s] = lungs[s] * layer(('poly', shrink(g['lungs'][s]), 255), blur=0.002)
        space[s] = lungs[s] - aerated[s]
        d += 0.3 * layer(('line', shrink(g['lateral'][s]), 255, 0.004), blur=0.002) * lungs[s]
    if EFF in present:  # fluid fills the base, its meniscus climbing the lateral wall
        f = present[EFF]
        for s in ((-1, 1) if f['vals']['bside'] == 'bilateral' else (SIDE[f['vals']['bside']],)):
            h = {'small': 0.08, 'moderate': 0.17, 'large': 0.3}[f['vals']['sev']] * (g['C'][s] - g['A'])
            lateralness = ((np.abs(U - 0.5) - g['mwb']) / (g['hw'] - g['mwb'])).clip(0, 1)
            fluid = (V > g['C'][s] - h - (0.4 * h + 0.02) * lateralness ** 2) * lungs[s]
            fluid = np.asarray(Image.fromarray((fluid * 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(0.012 * S)), np.float32) / 255
            aerated[s] = aerated[s] * (1 - fluid)
    air = sum(aerated.values()) + 1.2 * sum(space.values())
    base = ((V - g['A']) / (max(g['C'].values()) - g['A'])).clip(0, 1)
    d = d - 0.82 * air * (1 - heart) * (1.05 - 0.15 * base)  # bases carry more tissue
    d = d + 0.12 * heart + 0.22 * vessels * sum(aerated.values()) * (1 - heart)
    d = d + 0.15 * layer(*[('ellipse', (x, y, 0.035), 255, 0.045) for x, y in g['hila'].values()], blur=0.02)
    d = d - 0.3 * layer(('line', [(0.5, -0.2), (0.5, g['carina'])], 255, 0.035),
                        ('line', [(0.5, g['carina']), g['hila'][-1]], 255, 0.02),
                        ('line', [(0.5, g['carina']), g['hila'][1]], 255, 0.02), blur=0.006) * (1 - heart)
    d = d - 0.3 * layer(('ellipse', (0.5 + 0.22, g['C'][1] + 0.06, 0.05), 255, 0.03), blur=0.01)  # gastric bubble
    # bones: spine, posterior ribs (bright) and anterior ribs (faint), clavicles
    spine = [('poly', [(0.47, -0.3), (0.53, -0.3), (0.53, 1.3), (0.47, 1.3)], 110)]
    spine += [('poly', [(0.465, y), (0.535, y), (0.535, y + 0.04), (0.465, y + 0.04)], 255) for y in np.arange(-0.3, 1.3, 0.05)]
    d = d + 0.2 * layer(*spine, blur=0.003)
    fracture = present.get('Fracture')
    ribs, anterior = [], []
    for s in (-1, 1):
        for i in range(10):
            y0, t = g['A'] - 0.02 + i * 0.085 * (g['C'][s] - g['A']), np.linspace(0, 1, 16)
            x = 0.5 + s * (0.035 + (g['hw'] + 0.01 - 0.035) * t)
            y = y0 - 0.04 * np.sin(np.pi * t) + 0.13 * t ** 2
            pts = list(zip(x, y))
            if fracture and SIDE[fracture['vals']['side']] == s and FILL['rib'].index(fracture['vals']['rib']) + 4 == i:
                shift = 0.02 if fracture['certain'] else 0.0  # a displaced fracture steps down
                ribs += [('line', pts[:9], 255, 0.02), ('line', [(px, py + shift) for px, py in pts[12:]], 255, 0.02)]
            else:
                ribs.append(('line', pts, 255, 0.02))
            t = np.linspace(0, 1, 8)
            anterior.append(('line', list(zip(x[-1] - s * (g['hw'] - 0.12) * t, y[-1] + 0.12 * t + 0.02 * np.sin(np.pi * t))), 255, 0.016))
    d = d + 0.22 * layer(*ribs, blur=0.003) + 0.08 * layer(*anterior, blur=0.005)
    d = d + 0.35 * layer(*[('line', [(0.5 + s * x, g['A'] + y) for x, y in
                                     [(0.04, 0.045), (0.12, 0.01), (0.22, -0.01), (g['hw'] + 0.08, -0.045)]], 255, 0.022)
                           for s in (-1, 1)], blur=0.003)
    d = d + paint_findings(present, g, lungs, layer, frng)
    # expose: density -> brightness, then the film's gamma and grain
    c, s, k = np.cos(np.radians(a['rot'])), np.sin(np.radians(a['rot'])), 1 / a['scale']
    ox, oy, o = S * (0.5 + a['dx']), S * (0.5 + a['dy']), S * (0.5 + PAD)  # PIL wants output -> canvas pixels
    coeffs = (c * k, s * k, o - k * (c * ox + s * oy), -s * k, c * k, o - k * (-s * ox + c * oy))
    d = np.asarray(Image.fromarray(d.astype(np.float32), 'F').transform((S, S), Image.AFFINE, coeffs, Image.BILINEAR))
    img = ((1 - np.exp(-a['exposure'] * d.clip(0))) / (1 - np.exp(-a['exposure'] * 2.2))).clip(0, 1) ** a['gamma']
    img = img + a['noise'] * rng.standard_normal((S, S), dtype=np.float32)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


def paint_findings(present, g, lungs, layer, rng):
    """Extra density of the lung findings, support devices and pleural thickening."""
    d = 0.0
    def spot(side, fx, fy):
        s = side if isinstance(side, int) else SIDE[side]
        return s, 0.5 + s * (g['mwb'] + (g['hw'] - g['mwb']) * fx), g['A'] + (g['C'][s] - g['A']) * fy
    blobs = lambda x, y, n, r, spread: [('ellipse', (x + rng.normal(0, spread), y + rng.normal(0, spread),
                                                      r * rng.uniform(0.6, 1.2)), 255) for _ in range(n)]
    for cond, f in present.items():
        v = f['vals']
        if cond in ('Consolidation', 'Pneumonia'):
            s, x, y = spot(*LOBES[v['lobe']])
            shapes = blobs(x, y, 4, 0.09, 0.03) if cond == 'Consolidation' else blobs(x, y, 10, 0.04, 0.05)
            d = d + (0.6 if cond == 'Consolidation' else 0.45) * layer(*shapes, blur=0.02) * lungs[s]
        elif cond == 'Lung Opacity':
            s, x, y = spot(v['side'], 0.55, ZONE[v['zone']])
            d = d + 0.35 * layer(*blobs(x, y, 7, 0.035, 0.05), blur=0.015) * lungs[s]
        elif cond == 'Lung Lesion':
            s, x, y = spot(*LOBES[v['lobe']])
            r = f['cm'] * 0.0135
            shapes = [('ellipse', (x, y, r), 255)] + (blobs(x, y, 3, r * 0.7, r * 0.4) if f['cm'] > 3 else [])
            d = d + 0.6 * layer(*shapes, blur=0.003) * lungs[s]
        elif cond == 'Edema':
            haze = layer(*[('ellipse', (x, y, 0.13), 255, 0.17) for x, y in g['hila'].values()], blur=0.05)
            d = d + {'mild': 0.3, 'moderate': 0.45}[v['esev']] * haze * (lungs[-1] + lungs[1])
        elif cond == 'Atelectasis':
            s, x0, y0 = spot(v['side'], 0.3, 0.82)
            _, x1, y1 = spot(v['side'], 0.9, 0.86)
            d = d + 0.6 * layer(('line', [(x0, y0), (x1, y1)], 255, 0.024), blur=0.007) * lungs[s]
        elif cond == 'Pleural Other':  # an apical cap along the lung's top
            s = SIDE[v['side']]
            cap = g['lungs'][s][-3:] + g['lateral'][s][:9]
            d = d + 0.8 * layer(('line', cap, 255, 0.06), blur=0.008) * lungs[s]
        elif cond == 'Support Devices':  # metal and radiopaque tubes: the densest things in the picture
            shapes, A, yt = [], g['A'], g['yt']
            for dev in f['devices']:
                if dev == 'ett':
                    shapes.append(('line', [(0.5, -0.3), (0.5, g['carina'] - 0.012 * int(v['k']))], 200, 0.014))
                elif dev == 'ng':
                    shapes.append(('line', [(0.49, -0.3), (0.49, g['C'][1] - 0.05), (0.55, g['C'][1] + 0.05),
                                            (0.68, g['C'][1] + 0.08)], 255, 0.008))
                elif dev == 'cvc':
                    s = SIDE[v['side']]
                    shapes.append(('line', [(0.5 + s * 0.1, -0.3), (0.5 + s * 0.07, A + 0.05), (0.5 + s * 0.03, A + 0.15),
                                            (0.47, yt)], 255, 0.008))
                else:
                    box = (0.5 + g['hw'] - 0.1, A + 0.02, 0.5 + g['hw'] - 0.01, A + 0.08)
                    shapes += [('poly', [(box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])], 255),
                               ('line', [(box[0], box[3]), (0.46, A + 0.15), (0.47, yt + 0.05)], 255, 0.006),
                               ('line', [(box[0], box[3]), (0.5, yt), (0.55, g['yb'] - 0.05)], 255, 0.006)]
            d = d + 1.2 * layer(*shapes, blur=0.002)
    return d


# -----------------------------------------------------------------------------
# Writing the dataset

def make_record(job):
    """Samples, renders and saves patient `index`; returns its jsonl record (runs in a worker)."""
    out_dir, index, seed, size = job
    case = sample_case(seed, index)
    findings, impression, labels = write_report(case)
    uid = f'ph{index:06d}'
    image = f'images/{uid}.png'
    Image.fromarray(render(case, size)).save(os.path.join(out_dir, image))
    return dict(id=f'{uid}-pa', uid=uid, image=image, findings=findings, impression=impression,
                report=f'Findings: {findings} | Impression: {impression}', indication=case['indication'],
                labels=labels, label_source='phantom generator', regions=regions(case))


def build_tokenizer(reports):
    """A word-level tokenizer over the training reports plus every word the templates
    can produce. Metaspace marks word starts with '▁' and punctuation splits off
    without one, so decode() gives the text back exactly, case and all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    count = lambda texts: Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t))
    vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}  # T5's ids: pad is also the decoder start
    for w, _ in sorted(count(reports).items(), key=lambda kv: (-kv[1], kv[0])):  # ties sorted: same ids every run
        vocab.setdefault(w, len(vocab))
    for w in sorted(count(lexicon())):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer, tok.decoder = pre, decoders.Metaspace()
    tok.add_special_tokens(['<pad>', '</s>', '<unk>'])
    return tok


SHORT = dict(zip(CONDITIONS, ['normal', 'wide mediast', 'cardiomeg', 'opacity', 'lesion', 'edema', 'consolid',
                              'pneumonia', 'atelect', 'PTX', 'effusion', 'pl thick', 'fracture', 'devices']))


def write_preview(path, root, records, thumb=160, grid=4):
    """A grid of thumbnails, the first positive of each condition first, captioned with their labels."""
    picks = [next((r for r in records if r['labels'][i] == 1), None) for i in range(1, len(CONDITIONS))]
    picks = [r for r in picks if r] + [r for r in records if r['labels'][0] == 1]
    picks = list({r['id']: r for r in picks + records}.values())[:grid * grid]
    sheet, font = Image.new('L', (grid * thumb, grid * (thumb + 24)), 255), ImageFont.load_default()
    draw = ImageDraw.Draw(sheet)
    for k, r in enumerate(picks):
        x, y = k % grid * thumb, k // grid * (thumb + 24)
        sheet.paste(Image.open(os.path.join(root, r['image'])).resize((thumb, thumb), Image.BILINEAR), (x, y))
        caption = ', '.join(SHORT[c] + ('?' if v == -1 else '') for c, v in zip(CONDITIONS, r['labels']) if v in (1, -1))
        for j, line in enumerate(textwrap.wrap(caption, 30)[:2]):
            draw.text((x + 2, y + thumb + 1 + 11 * j), line, fill=0, font=font)
    sheet.save(path)


def check_params(n_train, n_val, n_test, image_size, seed):
    for key, value, low in (('n_train', n_train, 1), ('n_val', n_val, 0), ('n_test', n_test, 0), ('image_size', image_size, 64)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (key == 'image_size' and value > 512):
            limit = 'an int in [64, 512]' if key == 'image_size' else f'an int >= {low}'
            raise ValueError(f"phantom: {key} must be {limit}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"phantom: seed must be an int >= 0, got {seed!r}")
    return dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)


def read_manifest(data_dir):
    """The manifest of a complete phantom set in data_dir (this generator version), else None."""
    try:
        with open(os.path.join(data_dir, 'manifest.json')) as f:
            m = json.load(f)
        n = sum(m['counts'].values())
        files = ['train.jsonl', 'val.jsonl', 'test.jsonl', 'tokenizer.json']
        if (m.get('dataset') == 'phantom' and m.get('generator_version') == VERSION and len(os.listdir(
                os.path.join(data_dir, 'images'))) == n and all(os.path.exists(os.path.join(data_dir, f)) for f in files)):
            return m
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def generate(data_dir, n_train=3000, n_val=300, n_test=300, image_size=128, seed=1337, workers=None, force=False):
    """Writes the phantom dataset to data_dir, unless it already holds this exact set
    (force=True regenerates). Returns the manifest."""
    params, data_dir = check_params(n_train, n_val, n_test, image_size, seed), os.path.normpath(data_dir)
    m = read_manifest(data_dir)
    if m and m['params'] == params and not force:
        print(f"phantom: {data_dir} already holds this set, not regenerating")
        return m
    try:  # only ever replace an empty directory or an earlier phantom set, never a prepared real dataset
        with open(os.path.join(data_dir, 'manifest.json')) as f:
            ours = json.load(f).get('dataset') == 'phantom'
    except (OSError, ValueError, AttributeError):
        ours = os.path.isdir(data_dir) and not os.listdir(data_dir) or not os.path.exists(data_dir)
    if not ours:
        raise ValueError(f"phantom: {data_dir} exists and is not a phantom set (no manifest.json saying "
                         f"dataset 'phantom'); refusing to overwrite it, choose another data_dir")
    # build next to it and swap at the end, so an interrupted run never looks complete
    tmp = data_dir + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, 'images'))
    n, workers = n_train + n_val + n_test, max(1, workers or os.cpu_count() or 1)
    jobs = [(tmp, i, seed, image_size) for i in range(n)]
    t0 = time.time()
    if workers > 1:
        with Pool(workers) as pool:  # ordered results: the files do not depend on the worker count
            records = pool.map(make_record, jobs, chunksize=max(1, n // (8 * workers)))
    else:
        records = [make_record(job) for job in jobs]
    dt = time.time() - t0
    print(f"phantom: {n} images of {image_size} px in {dt:.1f}s ({n / dt:.0f} images/s, {workers} workers)")
    splits = dict(train=records[:n_train], val=records[n_train:n_train + n_val], test=records[n_train + n_val:])
    for name, recs in splits.items():
        with open(os.path.join(tmp, f'{name}.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in recs)
    tok = build_tokenizer([r['report'] for r in splits['train']])
    tok.save(os.path.join(tmp, 'tokenizer.json'))
    write_preview(os.path.join(tmp, 'preview.png'), tmp, splits['train'])
    tally = lambda recs, v: {c: sum(r['labels'][i] == v for r in recs) for i, c in enumerate(CONDITIONS)}
    manifest = dict(
        dataset='phantom', generator_version=VERSION, params=params, image_size=image_size, seed=seed,
        counts={k: len(v) for k, v in splits.items()}, dropped={}, conditions=list(CONDITIONS), regions=list(REGIONS),
        prevalence={k: {c: round(p / max(1, len(v)), 4) for c, p in tally(v, 1).items()} for k, v in splits.items()},
        label_counts={name: tally(records, v) for name, v in (('positive', 1), ('negative', 0), ('uncertain', -1), ('blank', None))},
        vocab_size=tok.get_vocab_size(), label_source='phantom generator',
        files=['train.jsonl', 'val.jsonl', 'test.jsonl', 'images/', 'tokenizer.json', 'preview.png', 'manifest.json'])
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)
    os.makedirs(os.path.dirname(os.path.abspath(data_dir)), exist_ok=True)
    os.replace(tmp, data_dir)
    print(f"phantom: wrote {data_dir} ({manifest['counts']}), preview at {os.path.join(data_dir, 'preview.png')}")
    return manifest


def ensure_phantom(data_dir, workers=None, **params):
    """Generates data_dir unless it holds a complete phantom set matching every
    parameter given; omitted or None ones accept what is there (train.py's call
    keeps a set made with other sizes)."""
    given = {k: v for k, v in params.items() if v is not None}
    m = read_manifest(data_dir)
    if m and all(m['params'].get(k) == v for k, v in given.items()):
        return m
    return generate(data_dir, workers=workers, force=True, **given)


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    generate(data_dir, n_train, n_val, n_test, image_size, seed, workers, force)
