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
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from chexpert import CONDITIONS, REGIONS, diagnosis_text

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

VERSION = 5    # bump whenever the output for a given seed changes (5: the diagnosis prompt's words in the tokenizer)
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
NEGATIONS = {  # group: [(sentence, conditions it negates)]
    'heart': [("Heart size is normal.", ('Cardiomegaly',)), ("The heart is normal in size.", ('Cardiomegaly',))],
    'heart+mediastinum': [
        ("The heart size and mediastinal contours are normal.", ('Cardiomegaly', 'Enlarged Cardiomediastinum')),
        ("Heart size and mediastinal contours are within normal limits.",
         ('Cardiomegaly', 'Enlarged Cardiomediastinum')),
        ("The cardiomediastinal silhouette is within normal limits.", ('Enlarged Cardiomediastinum',))],
    'mediastinum': [("The mediastinal contours are normal.", ('Enlarged Cardiomediastinum',))],
    'clear': [("The lungs are clear.", ('Lung Opacity',)), ("Lungs are clear bilaterally.", ('Lung Opacity',)),
              ("The lungs are well expanded and clear.", ('Lung Opacity',))],  # clear lungs: no opacity
    'lungs': [("No focal consolidation.", ('Consolidation',)), ("There is no focal airspace opacity.", ('Lung Opacity',)),
              ("No evidence of pneumonia.", ('Pneumonia',))],
    'edema': [("There is no pulmonary edema.", ('Edema',)), ("No pulmonary edema.", ('Edema',))],
    'lesion': [("No suspicious pulmonary nodule or mass.", ('Lung Lesion',))],
    'pleura': [("No pneumothorax or pleural effusion.", ('Pneumothorax', 'Pleural Effusion')),
               ("There is no pleural effusion or pneumothorax.", ('Pneumothorax', 'Pleural Effusion'))],
    'pleura+lungs': [("No focal consolidation, pleural effusion, or pneumothorax.",
                      ('Consolidation', 'Pleural Effusion', 'Pneumothorax'))],
    'pneumothorax': [("No pneumothorax.", ('Pneumothorax',)), ("There is no pneumothorax.", ('Pneumothorax',))],
    'effusion': [("No pleural effusion.", ('Pleural Effusion',)),
                 ("There is no pleural effusion.", ('Pleural Effusion',))],
    'bones': [("No acute osseous abnormality.", ()), ("No displaced rib fracture.", ('Fracture',)),
              ("No acute fracture is seen.", ('Fracture',))],
}
NORMAL_IMPRESSION = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                     "No acute cardiopulmonary disease.", "No acute cardiopulmonary findings."]
# The clinical indication: real but imperfect signal. A finding is named by its hinting indication
# with probability `p_given`, and a patient without it gets the same hint with `p_false` (a
# pacemaker check whose leads are not in view, a trauma without a fracture); when no hint is
# drawn, a generic one that says nothing. The labels come from the findings alone.
HINTS = [  # (condition or device, indication, p_given, p_false)
    ('pacer', "Pacemaker check.", 0.6, 0.01), ('cvc', "Central line placement.", 0.6, 0.01),
    ('ett', "Endotracheal tube position.", 0.6, 0.01), ('ng', "Feeding tube placement.", 0.6, 0.01),
    ('Pleural Effusion', "Follow-up of known pleural effusion.", 0.5, 0.03),
    ('Fracture', "Trauma, rib pain.", 0.6, 0.03), ('Pneumothorax', "Sudden chest pain after procedure.", 0.5, 0.02),
    ('Pneumonia', "Cough and fever.", 0.5, 0.05), ('Consolidation', "Cough and fever.", 0.4, 0.0),
    ('Edema', "Heart failure, worsening dyspnea.", 0.5, 0.03), ('Cardiomegaly', "Heart failure, worsening dyspnea.", 0.3, 0.0),
    ('Lung Lesion', "Follow-up of lung nodule.", 0.4, 0.03)]
INDICATIONS = ["Chest pain.", "Shortness of breath.", "Preoperative evaluation.", "Follow-up.",
               "Dyspnea on exertion.", "Hypoxia.", "Routine examination."]  # generic: they say nothing


def draw_indication(findings, seed, index):
    """The case's indication, from its own stream so the images and reports do not depend on it."""
    rng = np.random.default_rng([seed, index, 1])
    present = {finding['cond'] for finding in findings}
    present |= {device for finding in findings for device in finding.get('devices', ())}
    hints = [text for what, text, p_given, p_false in HINTS if rng.random() < (p_given if what in present else p_false)]
    return hints[0] if hints else str(rng.choice(INDICATIONS))


def fill(template, vals):
    vals = dict(vals, **{key.capitalize(): value[:1].upper() + value[1:] for key, value in vals.items()})
    return template.format(**vals)


def lexicon():
    """Every sentence shape with every slot value, one slot varied at a time: a text
    whose words are all the words any report can contain."""
    texts = [text for group in NEGATIONS.values() for text, _ in group]
    texts += NORMAL_IMPRESSION + ['Findings: | Impression:']
    texts += [text for _, text, _, _ in HINTS] + INDICATIONS + ['Indication:']  # the context prefix's words
    texts += [diagnosis_text([True] * len(CONDITIONS)), diagnosis_text([False] * len(CONDITIONS))]  # diagnosis_prompt's
    first = {slot: values[0] for slot, values in FILL.items()}
    for sentences, impressions in list(FIND.values()) + list(HEDGED.values()):
        for template in sentences + impressions:
            slots = set(re.findall(r'\{(\w+)\}', template.lower()))
            variants = [fill(template, dict(first, **{slot: value})) for slot in slots for value in FILL[slot]]
            texts += variants or [template]
    return texts


# -----------------------------------------------------------------------------
# Sampling a patient: anatomy, findings, then the report and its labels

