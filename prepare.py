"""
Preparing the raw datasets: a download in, the prepared directory that data.py's
ReportDataset reads out, whichever dataset made it.

    python prepare.py --dataset=phantom   --data_dir=data/phantom             # built in, nothing downloaded
    python prepare.py --dataset=iu_xray   --data_dir=data/iu_xray   --src=RAW # Kaggle "chest-xrays-indiana-university"
    python prepare.py --dataset=mimic_cxr --data_dir=data/mimic_cxr --src=RAW # MIMIC-CXR-JPG 2.0.0 + mimic-cxr-reports
    python prepare.py --dataset=iu_xray ... --split_file=annotation.json      # R2Gen's split (either dataset)
    python prepare.py --dataset=iu_xray ... --split_file=annotation.json --references=annotation  # and its text

Each writes a prepared directory: train/val/test.jsonl (one record per frontal image: id,
uid, image, findings, impression, report, indication, labels, label_source), resized image
copies under images_<short_side>/ and a manifest.json.
"""
import csv
import gzip
import hashlib
import json
import os
import re
import sys
from collections import Counter
from multiprocessing import Pool
from types import SimpleNamespace

from chexpert import CONDITIONS
from data import DICOM_EXTENSIONS, path_problem, resize_copy

# -----------------------------------------------------------------------------
dataset = 'phantom'           # 'phantom' | 'iu_xray' | 'mimic_cxr'
data_dir = 'data/phantom'     # where the prepared splits go
src = ''                      # the raw download (iu_xray, mimic_cxr)
seed = 1337                   # the IU X-ray patient split's seed
short_side = 448              # resized copies: shorter side in px (never upscaled)
workers = 0                   # processes for resizing / generating; 0 = every core
split_file = ''               # iu_xray, mimic_cxr: the split of an R2Gen-format annotation.json instead
references = 'ours'           # with split_file: 'ours' (cleaned Findings and Impression) | 'annotation' (its text)
# -----------------------------------------------------------------------------
IU_REPORT_COLUMNS = ('uid', 'findings', 'impression', 'indication')
IU_PROJECTION_COLUMNS = ('uid', 'filename', 'projection')


# --- shared steps --------------------------------------------------------------
def read_csv(path, columns):
    """Rows of a CSV (or .csv.gz) as dicts, after checking it has the given columns."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with (gzip.open(path, 'rt', newline='') if path.endswith('.gz') else open(path, newline='')) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path} is empty (no header row)")
        missing = [c for c in columns if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path} is missing columns {missing} (has {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return rows


def clean_text(text):
    """IU X-ray's cleaning: strip; fix sentence spacing ('lesion.There' -> 'lesion. There');
    drop every sentence holding the de-identification marker XXXX (whole sentence: a
    'XXXX' token left in or replaced would teach the model to write it); normalize spaces."""
    text = re.sub(r'\s+', ' ', (text or '').strip())
    text = re.sub(r'([a-z0-9)])([.!?])([A-Z])', r'\1\2 \3', text)  # also '2.No' in numbered lists
    sentences = re.split(r'(?<=[.!?])\s+', text)
    return ' '.join(s for s in sentences if s and 'XXXX' not in s.upper()).strip()


def make_report(findings, impression):
    return f"Findings: {findings} | Impression: {impression}"


def patient_split(uids, seed, fractions=(0.7, 0.15, 0.15)):
    """{uid: 'train'|'val'|'test'}: uids sorted by sha256(seed:uid), then cut 70/15/15.
    Depends only on the uid strings and the seed, so it is the same on any machine and
    version, and all images of one patient land in one split."""
    order = sorted(set(uids), key=lambda u: hashlib.sha256(f'{seed}:{u}'.encode()).hexdigest())
    n_train, n_val = round(fractions[0] * len(order)), round(fractions[1] * len(order))
    return {u: 'train' if i < n_train else 'val' if i < n_train + n_val else 'test' for i, u in enumerate(order)}


def write_prepared(out_dir, splits, manifest, jobs, n_workers):
    """Resizes the images in parallel, drops records whose image failed (naming each file),
    and writes the split files and the manifest."""
    n_workers = n_workers or os.cpu_count() or 1
    if n_workers > 1 and len(jobs) > 1:
        with Pool(n_workers) as pool:
            errors = pool.map(resize_copy, jobs, chunksize=max(1, len(jobs) // (16 * n_workers)))
    else:
        errors = [resize_copy(j) for j in jobs]
    bad = {os.path.relpath(dest, out_dir): e for (_, dest, _), e in zip(jobs, errors) if e}
    for e in list(bad.values())[:20]:
        print(f"  image problem: {e}")
    if len(bad) > 20:
        print(f"  ... and {len(bad) - 20} more image problems")
    for name in splits:
        kept = [r for r in splits[name] if r['image'] not in bad]
        manifest['dropped'][f'{name}: image missing or unreadable'] = len(splits[name]) - len(kept)
        splits[name] = kept
        with open(os.path.join(out_dir, f'{name}.jsonl'), 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
    manifest['counts'] = {k: len(v) for k, v in splits.items()}
    manifest['patients'] = {k: len({r['uid'] for r in v}) for k, v in splits.items()}
    with open(os.path.join(out_dir, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    print(f"{manifest['dataset']}: {manifest['counts']} images ({manifest['patients']} patients) in {out_dir}")
    for reason, n in manifest['dropped'].items():
        print(f"  dropped {n}: {reason}")
    return manifest


# --- IU X-ray --------------------------------------------------------------------
def read_projections(projections_csv):
    """IU X-ray's projections table, each filename checked: it names the image below
    images_normalized/ and its copy's, so it must stay inside its directory."""
    rows = read_csv(projections_csv, IU_PROJECTION_COLUMNS)
    for row, p in enumerate(rows, 1):
        if path_problem(p['filename']):
            raise ValueError(f"{projections_csv}, row {row} (uid {p['uid']}): filename {path_problem(p['filename'])}")
    return rows


