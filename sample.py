"""
Writes reports for chest X-rays with a trained checkpoint:

    python sample.py --out_dir=out-smoke --images=path/to/image_or_dir
    python sample.py --out_dir=out-smoke --images=xray.png --json
    python sample.py --out_dir=out-smoke --images=xray.png --attention_dir=attn   # "visualize"

For each image: the report "Findings: ... | Impression: ...", and the aux
head's 14 CheXpert probabilities, sorted, with the threshold. With
attention_dir, a PNG grid of the 20 queries' cross-attention maps over the
X-ray (14 conditions, 6 regions, each labelled) and the gate value, named
after the image with its extension (xray.png_attention.png; see grid_path).
"""
import hashlib
import itertools
import json as jsonlib
import os
import sys

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import data
import hardware
from chexpert import CONDITIONS
from checkpoint import decision_thresholds, load_checkpoint
from chexquery import GENERATION
from heatmaps import attention_grid
from metrics import decide

# -----------------------------------------------------------------------------
out_dir = 'out'               # holds ckpt.safetensors
ckpt = ''                     # a specific checkpoint file instead of out_dir/ckpt.safetensors
images = ''                   # an image file or a directory of them (PNG, JPEG)
batch_size = 8
threshold = 0.0               # 0: the checkpoint's per-condition thresholds (chosen on val); else one for all
json = False                  # machine-readable output: one JSON object per image
attention_dir = ''            # write attention-map grids here
indication = ''               # the clinical indication, for a checkpoint trained with context (every image)
context = None                # None: as the checkpoint was trained; False: without the indication
diagnosis_prompt = None       # None: as the checkpoint was trained (the head's decisions in the prompt)
device = 'auto'
dtype = 'auto'
cpu_kernels = False           # True: hardware.py's CPU speed-ups (oneDNN linears, kept freed memory, lean beam cache)
globals().update(GENERATION)  # num_beams, no_repeat_ngram_size, ... : the model's defaults, overridable here
# -----------------------------------------------------------------------------
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.dcm')
GRID_SOURCE = 'chexquery-source-sha256'  # a grid's PNG text: whose grid it is, without naming the file


def list_images(path):
    """The image files to run: a directory's by their names, or the one path given. What is not
    a regular file among them (a FIFO, a directory named x.png) is reported when it is read."""
    if os.path.isdir(path):
        files = data.image_files(path, IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no .png/.jpg/.jpeg/.dcm images in directory {path}")
        return files
    if not os.path.lexists(path):  # a broken symlink or a loop is there, and read_images names it
        raise FileNotFoundError(f"images={path!r}: no such file or directory")
    return [path]


def read_images(paths):
    """[(path, RGB image)] of the readable files. Each unreadable one is left out and reported
    on stderr as 'error: <message>': data.load_image's message already names the file."""
    loaded = []
    for f in paths:
        try:
            loaded.append((f, data.load_image(f)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
    return loaded


def grid_path(directory, image, written):
    """Where an image's attention grid goes: its file name with the extension kept
    (x.png -> x.png_attention.png, so x.png, x.jpg and x.dcm differ), with a number added
    (x.png_attention-2.png) while that name is taken by another image's grid: one written
    earlier in this run (`written`, {path: source}) or left by an earlier run. Each grid
    records a digest of its image's absolute path, so a rerun replaces its own grids only."""
    source = hashlib.sha256(os.path.abspath(image).encode()).hexdigest()[:16]
    for n in itertools.count(1):
        path = os.path.join(directory, f"{os.path.basename(image)}_attention{f'-{n}' if n > 1 else ''}.png")
        if path in written or (os.path.lexists(path) and grid_source(path) != source):
            continue
        written[path] = source
        return path, source


def grid_source(path):
    """The source digest a grid recorded, or None (not a grid of ours, or unreadable)."""
    try:
        with Image.open(path) as im:
            return im.text.get(GRID_SOURCE)
    except Exception:  # whatever is at that name, it is not one of our grids
        return None


def main():
    files = list_images(images)  # a wrong path fails before a model is loaded
    dev = hardware.resolve_device(device)
    model, meta = load_checkpoint(ckpt or out_dir, dev, merge_lora=True)
    if dev == 'cpu' and cpu_kernels:
        hardware.use_cpu_kernels(model)
    cfg = meta['config']
    asked = True if context is None and indication.strip() else context  # an indication given asks for context
    use = indication if data.check_context(asked, cfg, ckpt or out_dir) else ''
    diagnosis = data.check_diagnosis(diagnosis_prompt, cfg, ckpt or out_dir)
    thresholds, thresholds_from = decision_thresholds(meta, threshold)
    tok = data.run_tokenizer(cfg)
    transform = data.eval_transform(model.cfg.image_size)
    section = data.section_prompt(cfg.get('target', 'both'))
    autocast = hardware.autocast(dev, hardware.resolve_dtype(dtype, dev))
    generation = {k: globals()[k] for k in GENERATION}
    if attention_dir:
        os.makedirs(attention_dir, exist_ok=True)
    failed, written = 0, {}
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        loaded = read_images(batch)  # one bad file is reported, the rest still run
        failed += len(batch) - len(loaded)
        if not loaded:
            continue
        x = torch.stack([transform(im) for _, im in loaded]).to(dev)
        with torch.no_grad(), autocast:
            enc = model.encode(x, return_attention=bool(attention_dir))  # once, for probabilities and report
            probs = enc['cond_logits'].float().sigmoid().cpu()
            decisions = decide(probs.numpy(), thresholds)
            reports = data.write_reports(model, tok, enc['visual_tokens'], section, [use] * len(loaded),
                                         decisions.tolist() if diagnosis else None, **generation)
        for i, (f, im) in enumerate(loaded):
            p = {c: round(probs[i, j].item(), 4) for j, c in enumerate(CONDITIONS)}
            record = dict(image=f, report=reports[i].strip(), probabilities=p,
                          thresholds=dict(zip(CONDITIONS, thresholds)), thresholds_from=thresholds_from,
                          present=[c for c, d in zip(CONDITIONS, decisions[i]) if d], gate=round(enc['gate'][i].item(), 4),
                          diagnosis_prompt=diagnosis)
            if attention_dir:
                png, source = grid_path(attention_dir, f, written)
                info = PngInfo()
                info.add_text(GRID_SOURCE, source)
                attention_grid(im, enc['attention'][i].float().cpu().numpy(), record['gate'], os.path.basename(f),
                               prior=model.cfg.anatomical_prior, atlas=model.cfg.atlas).save(png, pnginfo=info)
                record['attention_png'] = png
            if json:
                print(jsonlib.dumps(record))
            else:
                print(f"== {f}\n{record['report']}\nconditions (* present; thresholds: {thresholds_from}):")
                for c, v in sorted(p.items(), key=lambda kv: -kv[1]):
                    print(f"  {'*' if c in record['present'] else ' '} {v:.3f}  {c} (threshold {record['thresholds'][c]:.3f})")
                if attention_dir:
                    print(f"attention maps: {record['attention_png']}")
    if failed:
        print(f"{failed} of {len(files)} files could not be read", file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), sys.argv[1:])
    main()