SLOTS = {'Enlarged Cardiomediastinum': (), 'Cardiomegaly': ('csev',), 'Lung Opacity': ('side', 'zone'),
         'Lung Lesion': ('lobe',), 'Edema': ('esev',), 'Consolidation': ('lobe',), 'Pneumonia': ('lobe',),
         'Atelectasis': ('side',), 'Pneumothorax': ('side', 'sev'), 'Pleural Effusion': ('bside', 'sev'),
         'Pleural Other': ('side',), 'Fracture': ('side', 'rib'), 'Support Devices': ('side', 'k')}
LUNG_FINDINGS = ('Lung Opacity', 'Consolidation', 'Pneumonia', 'Edema', 'Atelectasis', 'Lung Lesion')  # report order
CARDIOTHORACIC_RATIO = {'mild': (0.54, 0.58), 'moderate': (0.58, 0.63), 'marked': (0.63, 0.69)}  # by cardiomegaly


def make_finding(cond, rng=None, certain=True, **chosen):
    """One finding: its template key, text slots and render parameters; `chosen`
    values override the random choices (the tests paint a chosen finding this way)."""
    if cond not in SLOTS:
        raise ValueError(f"unknown condition {cond!r}; expected one of {list(SLOTS)}")
    rng = rng if rng is not None else np.random.default_rng(0)

    def pick(slot, options=None):
        return chosen[slot] if slot in chosen else str(rng.choice(options or FILL[slot]))

    hedged = dict(bside=FILL['side'], sev=('small',)) if not certain else {}  # hedges are about small, one-sided things
    vals = {slot: pick(slot, hedged.get(slot)) for slot in SLOTS[cond]}
    finding = dict(cond=cond, key=cond, certain=certain, vals=vals)
    if cond == 'Enlarged Cardiomediastinum':
        finding['widen'] = rng.uniform(1.5, 1.8)
    elif cond == 'Cardiomegaly':
        vals['adv'] = FILL['adv'][FILL['csev'].index(vals['csev'])]
        finding['cardiothoracic_ratio'] = rng.uniform(*CARDIOTHORACIC_RATIO[vals['csev']])
    elif cond == 'Lung Lesion':
        kind = pick('kind', ('nodule', 'mass'))
        slot = 'size' if kind == 'nodule' else 'msize'
        finding['key'], vals[slot] = f'{cond}/{kind}', pick(slot)
        number, unit = vals[slot].split()
        finding['size_cm'] = float(number) / (10 if unit == 'mm' else 1)
    elif cond == 'Pleural Effusion':
        bilateral = vals['bside'] == 'bilateral'
        vals.update(s='s' if bilateral else '', isa='are' if bilateral else 'is a')
    elif cond == 'Support Devices':
        finding['devices'] = chosen.get('devices') or sorted(
            rng.choice(['cvc', 'ett', 'ng', 'pacer'], rng.integers(1, 3), replace=False).tolist())
    return finding


def sample_case(seed, index):
    """A patient from (seed, index) alone, so any worker can draw any sample. Lengths
    are fractions of the image, heights measured down from its top."""
    rng = np.random.default_rng([seed, index])
    anatomy = dict(chest_half_width=rng.uniform(0.34, 0.39),     # midline to the lungs' outer edge
                   lung_apex=rng.uniform(0.12, 0.17),            # height of the lung tops
                   costophrenic_angle=rng.uniform(0.76, 0.82),   # height of the left lung's lowest corner
                   right_dome_rise=rng.uniform(0.015, 0.04),     # how much higher the right hemidiaphragm sits
                   dome_height=rng.uniform(0.04, 0.07),          # how far each dome bulges up
                   mediastinum_half_width=rng.uniform(0.075, 0.09),
                   cardiothoracic_ratio=rng.uniform(0.38, 0.46),  # heart width / chest width
                   scale=rng.uniform(0.9, 1.02), rotation=rng.uniform(-4, 4),  # degrees
                   shift_x=rng.uniform(-0.03, 0.03), shift_y=rng.uniform(-0.03, 0.03),
                   exposure=rng.uniform(0.9, 1.3), gamma=rng.uniform(0.85, 1.15), noise=rng.uniform(0.01, 0.03),
                   render_seed=int(rng.integers(2**31)))
    findings = []
    if rng.random() > P_NORMAL:
        conds = list(WEIGHTS)
        probabilities = np.array([WEIGHTS[cond] for cond in conds]) / sum(WEIGHTS.values())
        for cond in rng.choice(conds, rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]), replace=False, p=probabilities):
            hedge = cond in HEDGED and rng.random() < P_UNCERTAIN
            findings.append(make_finding(str(cond), rng, certain=not hedge))
    if rng.random() < P_DEVICES:
        findings.append(make_finding('Support Devices', rng))
    return dict(anatomy=anatomy, findings=findings, text_seed=int(rng.integers(2**31)),
                indication=draw_indication(findings, seed, index))