def iu_records(reports_csv, projections_csv, seed=1337):
    """Cleaned frontal-image records of IU X-ray with their split, before any image is touched.
    Returns ({split: [record]}, Counter of dropped reasons)."""
    from chexpert import label_report
    reports = read_csv(reports_csv, IU_REPORT_COLUMNS)
    frontal = {}
    for p in read_projections(projections_csv):
        if p['projection'].strip().lower() == 'frontal':
            frontal.setdefault(p['uid'], []).append(p['filename'])
    dropped, studies = Counter(), []
    for r in reports:
        findings, impression = clean_text(r['findings']), clean_text(r['impression'])
        if not findings and not impression:
            dropped['study: findings and impression both empty after cleaning'] += 1
        elif r['uid'] not in frontal:
            dropped['study: no frontal image'] += 1
        else:
            studies.append((r, findings, impression))
    # A study with one empty section is kept and the empty section stays empty in the
    # target ("Findings:  | Impression: ..."): copying the other section in would teach
    # the model to repeat itself, and dropping would lose a third of IU's impressions.
    split = patient_split([r['uid'] for r, _, _ in studies], seed)
    out = {'train': [], 'val': [], 'test': []}
    for r, findings, impression in studies:
        labels = label_report(f"{findings} {impression}")
        for name in sorted(frontal[r['uid']]):
            out[split[r['uid']]].append(dict(
                id=os.path.splitext(name)[0], uid=r['uid'], image=name, findings=findings,
                impression=impression, report=make_report(findings, impression),
                indication=clean_text(r['indication']), labels=labels, label_source='rule-based labeler'))
    return out, dropped


