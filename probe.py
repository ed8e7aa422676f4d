"""
How well a vision tower sees the 14 findings, for pretrain.py: a linear probe of its frozen
features, and the ceiling it is read against, a small CNN trained directly on the labels of
the same images. Both are scored on the val split with uncertain labels as positive, as
eval.py scores the aux head.

    python pretrain.py --ceiling        # trains the CNN again and caches out-pretrained/ceiling.json
"""
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from chexpert import CONDITIONS
from metrics import auc_per_condition


def linear_probe_auc(train_x, train_y, val_x, val_y, steps, lr=0.01):
    """Mean validation ROC-AUC over the conditions of a logistic regression (one linear layer,
    full-batch Adam) on frozen features: how linearly the features carry the findings."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = nn.Linear(train_x.shape[1], train_y.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(probe((train_x - mean) / std), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        aucs = torch.tensor(auc_per_condition(val_y.numpy(), probe((val_x - mean) / std).sigmoid().numpy()))
    return aucs.nanmean().item(), aucs


def resnet18(n_outputs=len(CONDITIONS)):
    """torchvision's ResNet-18 from random init, its stem reading one channel (the images are grey)."""
    import torchvision
    model = torchvision.models.resnet18(num_classes=n_outputs)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def grey(images, transform):
    """(B, 1, S, S): PIL images through transform, one channel kept (the three are equal)."""
    return torch.stack([transform(image)[:1] for image in images])


def train_cnn(model, images, labels, transform, epochs, batch_size, lr, weight_decay, seed, warmup=0.1):
    """Trains model on (images, labels) with BCE: AdamW, linear warmup then cosine decay to 0."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(images) // batch_size
    steps = epochs * steps_per_epoch
    warm = max(1, int(warmup * steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    model.train()
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        for i in range(steps_per_epoch):
            batch = order[i * batch_size:(i + 1) * batch_size]
            loss = F.binary_cross_entropy_with_logits(model(grey([images[j] for j in batch], transform)), labels[batch])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        print(f"  ceiling epoch {epoch + 1}/{epochs}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return model.eval()


@torch.no_grad()
def val_aucs(model, images, labels, transform, batch_size=100):
    """Per-condition ROC-AUC of model's sigmoid outputs on (images, labels)."""
    probs = torch.cat([model(grey(images[i:i + batch_size], transform)).sigmoid()
                       for i in range(0, len(images), batch_size)])
    return auc_per_condition(labels.numpy(), probs.numpy())


def ceiling(train, val, train_transform, eval_transform, path, epochs=4, batch_size=64, lr=2e-3, weight_decay=0.05,
            seed=1337, data=None):
    """Trains the ceiling CNN on train's images and labels, scores it on val's, writes the result
    to path (JSON) and returns it: {'auc': mean, 'aucs': {condition: AUC}, 'seconds', 'recipe',
    'data'}; data names the images it was measured on, so no other set reads it."""
    torch.manual_seed(seed)
    t0 = time.time()
    model = train_cnn(resnet18(), train['images'], train['labels'], train_transform, epochs, batch_size, lr,
                      weight_decay, seed)
    aucs = val_aucs(model, val['images'], val['labels'], eval_transform)
    valid = [a for a in aucs if a == a]
    result = dict(auc=sum(valid) / len(valid), aucs=dict(zip(CONDITIONS, aucs)), seconds=round(time.time() - t0),
                  recipe=dict(model='ResNet-18, 1-channel stem, random init', epochs=epochs, batch_size=batch_size,
                              lr=lr, weight_decay=weight_decay, seed=seed, uncertain='positive'), data=data)
    with open(path + '.tmp', 'w') as file:
        json.dump(result, file, indent=1)
    os.replace(path + '.tmp', path)
    return result


def read(path):
    """The cached ceiling result at path, or None."""
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def table(found, top):
    """Lines: the probe's per-condition val AUC beside the ceiling's, and their means (either
    result None: not measured, shown as '-')."""
    def cell(result, key):
        return f"{result[key]:.3f}" if result else '-'
    rows = [f"  {'condition':<28}{'SigLIP probe':>13}{'CNN ceiling':>13}"]
    rows += [f"  {c:<28}{cell(found and found['aucs'], c):>13}{cell(top and top['aucs'], c):>13}" for c in CONDITIONS]
    return rows + [f"  {'mean':<28}{cell(found, 'auc'):>13}{cell(top, 'auc'):>13}"]


def matching(paths, data):
    """(result, path): the first cached ceiling among paths measured on data, else (None, None)."""
    for path in paths:
        result = read(path)
        if result is not None and result.get('data') == data:
            return result, path
    return None, None


def against_ceiling(probe_path, ceiling_paths, data):
    """Lines: the probe's val AUCs cached at probe_path beside the first ceiling cached among
    ceiling_paths that was measured on the same data."""
    found, (top, source) = read(probe_path), matching(ceiling_paths, data)
    if found is None and top is None:
        return []
    lines = ["siglip: linear probe of global and mean patch features against the supervised CNN ceiling, "
             "val ROC-AUC:"]
    lines += table(found, top)
    if top is None:
        lines.append(f"  (no ceiling for this data in {' or '.join(ceiling_paths)}: python pretrain.py --ceiling "
                     "trains it)")
    elif source != ceiling_paths[0]:
        lines.append(f"  (the ceiling from {source}, measured on {top.get('machine', 'another machine')}: "
                     "python pretrain.py --ceiling measures it here)")
    return lines