class Report:
    """A report being written: its sentences so far and the labels they state. Every
    choice is drawn from the case's text_seed, in the order the report is read."""

    def __init__(self, case):
        self.rng = np.random.default_rng(case['text_seed'])
        self.present = {finding['cond']: finding for finding in case['findings']}
        self.labels = dict.fromkeys(CONDITIONS)
        self.findings, self.impression = [], []

    def pick(self, options):
        return options[self.rng.integers(len(options))]

    def positive(self, cond):
        """Describes a present finding, hedged if it is uncertain, in the findings and the impression."""
        finding = self.present[cond]
        certain = finding['certain']
        sentences, impressions = FIND[finding['key']] if certain else HEDGED[cond]
        self.findings.append(fill(self.pick(sentences), finding['vals']))
        self.impression.append(fill(self.pick(impressions), finding['vals']))
        self.labels[cond] = 1 if certain else -1

    def negative(self, group, p=1.0):
        """With probability p, one sentence of NEGATIONS[group]; what it negates is labelled 0.
        It draws even when p is 1: every draw shifts all the later choices."""
        if self.rng.random() < p:
            sentence, negated = self.pick(NEGATIONS[group])
            self.findings.append(sentence)
            self.labels.update(dict.fromkeys(negated, 0))

    def finish(self):
        """(findings, impression, labels) after CheXpert's rules: a positive child makes
        Lung Opacity positive; No Finding when nothing but support devices is positive or
        uncertain, and then the impression says the study is normal."""
        labels = self.labels
        if any(labels[cond] in (1, -1) for cond in CONDITIONS[1:-1]):
            if any(labels[cond] == 1 for cond in OPACITY_CHILDREN):
                labels['Lung Opacity'] = 1
        else:
            labels['No Finding'] = 1
            self.impression = []
            if labels['Support Devices'] and self.rng.random() < 0.5:
                self.impression.append(self.pick(FIND['Support Devices'][1]))
            self.impression.append(self.pick(NORMAL_IMPRESSION))
        return ' '.join(self.findings), ' '.join(self.impression), [labels[cond] for cond in CONDITIONS]


def write_report(case):
    """(findings, impression, labels): the report read in the usual order (devices,
    heart and mediastinum, lungs, pleura, bones) and exactly what it says."""
    report = Report(case)
    present, labels, pick = report.present, report.labels, report.pick
    if 'Support Devices' in present:
        devices = present['Support Devices']
        for device in devices['devices']:
            report.findings.append(fill(pick(FIND[f'Support Devices/{device}'][0]), devices['vals']))
        labels['Support Devices'] = 1
    if 'Cardiomegaly' in present:
        report.positive('Cardiomegaly')
        if 'Enlarged Cardiomediastinum' in present:
            report.positive('Enlarged Cardiomediastinum')
        else:
            report.negative('mediastinum', 0.5)
    elif 'Enlarged Cardiomediastinum' in present:
        report.positive('Enlarged Cardiomediastinum')
        report.negative('heart')
    else:
        report.negative(pick(['heart', 'heart+mediastinum']))
    lung = [cond for cond in LUNG_FINDINGS if cond in present]
    for cond in lung:
        report.positive(cond)
    pleural = [cond for cond in ('Pneumothorax', 'Pleural Effusion', 'Pleural Other') if cond in present]
    if not lung and not pleural:
        report.negative('clear')
    if not lung:  # a consolidation is only denied when no opacity is described
        nothing_pleural = 'Pneumothorax' not in present and 'Pleural Effusion' not in present
        report.negative('pleura+lungs' if nothing_pleural and report.rng.random() < 0.3 else 'lungs', 0.5)
    if 'Edema' not in present:
        report.negative('edema', 0.25)
    if 'Lung Lesion' not in present:
        report.negative('lesion', 0.15)
    for cond in pleural:
        report.positive(cond)
    unsaid = [cond for cond in ('Pneumothorax', 'Pleural Effusion') if labels[cond] is None]  # not in 'pleura+lungs'
    if len(unsaid) == 2:
        report.negative('pleura')
    elif unsaid:
        report.negative('pneumothorax' if unsaid == ['Pneumothorax'] else 'effusion')
    if 'Fracture' in present:
        report.positive('Fracture')
    else:
        report.negative('bones', 0.4)
    return report.finish()


# -----------------------------------------------------------------------------
# Drawing: geometry of the upright canonical patient, in fractions of the image.
# Side -1 is the image's left (the patient's right), +1 the image's right.

def geometry(case):
    """Outlines and landmarks of the canonical patient, findings that change the
    anatomy (a big heart, a wide mediastinum) included."""
    anatomy, present = case['anatomy'], {finding['cond']: finding for finding in case['findings']}
    apex, angle = anatomy['lung_apex'], anatomy['costophrenic_angle']
    widen = present['Enlarged Cardiomediastinum']['widen'] if 'Enlarged Cardiomediastinum' in present else 1
    costophrenic = {-1: angle - anatomy['right_dome_rise'], 1: angle}  # the right hemidiaphragm sits higher
    geo = SimpleNamespace(chest_half_width=anatomy['chest_half_width'], apex=apex, costophrenic_angle=costophrenic,
                          mediastinum_half_width=anatomy['mediastinum_half_width'] * widen,
                          medial_border=0.055,  # of the lower lungs, from the midline: hidden behind the heart anyway
                          heart_top=apex + 0.36 * (costophrenic[1] - apex), heart_bottom=costophrenic[1] - 0.03,
                          carina=apex + 0.2, lateral_wall={}, dome={}, lungs={})
    for side in (-1, 1):
        geo.lateral_wall[side], geo.dome[side], geo.lungs[side] = lung_outline(geo, side, anatomy['dome_height'])
    # the heart: wider on the patient's left (image right), its bottom cut by the diaphragm
    cardiomegaly = present.get('Cardiomegaly')
    ratio = cardiomegaly['cardiothoracic_ratio'] if cardiomegaly else anatomy['cardiothoracic_ratio']
    width, top, bottom = ratio * 2 * geo.chest_half_width, geo.heart_top, geo.heart_bottom
    x0, x1 = 0.5 - 0.36 * width, 0.5 + 0.64 * width
    ry = (bottom + 0.06 - top) / 2
    geo.heart = [((x0 + x1) / 2 + (x1 - x0) / 2 * np.cos(phi), min(top + ry + ry * np.sin(phi), bottom))
                 for phi in np.linspace(0, 2 * np.pi, 48)]
    geo.aortic_knob = (0.5 + geo.mediastinum_half_width - 0.01, apex + 0.14, 0.032)  # on the mediastinum's left
    geo.hila = {side: (0.5 + side * (geo.medial_border + 0.05), top + 0.02) for side in (-1, 1)}
    wall = geo.chest_half_width + 0.06  # the chest wall; the outline runs up the image-left side and down the right
    half = [(0.075, -0.3), (0.075, apex - 0.07), (wall + 0.05, apex - 0.03), (0.7, apex), (0.7, apex + 0.2),
            (wall, apex + 0.28), (wall + 0.01, angle), (wall - 0.02, 1.3)]
    geo.body = [(0.5 - x, y) for x, y in half[::-1]] + [(0.5 + x, y) for x, y in half]
    arm = [(wall + 0.045, apex + 0.27), (0.7, apex + 0.17), (0.7, 1.3), (wall + 0.07, 1.3)]
    geo.arms = [[(0.5 + side * x, y) for x, y in arm] for side in (-1, 1)]
    return geo