def prepare_iu(src, out_dir, seed=1337, short_side=448, n_workers=0, split_file='', references='ours'):
    reports_csv, projections_csv = (os.path.join(src, f) for f in ('indiana_reports.csv', 'indiana_projections.csv'))
    image_dir = os.path.join(src, 'images', 'images_normalized')
    if split_file:
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{image_dir} not found: the split file's names are matched to the images there")
        splits, dropped, match = iu_r2gen_records(split_file, reports_csv, projections_csv, set(os.listdir(image_dir)),
                                                  references)
    else:
        splits, dropped = iu_records(reports_csv, projections_csv, seed)
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for recs in splits.values():
        for r in recs:
            # a DICOM source's copy is a PNG, named so: '1_IM-0001-4001.dcm' -> '1_IM-0001-4001.dcm.png'
            name, r['image'] = r['image'], f'images_{short_side}/{r["image"]}' + \
                ('.png' if r['image'].lower().endswith(DICOM_EXTENSIONS) else '')
            jobs.append((os.path.join(image_dir, name), os.path.join(out_dir, r['image']), short_side))
    manifest = dict(dataset='iu_xray', source=os.path.abspath(src), seed=seed, split='patient-level 70/15/15',
                    short_side=short_side, label_source='rule-based labeler', conditions=list(CONDITIONS),
                    one_section_empty=sum(not r['findings'] or not r['impression'] for v in splits.values() for r in v),
                    dropped=dict(dropped))
    if split_file:
        manifest.update(r2gen_manifest(split_file, references, match))
        del manifest['seed']  # the file's split: no seed involved
        if references == 'annotation':
            del manifest['one_section_empty']  # the file's text is one section
    return write_prepared(out_dir, splits, manifest, jobs, n_workers)