def lung_outline(geo, side, dome_height):
    """(lateral wall, diaphragm dome, whole outline) of one lung: down the chest wall
    from the apex to the costophrenic angle, along the dome, up the mediastinum."""
    apex, angle, mediastinum = geo.apex, geo.costophrenic_angle[side], geo.mediastinum_half_width
    medial_x, lateral_x = 0.5 + side * geo.medial_border, 0.5 + side * geo.chest_half_width
    top_x = 0.5 + side * (mediastinum + 0.35 * (geo.chest_half_width - mediastinum))  # where the lateral wall starts
    t = np.linspace(0, 1, 20)
    lateral = np.stack([top_x + (lateral_x - top_x) * np.sin(np.pi / 2 * t) ** 0.5, apex + (angle - apex) * t], 1)
    # the dome rises steeply from the lateral wall: a sharp costophrenic angle
    u, dome_medial = t[1:], angle - 0.03
    dome = np.stack([lateral_x + (medial_x - lateral_x) * u,
                     angle + (dome_medial - angle) * u - dome_height * np.sin(np.pi * u)], 1)
    medial = [(medial_x, geo.heart_top + 0.05), (0.5 + side * mediastinum, geo.heart_top - 0.03),
              (0.5 + side * mediastinum, apex + 0.07)]
    top = [(0.5 + side * mediastinum + (top_x - 0.5 - side * mediastinum) * v, apex + 0.07 * (1 - v) ** 2)
           for v in (0.3, 0.6, 0.85)]
    lateral, dome = [tuple(p) for p in lateral], [tuple(p) for p in dome]
    return lateral, dome, lateral + dome + medial + top


def transform(anatomy):
    """The forward map canonical (u, v) -> image fractions: scale, rotate, shift."""
    c, s = np.cos(np.radians(anatomy['rotation'])), np.sin(np.radians(anatomy['rotation']))
    return lambda u, v: (0.5 + anatomy['shift_x'] + anatomy['scale'] * (c * (u - 0.5) - s * (v - 0.5)),
                         0.5 + anatomy['shift_y'] + anatomy['scale'] * (s * (u - 0.5) + c * (v - 0.5)))


def corners(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]


def regions(case, geo=None):
    """Boxes [x0, y0, x1, y1] of the 6 REGIONS in image fractions, for attention checks."""
    geo = geo or geometry(case)
    to_image = transform(case['anatomy'])
    half_width, mediastinum, apex = geo.chest_half_width, geo.mediastinum_half_width, geo.apex
    dome_top = min(y for side in (-1, 1) for x, y in geo.dome[side])
    lowest = max(geo.costophrenic_angle.values())
    points = {'cardiac': geo.heart, 'left lung': geo.lungs[1], 'right lung': geo.lungs[-1],
              'mediastinum': corners(0.5 - mediastinum, apex, 0.5 + mediastinum, geo.heart_top + 0.03),
              'diaphragm': corners(0.5 - half_width, dome_top - 0.02, 0.5 + half_width, lowest + 0.03),
              'spine': corners(0.465, apex - 0.1, 0.535, lowest + 0.1)}
    boxes = {}
    for name in REGIONS:
        xy = np.array([to_image(u, v) for u, v in points[name]]).clip(0, 1)
        boxes[name] = [round(float(value), 4) for value in (*xy.min(0), *xy.max(0))]
    return boxes


class Canvas:
    """The canonical patient's canvas: PAD wider than the image on every side, so
    moving the picture shows no edges. Coordinates are fractions of the image."""

    def __init__(self, size):
        self.size, self.pixels = size, int(round(size * (1 + 2 * PAD)))
        centres = (np.arange(self.pixels) + 0.5) / size - PAD
        self.u, self.v = centres[None, :], centres[:, None]  # each pixel's x and y

    def to_pixels(self, points):
        return [((x + PAD) * self.size, (y + PAD) * self.size) for x, y in points]

    def blurred(self, image, blur):
        """An 8-bit image blurred by `blur` (a fraction of the image), as floats in [0, 1]."""
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur * self.size))
        return np.asarray(image, np.float32) / 255

    def layer(self, *shapes, blur=0.0):
        """Shapes ('poly'|'line'|'ellipse', points or (x, y, rx), value[, width or ry]) drawn and blurred; [0, 1]."""
        image = Image.new('L', (self.pixels, self.pixels))
        draw = ImageDraw.Draw(image)
        for kind, points, value, *width in shapes:
            if kind == 'poly':
                draw.polygon(self.to_pixels(points), fill=value)
            elif kind == 'line':
                line_width = max(1, int(round(width[0] * self.size)))
                draw.line(self.to_pixels(points), fill=value, width=line_width, joint='curve')
            else:
                (x, y, rx), ry = points, (width[0] if width else points[2])
                draw.ellipse(self.to_pixels([(x - rx, y - ry), (x + rx, y + ry)]), fill=value)
        return self.blurred(image, blur)