# --- MIMIC-CXR -------------------------------------------------------------------
def find_file(root, name):
    for candidate in (name, name + '.gz'):
        if os.path.isfile(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    raise FileNotFoundError(f"{os.path.join(root, name)}(.gz) not found: is {root} the MIMIC-CXR-JPG 2.0.0 directory?")


# A report's indication: the first non-empty of these sections, in this order.
INDICATION_SECTIONS = ('INDICATION', 'HISTORY', 'REASON FOR EXAMINATION')


def report_sections(text):
    """(findings, impression, indication) from a MIMIC-CXR free-text report's section headers
    ('FINDINGS:', 'IMPRESSION:'; the indication from INDICATION_SECTIONS), whitespace collapsed."""
    parts = re.split(r'^\s*([A-Z][A-Z /&()-]+):', text, flags=re.M)  # [preamble, header, body, header, body, ...]
    sections = {}
    for h, b in zip(parts[1::2], parts[2::2]):
        sections.setdefault(h.strip(), ' '.join(b.split()))  # a repeated header: the first one counts
    indication = next((sections[h] for h in INDICATION_SECTIONS if sections.get(h)), '')
    return sections.get('FINDINGS', ''), sections.get('IMPRESSION', ''), indication


def chexpert_value(v):
    v = (v or '').strip()
    return None if v == '' else int(float(v))


def mimic_tables(src):
    """(metadata rows, its path, {study_id: 14 labels}) of MIMIC-CXR-JPG."""
    meta_csv = find_file(src, 'mimic-cxr-2.0.0-metadata.csv')
    meta = read_csv(meta_csv, ('dicom_id', 'subject_id', 'study_id', 'ViewPosition'))
    labels = read_csv(find_file(src, 'mimic-cxr-2.0.0-chexpert.csv'), ('subject_id', 'study_id') + CONDITIONS)
    return meta, meta_csv, {r['study_id']: [chexpert_value(r[c]) for c in CONDITIONS] for r in labels}


def mimic_paths(m, meta_csv, row):
    """(image, report) paths of a metadata row, relative to the download; errors name the row."""
    p, s = f"p{m['subject_id']}", f"s{m['study_id']}"
    image = os.path.join('files', p[:3], p, s, m['dicom_id'] + '.jpg')
    report = os.path.join('files', p[:3], p, s + '.txt')
    for name in (image, report, m['dicom_id'] + '.png'):
        if path_problem(name):  # the image, its report, its resized copy
            raise ValueError(f"{meta_csv}, row {row}: the path made of subject_id, study_id and dicom_id "
                             f"{path_problem(name)}")
    return image, report


def mimic_report(src, report, cache):
    """report_sections of a study's report file (cached by path), or None when it is missing."""
    if report not in cache:
        try:
            with open(os.path.join(src, 'mimic-cxr-reports', report)) as f:
                cache[report] = report_sections(f.read())
        except OSError:
            cache[report] = None
    return cache[report]


def mimic_records(src):
    """Frontal (PA, AP) records of MIMIC-CXR-JPG with the official split and CheXpert labels."""
    meta, meta_csv, label_of = mimic_tables(src)
    splits = read_csv(find_file(src, 'mimic-cxr-2.0.0-split.csv'), ('dicom_id', 'study_id', 'subject_id', 'split'))
    split_of = {r['dicom_id']: {'validate': 'val'}.get(r['split'], r['split']) for r in splits}
    out, dropped, reports = {'train': [], 'val': [], 'test': []}, Counter(), {}
    for row, m in enumerate(meta, 1):
        if m['ViewPosition'] not in ('PA', 'AP'):
            dropped['image: not a frontal (PA/AP) view'] += 1
            continue
        image, report = mimic_paths(m, meta_csv, row)
        sections = mimic_report(src, report, reports)
        if sections is None:
            dropped['image: report file missing'] += 1
        elif not any(sections[:2]):
            dropped['image: report has neither FINDINGS nor IMPRESSION'] += 1
        elif m['study_id'] not in label_of:
            dropped['image: study has no CheXpert labels'] += 1
        elif m['dicom_id'] not in split_of:
            dropped['image: not in the official split'] += 1
        else:
            findings, impression, indication = sections
            out[split_of[m['dicom_id']]].append(dict(
                id=m['dicom_id'], uid=m['subject_id'], study=m['study_id'],
                image=image, findings=findings,
                impression=impression, report=make_report(findings, impression), indication=indication,
                labels=label_of[m['study_id']], label_source='mimic-cxr-2.0.0-chexpert.csv'))
    return out, dropped


def mimic_source(src, image):
    """The image file to read: MIMIC-CXR-JPG's .jpg, or the DICOM original (.dcm, MIMIC-CXR's
    layout) where only that is there."""
    dcm = image[:-len('.jpg')] + '.dcm'
    return dcm if not os.path.isfile(os.path.join(src, image)) and os.path.isfile(os.path.join(src, dcm)) else image


def prepare_mimic(src, out_dir, short_side=448, n_workers=0, split_file='', references='ours'):
    if split_file:
        splits, dropped, match = mimic_r2gen_records(split_file, src, references)
    else:
        splits, dropped, match = *mimic_records(src), None
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for recs in splits.values():
        for r in recs:
            name = mimic_source(src, r['image'])
            r['image'] = f'images_{short_side}/{os.path.splitext(os.path.basename(name))[0]}.png'  # dicom_id.png
            jobs.append((os.path.join(src, name), os.path.join(out_dir, r['image']), short_side))
    manifest = dict(dataset='mimic_cxr', source=os.path.abspath(src), split='official', short_side=short_side,
                    label_source='mimic-cxr-2.0.0-chexpert.csv', conditions=list(CONDITIONS), dropped=dict(dropped))
    if split_file:
        manifest.update(r2gen_manifest(split_file, references, match))
    return write_prepared(out_dir, splits, manifest, jobs, n_workers)


# --- R2Gen-format split files ---------------------------------------------------------
# Most IU X-ray and MIMIC-CXR papers since R2Gen (Chen et al. 2020) report on the splits of
# an annotation.json: {"train": [...], "val": [...], "test": [...]}, each item {"id", "report",
# "image_path": [...], ...}. These take the split (and, with references='annotation', the
# reference text) from such a file; the images, labels and indications come from the raw
# download as always. Its names are only looked up, never joined into a path.
R2GEN_SPLITS = ('train', 'val', 'test')
IMAGE_NAME_EXTENSIONS = ('.png', '.jpg', '.jpeg') + DICOM_EXTENSIONS
# An IU X-ray image name: Open-i's and R2Gen's 'CXR3321_IM-1588-1001' (also 'CXR1_1_IM-0001-4001'),
# the Kaggle release's '3321_IM-1588-1001' (and '21_IM-0729-1001-0001'), or a study alone,
# 'CXR3321_IM-1588': (uid, study, image part or None).
IU_NAME = re.compile(r'^(?:CXR)?(\d+)(?:_\d+)?_(IM-\d+)(?:-(\d+(?:-\d+)*))?$', re.I)


def read_r2gen(path, need_report=False):
    """{split: [item]} of an R2Gen-format split file, checked: JSON, the three splits, each item an
    object with 'id' and 'image_path' (a list of names; and 'report' with need_report), ids unique.
    Errors name the file, the split, the item and what is missing."""
    try:
        with open(path, encoding='utf-8') as f:
            ann = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: split file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ann, dict):
        raise ValueError(f"{path}: an R2Gen-format split file is a JSON object {{\"train\": [...], \"val\": [...], "
                         f"\"test\": [...]}}, not a {type(ann).__name__}")
    missing = [s for s in R2GEN_SPLITS if s not in ann]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(repr(s) for s in missing)} split (it has {sorted(ann)}); an "
                         f"R2Gen-format file has 'train', 'val' and 'test'")
    required = ('id', 'image_path') + (('report',) if need_report else ())
    seen = {}
    for split in R2GEN_SPLITS:
        if not isinstance(ann[split], list):
            raise ValueError(f"{path}: {split!r} must be a list of items, not a {type(ann[split]).__name__}")
        for i, item in enumerate(ann[split]):
            where = f"{path}: {split} item {i}"
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be a JSON object, not a {type(item).__name__}")
            where += f" (id {item['id']!r})" if 'id' in item else ''
            lacking = [k for k in required if k not in item]
            if lacking:
                raise ValueError(f"{where} lacks {' and '.join(repr(k) for k in lacking)} (each item needs "
                                 f"{', '.join(required)})")
            names = item['image_path']
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{where}: 'image_path' must be a list of file names, not {names!r}")
            if need_report and not isinstance(item['report'], str):
                raise ValueError(f"{where}: 'report' must be text, not {item['report']!r}")
            key = str(item['id'])
            if key in seen:
                raise ValueError(f"{where}: the id {key!r} is also {seen[key]}'s")
            seen[key] = f"{split} item {i}"
    return {s: ann[s] for s in R2GEN_SPLITS}


def strip_extensions(name):
    """'3321_IM-1588-1001.dcm.png' -> '3321_IM-1588-1001'."""
    while name.lower().endswith(IMAGE_NAME_EXTENSIONS):
        name = os.path.splitext(name)[0]
    return name


def iu_name_key(name):
    """(uid, study, image part or None) of an IU X-ray image name in any of its forms, or None:
    'CXR3321_IM-1588-1001.png', '3321_IM-1588-1001.dcm.png', or R2Gen's folder form
    'CXR3321_IM-1588/0.png', which names the study only (image part None)."""
    parts = name.replace('\\', '/').strip('/').split('/')
    for i, part in enumerate((strip_extensions(parts[-1]), parts[-2] if len(parts) > 1 else '')):
        m = IU_NAME.match(part)
        if m and (i == 0 or not m.group(3)):
            return m.group(1), m.group(2).upper(), m.group(3)
    return None


def r2gen_reference(item, split, dropped):
    """(findings, impression) from an item's report text (references='annotation'), or None."""
    text = ' '.join(item['report'].split())
    if not text:
        dropped[f"{split}: the split file's report is empty"] += 1
        return None
    return text, ''


def r2gen_record(item, findings, impression, references, **fields):
    """A record of an R2Gen item: the item's id, its reference (the file's text as a Findings
    section alone, or ours: make_report), and the dataset's fields."""
    report = f"Findings: {findings}" if references == 'annotation' else make_report(findings, impression)
    return dict(id=str(item['id']), findings=findings, impression=impression, report=report, **fields)


def r2gen_tally(ann):
    """({split: records}, Counter of dropped reasons, {split: match counts}, {split: names of unmatched items})."""
    return ({s: [] for s in R2GEN_SPLITS}, Counter(),
            {s: {'items': len(ann[s]), 'matched': 0, 'no frontal image': 0, 'no file': 0} for s in R2GEN_SPLITS},
            {s: [] for s in R2GEN_SPLITS})


def r2gen_check(split_file, ann, match, examples, where, forms):
    """A clear error where a split matched no item, instead of an empty split."""
    for split, c in match.items():
        if c['items'] and not c['matched']:
            raise ValueError(f"{split_file}: none of the {c['items']} {split} items has a frontal image in {where} "
                             f"({c['no file']} name no file there, {c['no frontal image']} no frontal one; e.g. "
                             f"{examples[split][:3]}). Expected names like {forms}")