def render(case, size):
    """The radiograph of a case: (size, size) uint8, bright = dense. Density is built
    up in the canonical patient, then moved and exposed."""
    anatomy, geo, canvas = case['anatomy'], geometry(case), Canvas(size)
    present = {finding['cond']: finding for finding in case['findings']}
    rng = np.random.default_rng(anatomy['render_seed'])
    findings_rng = np.random.default_rng([anatomy['render_seed'], 1])  # findings get their own stream: noise stays put
    body = canvas.layer(('poly', geo.body, 255), *[('poly', arm, 255) for arm in geo.arms], blur=0.006)
    density = body * (0.55 + 0.5 * canvas.layer(('poly', geo.body, 255), blur=0.08))  # thicker in the middle
    lungs = {side: canvas.layer(('poly', geo.lungs[side], 255), blur=0.003) for side in (-1, 1)}
    heart = canvas.layer(('poly', geo.heart, 255), ('ellipse', geo.aortic_knob, 255), blur=0.006)
    vessels = canvas.layer(*vessel_shapes(geo, rng), blur=0.003)
    aerated, pleural_air = dict(lungs), {side: 0.0 for side in (-1, 1)}
    if 'Pneumothorax' in present:  # the lung falls away from the chest wall towards the base
        side, aerated[side], pleural_line = collapsed_lung(canvas, geo, present['Pneumothorax'], lungs)
        pleural_air[side] = lungs[side] - aerated[side]
        density += 0.3 * pleural_line * lungs[side]
    if 'Pleural Effusion' in present:
        aerated = drain_effusion(canvas, geo, present['Pleural Effusion'], lungs, aerated)
    density = draw_air_and_mediastinum(canvas, geo, density, aerated, pleural_air, heart, vessels)
    density = draw_bones(canvas, geo, density, present.get('Fracture'))
    density = density + paint_findings(present, geo, lungs, canvas, findings_rng)
    return expose(density, anatomy, size, rng)


def vessel_shapes(geo, rng):
    """Vessels fan out from the hila in five wandering segments, fading towards the periphery."""
    shapes = []
    for side in (-1, 1):
        for _ in range(12):
            theta, length, (x, y) = rng.uniform(-1.2, 1.3), rng.uniform(0.15, 0.32), geo.hila[side]
            for segment in range(5):
                theta += rng.normal(0, 0.15)
                nx, ny = x + side * np.cos(theta) * length / 5, y + np.sin(theta) * length / 5
                shapes.append(('line', [(x, y), (nx, ny)], int(230 * (1 - segment / 6)), 0.006))
                if segment == 2:  # a side branch
                    branch = (x + side * np.cos(theta + 0.5) * length / 3, y + np.sin(theta + 0.5) * length / 3)
                    shapes.append(('line', [(x, y), branch], 120, 0.004))
                x, y = nx, ny
    return shapes


def collapsed_lung(canvas, geo, finding, lungs):
    """(side, aerated lung, visceral pleural line) of a pneumothorax: the lung shrunk
    towards its medial base by the severity."""
    side = SIDE[finding['vals']['side']]
    kept = {'small': 0.9, 'moderate': 0.8, 'large': 0.66}[finding['vals']['sev']]
    ax, ay = 0.5 + side * geo.medial_border, geo.costophrenic_angle[side]

    def shrink(points):
        return [(ax + (x - ax) * kept, ay + (y - ay) * kept) for x, y in points]

    aerated = lungs[side] * canvas.layer(('poly', shrink(geo.lungs[side]), 255), blur=0.002)
    return side, aerated, canvas.layer(('line', shrink(geo.lateral_wall[side]), 255, 0.004), blur=0.002)


def drain_effusion(canvas, geo, finding, lungs, aerated):
    """The aerated lungs after an effusion: fluid fills the base, its meniscus climbing the lateral wall."""
    aerated, vals, medial = dict(aerated), finding['vals'], geo.medial_border
    lateralness = ((np.abs(canvas.u - 0.5) - medial) / (geo.chest_half_width - medial)).clip(0, 1)
    for side in ((-1, 1) if vals['bside'] == 'bilateral' else (SIDE[vals['bside']],)):
        angle = geo.costophrenic_angle[side]
        depth = {'small': 0.08, 'moderate': 0.17, 'large': 0.3}[vals['sev']] * (angle - geo.apex)
        fluid = (canvas.v > angle - depth - (0.4 * depth + 0.02) * lateralness ** 2) * lungs[side]
        fluid = canvas.blurred(Image.fromarray((fluid * 255).astype(np.uint8)), 0.012)
        aerated[side] = aerated[side] * (1 - fluid)
    return aerated


def draw_air_and_mediastinum(canvas, geo, density, aerated, pleural_air, heart, vessels):
    """Air darkens the lungs outside the heart, vessels show where there is air; then
    the hila, the airways and the gastric bubble."""
    air = sum(aerated.values()) + 1.2 * sum(pleural_air.values())
    base = ((canvas.v - geo.apex) / (max(geo.costophrenic_angle.values()) - geo.apex)).clip(0, 1)
    density = density - 0.82 * air * (1 - heart) * (1.05 - 0.15 * base)  # bases carry more tissue
    density = density + 0.12 * heart + 0.22 * vessels * sum(aerated.values()) * (1 - heart)
    hila = canvas.layer(*[('ellipse', (x, y, 0.035), 255, 0.045) for x, y in geo.hila.values()], blur=0.02)
    density = density + 0.15 * hila
    airways = canvas.layer(('line', [(0.5, -0.2), (0.5, geo.carina)], 255, 0.035),  # trachea and main bronchi
                           *[('line', [(0.5, geo.carina), geo.hila[side]], 255, 0.02) for side in (-1, 1)], blur=0.006)
    density = density - 0.3 * airways * (1 - heart)
    bubble = ('ellipse', (0.5 + 0.22, geo.costophrenic_angle[1] + 0.06, 0.05), 255, 0.03)  # gastric
    return density - 0.3 * canvas.layer(bubble, blur=0.01)