def r2gen_claim(split_file, claimed, things, split, i, item):
    """Records that item i of split holds `things` (its images, its study); raises ValueError naming
    both items when another split's item holds one of them: that study would be in two splits, a
    leak. Twice within one split is left as it is."""
    for thing in things:
        other = claimed.setdefault(thing, (split, i, item['id']))
        if other[0] != split:
            raise ValueError(f"{split_file}: {split} item {i} (id {item['id']!r}) and {other[0]} item {other[1]} "
                             f"(id {other[2]!r}) hold the same {thing[0]} {thing[1]!r}: a study in two splits "
                             f"leaks from training into evaluation. Keep it in one split")


def iu_r2gen_records(split_file, reports_csv, projections_csv, files=None, references='ours'):
    """IU X-ray records on the split of an R2Gen-format file: per item, its names matched to the
    download's files (files: the names present on disk; None: the projections table's, unchecked),
    the first frontal one its image (one record per item, as papers score them). An image or a
    uid in two splits is an error (r2gen_claim). Returns
    ({split: [record]}, Counter of dropped reasons, {split: {items, matched, no frontal image, no file}})."""
    from chexpert import label_report
    ann = read_r2gen(split_file, need_report=references == 'annotation')
    reports = {r['uid']: r for r in read_csv(reports_csv, IU_REPORT_COLUMNS)}
    projection, exact, study = {}, {}, {}
    for p in read_projections(projections_csv):
        name, key = p['filename'], iu_name_key(p['filename'])
        if key is None or (files is not None and name not in files):
            continue
        projection[name] = (p['uid'], p['projection'].strip().lower())
        exact.setdefault(key, name)
        study.setdefault(key[:2], []).append(name)

    def found(item):
        """The download's files an item's names match, in its order: an image's name that image,
        a study's name (R2Gen's folder form) all of the study's images."""
        names = []
        for key in map(iu_name_key, item['image_path']):
            if key and key[2]:
                names += [exact[key]] if key in exact else []
            elif key:
                names += sorted(study.get(key[:2], []))
        return list(dict.fromkeys(names))

    out, dropped, match, examples = r2gen_tally(ann)
    claimed = {}
    for split, items in ann.items():
        for i, item in enumerate(items):
            names = found(item)
            r2gen_claim(split_file, claimed, [('image', n) for n in names] +
                        [('IU study (uid)', projection[n][0]) for n in names], split, i, item)
            frontal = [n for n in names if projection[n][1] == 'frontal']
            if not frontal:
                match[split]['no frontal image' if names else 'no file'] += 1
                examples[split] += item['image_path'][:1]
                continue
            match[split]['matched'] += 1
            uid = projection[frontal[0]][0]
            row = reports.get(uid)
            if references == 'annotation':
                sections = r2gen_reference(item, split, dropped)
            elif row is None:
                dropped[f'{split}: no row in indiana_reports.csv for its uid'] += 1
                sections = None
            else:
                sections = clean_text(row['findings']), clean_text(row['impression'])
                if not any(sections):
                    dropped[f'{split}: findings and impression both empty after cleaning'] += 1
                    sections = None
            if sections is None:
                continue
            out[split].append(r2gen_record(
                item, *sections, references, uid=uid, image=frontal[0],
                indication=clean_text(row['indication']) if row else '', labels=label_report(' '.join(sections)),
                label_source='rule-based labeler'))
    r2gen_check(split_file, ann, match, examples, os.path.dirname(projections_csv) or '.',
                "CXR3321_IM-1588-1001.png or CXR3321_IM-1588/0.png (the Kaggle release's 3321_IM-1588-1001.dcm.png)")
    return out, dropped, match