def draw_bones(canvas, geo, density, fracture):
    """Spine, posterior ribs (bright) and anterior ribs (faint), clavicles."""
    spine = [('poly', [(0.47, -0.3), (0.53, -0.3), (0.53, 1.3), (0.47, 1.3)], 110)]
    spine += [('poly', [(0.465, y), (0.535, y), (0.535, y + 0.04), (0.465, y + 0.04)], 255)
              for y in np.arange(-0.3, 1.3, 0.05)]
    density = density + 0.2 * canvas.layer(*spine, blur=0.003)
    posterior, anterior = rib_shapes(geo, fracture)
    density = density + 0.22 * canvas.layer(*posterior, blur=0.003) + 0.08 * canvas.layer(*anterior, blur=0.005)
    clavicle = [(0.04, 0.045), (0.12, 0.01), (0.22, -0.01), (geo.chest_half_width + 0.08, -0.045)]
    clavicles = [('line', [(0.5 + side * x, geo.apex + y) for x, y in clavicle], 255, 0.022) for side in (-1, 1)]
    return density + 0.35 * canvas.layer(*clavicles, blur=0.003)


def rib_shapes(geo, fracture):
    """(posterior, anterior) rib lines, ten a side; a fractured posterior rib is broken
    and, when displaced (certain), its outer part steps down."""
    apex, half_width = geo.apex, geo.chest_half_width
    broken = (SIDE[fracture['vals']['side']], FILL['rib'].index(fracture['vals']['rib']) + 4) if fracture else None
    posterior, anterior = [], []
    for side in (-1, 1):
        for rib in range(10):
            y0, t = apex - 0.02 + rib * 0.085 * (geo.costophrenic_angle[side] - apex), np.linspace(0, 1, 16)
            x = 0.5 + side * (0.035 + (half_width + 0.01 - 0.035) * t)
            y = y0 - 0.04 * np.sin(np.pi * t) + 0.13 * t ** 2
            points = list(zip(x, y))
            if (side, rib) == broken:
                step = 0.02 if fracture['certain'] else 0.0
                posterior += [('line', points[:9], 255, 0.02),
                              ('line', [(px, py + step) for px, py in points[12:]], 255, 0.02)]
            else:
                posterior.append(('line', points, 255, 0.02))
            t = np.linspace(0, 1, 8)
            front = list(zip(x[-1] - side * (half_width - 0.12) * t, y[-1] + 0.12 * t + 0.02 * np.sin(np.pi * t)))
            anterior.append(('line', front, 255, 0.016))
    return posterior, anterior


def expose(density, anatomy, size, rng):
    """Moves the canonical picture by one affine transform, then density -> brightness
    through the exposure, the film's gamma and its grain."""
    c, s, k = np.cos(np.radians(anatomy['rotation'])), np.sin(np.radians(anatomy['rotation'])), 1 / anatomy['scale']
    ox, oy, o = size * (0.5 + anatomy['shift_x']), size * (0.5 + anatomy['shift_y']), size * (0.5 + PAD)
    coeffs = (c * k, s * k, o - k * (c * ox + s * oy), -s * k, c * k, o - k * (-s * ox + c * oy))  # output -> canvas
    canonical = Image.fromarray(density.astype(np.float32), 'F')
    moved = canonical.transform((size, size), Image.AFFINE, coeffs, Image.BILINEAR)
    density, exposure = np.asarray(moved), anatomy['exposure']
    image = ((1 - np.exp(-exposure * density.clip(0))) / (1 - np.exp(-exposure * 2.2))).clip(0, 1) ** anatomy['gamma']
    image = image + anatomy['noise'] * rng.standard_normal((size, size), dtype=np.float32)
    return (image.clip(0, 1) * 255 + 0.5).astype(np.uint8)


# Findings painted as extra density, one function each: (finding, geo, lungs, canvas, rng) -> density.
# The others change the anatomy (geometry), the pleura (render) or the ribs (rib_shapes).

def lung_point(geo, side, fx, fy):
    """(side, x, y) of a point in a lung: fx from the medial border to the lateral wall, fy from apex to base."""
    side = side if isinstance(side, int) else SIDE[side]
    return (side, 0.5 + side * (geo.medial_border + (geo.chest_half_width - geo.medial_border) * fx),
            geo.apex + (geo.costophrenic_angle[side] - geo.apex) * fy)


def blobs(rng, x, y, n, radius, spread):
    """n ellipses scattered around (x, y): a patchy opacity."""
    return [('ellipse', (x + rng.normal(0, spread), y + rng.normal(0, spread), radius * rng.uniform(0.6, 1.2)), 255)
            for _ in range(n)]


def paint_consolidation(finding, geo, lungs, canvas, rng):
    side, x, y = lung_point(geo, *LOBES[finding['vals']['lobe']])
    return 0.6 * canvas.layer(*blobs(rng, x, y, 4, 0.09, 0.03), blur=0.02) * lungs[side]


def paint_pneumonia(finding, geo, lungs, canvas, rng):
    side, x, y = lung_point(geo, *LOBES[finding['vals']['lobe']])
    return 0.45 * canvas.layer(*blobs(rng, x, y, 10, 0.04, 0.05), blur=0.02) * lungs[side]


def paint_lung_opacity(finding, geo, lungs, canvas, rng):
    side, x, y = lung_point(geo, finding['vals']['side'], 0.55, ZONE[finding['vals']['zone']])
    return 0.35 * canvas.layer(*blobs(rng, x, y, 7, 0.035, 0.05), blur=0.015) * lungs[side]


def paint_lung_lesion(finding, geo, lungs, canvas, rng):
    """A round nodule, or a lobulated mass (over 3 cm)."""
    side, x, y = lung_point(geo, *LOBES[finding['vals']['lobe']])
    radius = finding['size_cm'] * 0.0135
    shapes = [('ellipse', (x, y, radius), 255)]
    if finding['size_cm'] > 3:
        shapes += blobs(rng, x, y, 3, radius * 0.7, radius * 0.4)
    return 0.6 * canvas.layer(*shapes, blur=0.003) * lungs[side]


def paint_edema(finding, geo, lungs, canvas, rng):
    """Perihilar haze in both lungs."""
    haze = canvas.layer(*[('ellipse', (x, y, 0.13), 255, 0.17) for x, y in geo.hila.values()], blur=0.05)
    return {'mild': 0.3, 'moderate': 0.45}[finding['vals']['esev']] * haze * (lungs[-1] + lungs[1])


def paint_atelectasis(finding, geo, lungs, canvas, rng):
    """A linear band across the lung base."""
    side, x0, y0 = lung_point(geo, finding['vals']['side'], 0.3, 0.82)
    _, x1, y1 = lung_point(geo, finding['vals']['side'], 0.9, 0.86)
    return 0.6 * canvas.layer(('line', [(x0, y0), (x1, y1)], 255, 0.024), blur=0.007) * lungs[side]


def paint_pleural_thickening(finding, geo, lungs, canvas, rng):
    """An apical cap along the lung's top."""
    side = SIDE[finding['vals']['side']]
    cap = geo.lungs[side][-3:] + geo.lateral_wall[side][:9]
    return 0.8 * canvas.layer(('line', cap, 255, 0.06), blur=0.008) * lungs[side]


def paint_support_devices(finding, geo, lungs, canvas, rng):
    """Metal and radiopaque tubes: the densest things in the picture."""
    apex, heart_top, stomach, shapes = geo.apex, geo.heart_top, geo.costophrenic_angle[1], []
    for device in finding['devices']:
        if device == 'ett':  # down the trachea, the tip k cm above the carina
            shapes.append(('line', [(0.5, -0.3), (0.5, geo.carina - 0.012 * int(finding['vals']['k']))], 200, 0.014))
        elif device == 'ng':  # down the oesophagus into the stomach
            path = [(0.49, -0.3), (0.49, stomach - 0.05), (0.55, stomach + 0.05), (0.68, stomach + 0.08)]
            shapes.append(('line', path, 255, 0.008))
        elif device == 'cvc':  # from the internal jugular vein to the SVC
            side = SIDE[finding['vals']['side']]
            shapes.append(('line', [(0.5 + side * 0.1, -0.3), (0.5 + side * 0.07, apex + 0.05),
                                    (0.5 + side * 0.03, apex + 0.15), (0.47, heart_top)], 255, 0.008))
        else:  # a pacemaker: its box in the left chest wall, leads to the right atrium and the right ventricle
            wall = 0.5 + geo.chest_half_width
            x0, y0, x1, y1 = wall - 0.1, apex + 0.02, wall - 0.01, apex + 0.08
            shapes += [('poly', [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], 255),
                       ('line', [(x0, y1), (0.46, apex + 0.15), (0.47, heart_top + 0.05)], 255, 0.006),
                       ('line', [(x0, y1), (0.5, heart_top), (0.55, geo.heart_bottom - 0.05)], 255, 0.006)]
    return 1.2 * canvas.layer(*shapes, blur=0.002)


PAINT = {'Lung Opacity': paint_lung_opacity, 'Lung Lesion': paint_lung_lesion, 'Edema': paint_edema,
         'Consolidation': paint_consolidation, 'Pneumonia': paint_pneumonia, 'Atelectasis': paint_atelectasis,
         'Pleural Other': paint_pleural_thickening, 'Support Devices': paint_support_devices}


def paint_findings(present, geo, lungs, canvas, rng):
    """The extra density of the findings in PAINT, in the case's order (which fixes the rng draws)."""
    density = 0.0
    for cond, finding in present.items():
        if cond in PAINT:
            density = density + PAINT[cond](finding, geo, lungs, canvas, rng)
    return density


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

    def word_counts(texts):
        return Counter(word for text in texts for word, _ in pre.pre_tokenize_str(text))

    vocab = {'<pad>': 0, '</s>': 1, '<unk>': 2}  # T5's ids: pad is also the decoder start
    for word, _ in sorted(word_counts(reports).items(), key=lambda kv: (-kv[1], kv[0])):  # ties sorted: same ids
        vocab.setdefault(word, len(vocab))
    for word in sorted(word_counts(lexicon())):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer, tok.decoder = pre, decoders.Metaspace()
    tok.add_special_tokens(['<pad>', '</s>', '<unk>'])
    return tok


SHORT = dict(zip(CONDITIONS, ['normal', 'wide mediast', 'cardiomeg', 'opacity', 'lesion', 'edema', 'consolid',
                              'pneumonia', 'atelect', 'PTX', 'effusion', 'pl thick', 'fracture', 'devices']))


def write_preview(path, root, records, thumb=160, grid=4):
    """A grid of thumbnails, the first positive of each condition first, captioned with their labels."""
    picks = [next((record for record in records if record['labels'][i] == 1), None) for i in range(1, len(CONDITIONS))]
    picks = [record for record in picks if record] + [record for record in records if record['labels'][0] == 1]
    picks = list({record['id']: record for record in picks + records}.values())[:grid * grid]
    sheet, font = Image.new('L', (grid * thumb, grid * (thumb + 24)), 255), ImageFont.load_default()
    draw = ImageDraw.Draw(sheet)
    for position, record in enumerate(picks):
        x, y = position % grid * thumb, position // grid * (thumb + 24)
        sheet.paste(Image.open(os.path.join(root, record['image'])).resize((thumb, thumb), Image.BILINEAR), (x, y))
        said = [(cond, label) for cond, label in zip(CONDITIONS, record['labels']) if label in (1, -1)]
        caption = ', '.join(SHORT[cond] + ('?' if label == -1 else '') for cond, label in said)
        for row, line in enumerate(textwrap.wrap(caption, 30)[:2]):
            draw.text((x + 2, y + thumb + 1 + 11 * row), line, fill=0, font=font)
    sheet.save(path)