def mimic_r2gen_records(split_file, src, references='ours', check_files=True):
    """MIMIC-CXR records on the split of an R2Gen-format file (names 'p10/p10000032/s50414267/
    <dicom_id>.jpg'): per item, its dicom_ids found in the metadata (and on disk, .jpg or .dcm,
    with check_files), the first PA or AP one its image; the official CheXpert labels, our
    sections or the file's text. An image or a study in two splits is an error. Returns what
    iu_r2gen_records does."""
    ann = read_r2gen(split_file, need_report=references == 'annotation')
    meta, meta_csv, label_of = mimic_tables(src)
    rows = {m['dicom_id']: (row, m) for row, m in enumerate(meta, 1)}
    (out, dropped, match, examples), reports, claimed = r2gen_tally(ann), {}, {}
    for split, items in ann.items():
        for i, item in enumerate(items):
            found = []
            for name in item['image_path']:
                dicom_id = strip_extensions(name.replace('\\', '/').split('/')[-1])
                if dicom_id in rows:
                    image, report = mimic_paths(rows[dicom_id][1], meta_csv, rows[dicom_id][0])
                    if not check_files or os.path.isfile(os.path.join(src, mimic_source(src, image))):
                        found.append((rows[dicom_id][1], image, report))
            r2gen_claim(split_file, claimed, [('image', m['dicom_id']) for m, _, _ in found] +
                        [('MIMIC-CXR study', m['study_id']) for m, _, _ in found], split, i, item)
            frontal = [f for f in found if f[0]['ViewPosition'] in ('PA', 'AP')]
            if not frontal:
                match[split]['no frontal image' if found else 'no file'] += 1
                examples[split] += item['image_path'][:1]
                continue
            match[split]['matched'] += 1
            m, image, report = frontal[0]
            sections = mimic_report(src, report, reports)
            if references == 'annotation':
                reference = r2gen_reference(item, split, dropped)
            elif sections is None:
                dropped[f'{split}: report file missing'] += 1
                reference = None
            elif not any(sections[:2]):
                dropped[f'{split}: report has neither FINDINGS nor IMPRESSION'] += 1
                reference = None
            else:
                reference = sections[:2]
            if reference is not None and m['study_id'] not in label_of:
                dropped[f'{split}: study has no CheXpert labels'] += 1
                reference = None
            if reference is None:
                continue
            out[split].append(r2gen_record(
                item, *reference, references, uid=m['subject_id'], study=m['study_id'], image=image,
                indication=sections[2] if sections else '', labels=label_of[m['study_id']],
                label_source='mimic-cxr-2.0.0-chexpert.csv'))
    r2gen_check(split_file, ann, match, examples, src, "p10/p10000032/s50414267/<dicom_id>.jpg")
    return out, dropped, match


def r2gen_manifest(split_file, references, match):
    """What the manifest records of an R2Gen-format split, and prints its match counts."""
    with open(split_file, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    for split, c in match.items():
        print(f"{os.path.basename(split_file)} {split}: {c['items']} items, {c['matched']} matched, "
              f"{c['no frontal image']} with no frontal image, {c['no file']} with no file at all")
    return dict(split=f'R2Gen-format split file {os.path.basename(split_file)}', split_file=os.path.abspath(split_file),
                split_file_sha256=digest, references=references, r2gen_match=match)


def main(argv):
    """The command line: argv's --key=value settings over the defaults above, read into a copy,
    so each call in one process (a test's) starts from the defaults."""
    from configurator import configure
    c = SimpleNamespace(**configure({k: globals()[k] for k in ('dataset', 'data_dir', 'src', 'seed', 'short_side',
                                                               'workers', 'split_file', 'references')}, argv))
    if c.workers < 0 or c.short_side < 1:
        sys.exit(f"need workers >= 0 (0: every core) and short_side >= 1, got workers={c.workers}, "
                 f"short_side={c.short_side}")
    if c.dataset == 'phantom':
        import phantom
        phantom.generate(c.data_dir, workers=c.workers or None)
    elif c.dataset in ('iu_xray', 'mimic_cxr'):
        if not c.src:
            sys.exit(f"--src=DIR is required for {c.dataset}: the raw download's directory")
        if c.references not in ('ours', 'annotation') or (c.references == 'annotation' and not c.split_file):
            sys.exit(f"references must be 'ours' or 'annotation' (the text of --split_file), got "
                     f"references={c.references!r}" + ('' if c.split_file else ' without a split_file'))
        if c.dataset == 'iu_xray':
            prepare_iu(c.src, c.data_dir, c.seed, c.short_side, c.workers, c.split_file, c.references)
        else:
            prepare_mimic(c.src, c.data_dir, c.short_side, c.workers, c.split_file, c.references)
    else:
        sys.exit(f"unknown dataset {c.dataset!r}: choose 'phantom', 'iu_xray' or 'mimic_cxr'")


if __name__ == '__main__':
    main(sys.argv[1:])