def check_params(n_train, n_val, n_test, image_size, seed):
    for key, value, low in (('n_train', n_train, 1), ('n_val', n_val, 0), ('n_test', n_test, 0),
                            ('image_size', image_size, 64)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (key == 'image_size' and value > 512):
            limit = 'an int in [64, 512]' if key == 'image_size' else f'an int >= {low}'
            raise ValueError(f"phantom: {key} must be {limit}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"phantom: seed must be an int >= 0, got {seed!r}")
    return dict(n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed)


def read_manifest(data_dir):
    """The manifest of a complete phantom set in data_dir (this generator version), else None."""
    try:
        with open(os.path.join(data_dir, 'manifest.json')) as file:
            manifest = json.load(file)
        files = ['train.jsonl', 'val.jsonl', 'test.jsonl', 'tokenizer.json']
        if (manifest.get('dataset') == 'phantom' and manifest.get('generator_version') == VERSION
                and len(os.listdir(os.path.join(data_dir, 'images'))) == sum(manifest['counts'].values())
                and all(os.path.exists(os.path.join(data_dir, name)) for name in files)):
            return manifest
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def refuse_to_overwrite(data_dir):
    """Raises unless data_dir is missing, empty or an earlier phantom set: a prepared
    real dataset is never replaced."""
    try:
        with open(os.path.join(data_dir, 'manifest.json')) as file:
            ours = json.load(file).get('dataset') == 'phantom'
    except (OSError, ValueError, AttributeError):
        ours = os.path.isdir(data_dir) and not os.listdir(data_dir) or not os.path.exists(data_dir)
    if not ours:
        raise ValueError(f"phantom: {data_dir} exists and is not a phantom set (no manifest.json saying "
                         f"dataset 'phantom'); refusing to overwrite it, choose another data_dir")


def label_counts(records, value):
    return {cond: sum(record['labels'][i] == value for record in records) for i, cond in enumerate(CONDITIONS)}


def make_manifest(params, splits, vocab_size):
    """What manifest.json says: the parameters, the files, how often each label occurs."""
    records = [record for split in splits.values() for record in split]
    prevalence = {name: {cond: round(positives / max(1, len(split)), 4) for cond, positives in
                         label_counts(split, 1).items()} for name, split in splits.items()}
    tally = {name: label_counts(records, value)
             for name, value in (('positive', 1), ('negative', 0), ('uncertain', -1), ('blank', None))}
    return dict(dataset='phantom', generator_version=VERSION, params=params, image_size=params['image_size'],
                seed=params['seed'], counts={name: len(split) for name, split in splits.items()}, dropped={},
                conditions=list(CONDITIONS), regions=list(REGIONS), prevalence=prevalence, label_counts=tally,
                vocab_size=vocab_size, label_source='phantom generator',
                files=['train.jsonl', 'val.jsonl', 'test.jsonl', 'images/', 'tokenizer.json', 'preview.png',
                       'manifest.json'])


def generate(data_dir, n_train=3000, n_val=300, n_test=300, image_size=128, seed=1337, workers=None, force=False):
    """Writes the phantom dataset to data_dir, unless it already holds this exact set
    (force=True regenerates). Returns the manifest."""
    params, data_dir = check_params(n_train, n_val, n_test, image_size, seed), os.path.normpath(data_dir)
    manifest = read_manifest(data_dir)
    if manifest and manifest['params'] == params and not force:
        print(f"phantom: {data_dir} already holds this set, not regenerating")
        return manifest
    refuse_to_overwrite(data_dir)
    tmp = data_dir + '.tmp'  # built next to it and swapped in at the end: an interrupted run never looks complete
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, 'images'))
    n, workers = n_train + n_val + n_test, max(1, workers or os.cpu_count() or 1)
    jobs, t0 = [(tmp, index, seed, image_size) for index in range(n)], time.time()
    if workers > 1:
        with Pool(workers) as pool:  # ordered results: the files do not depend on the worker count
            records = pool.map(make_record, jobs, chunksize=max(1, n // (8 * workers)))
    else:
        records = [make_record(job) for job in jobs]
    seconds = time.time() - t0
    print(f"phantom: {n} images of {image_size} px in {seconds:.1f}s ({n / seconds:.0f} images/s, {workers} workers)")
    splits = dict(train=records[:n_train], val=records[n_train:n_train + n_val], test=records[n_train + n_val:])
    for name, split in splits.items():
        with open(os.path.join(tmp, f'{name}.jsonl'), 'w') as file:
            file.writelines(json.dumps(record) + '\n' for record in split)
    tok = build_tokenizer([record['report'] for record in splits['train']])
    tok.save(os.path.join(tmp, 'tokenizer.json'))
    write_preview(os.path.join(tmp, 'preview.png'), tmp, splits['train'])
    manifest = make_manifest(params, splits, tok.get_vocab_size())
    with open(os.path.join(tmp, 'manifest.json'), 'w') as file:
        json.dump(manifest, file, indent=1)
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
    given = {key: value for key, value in params.items() if value is not None}
    manifest = read_manifest(data_dir)
    if manifest and all(manifest['params'].get(key) == value for key, value in given.items()):
        return manifest
    return generate(data_dir, workers=workers, force=True, **given)


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    generate(data_dir, n_train, n_val, n_test, image_size, seed, workers, force)
