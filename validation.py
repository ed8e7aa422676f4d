"""
What train.py measures on the validation split at each evaluation: the losses, the aux
head's macro AUC and F1 over the 14 conditions, and a few greedy reports to read.

    with autocast:
        scores = validate(model, batches, max_batches, lambda_gen, lambda_aux, 'data/iu_xray/val.jsonl')
        for id, reference, report in sample_reports(model, val_set, tok, 3, max_len): ...
"""
import torch

import data
from metrics import auc_per_condition, best_thresholds, clinical_scores, decide


@torch.no_grad()
def validate(model, batches, max_batches, lambda_gen, lambda_aux, source, text_for=None):
    """(scores, thresholds): val_loss (lambda_gen * val_loss_gen + lambda_aux * val_loss_aux, as in
    training), its two parts (val_loss_gen NaN at lambda_gen 0, which runs no decoder), val_auc_macro
    and val_f1_macro (at 0.5) of the aux head, over the collated batches (None: every image unreadable),
    at most max_batches of them (0: all); and each condition's F1-maximizing threshold on them
    (metrics.best_thresholds). text_for(batch): None or forward's text_from_logits for it
    (diagnosis_prompt). The model is in eval mode on its device; source names the split for the
    error when not one image could be read."""
    device = next(model.parameters()).device
    sums, n, probs, targets = torch.zeros(3, device=device), 0, [], []
    nan = torch.tensor(float('nan'), device=device)  # val_loss_gen with lambda_gen 0: no decoder run
    for i, b in enumerate(batches):
        if b is None:
            continue
        if max_batches and i >= max_batches:
            break
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        out = model(b['image'], b['decoder_input_ids'], b['labels'], b['cond_labels'], lambda_gen=lambda_gen,
                    lambda_aux=lambda_aux, token_weights=b['weights'], text_from_logits=text_for(b) if text_for else None)
        k = len(b['ids'])
        sums += torch.stack([out.get(key, nan) for key in ('loss', 'loss_gen', 'loss_aux')]).float() * k
        n += k
        probs.append(out['cond_logits'].float().sigmoid().cpu())
        targets.append(b['cond_labels'].cpu())
    if n == 0:
        raise ValueError(f"no readable validation image in {source} (see the warnings above)")
    loss, gen, aux = (sums / n).tolist()
    probs, targets = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    aucs = [a for a in auc_per_condition(targets, probs) if a == a]  # NaN: one class only
    thresholds = best_thresholds(targets, probs)
    return dict(val_loss_gen=gen, val_loss_aux=aux, val_loss=loss, val_auc_macro=sum(aucs) / max(1, len(aucs)),
                val_f1_macro=clinical_scores(targets > 0.5, probs > 0.5)['macro14']['f1']), thresholds


@torch.no_grad()
def sample_reports(model, dataset, tok, n, max_len, context=False, target='both', diagnosis=False, thresholds=None):
    """[(id, reference, report)] for the first n readable samples of a ReportDataset: greedy
    reports of model (on its device), with the indication ahead of the prompt if context, and
    the aux head's decisions at `thresholds` in words if diagnosis."""
    items = [x for x in (dataset[i] for i in range(min(n, len(dataset)))) if x is not None]
    if not items:
        return []
    device = next(model.parameters()).device
    by_id = {r['id']: r for r in dataset.records}
    enc = model.encode(torch.stack([x['image'] for x in items]).to(device))
    decisions = decide(enc['cond_logits'].float().sigmoid().cpu().numpy(), thresholds).tolist() if diagnosis else None
    indications = [by_id[x['id']].get('indication', '') if context else '' for x in items]
    reports = data.write_reports(model, tok, enc['visual_tokens'], dataset.prompt, indications, decisions,
                                 num_beams=1, min_length=1, max_length=max_len)
    return [(x['id'], data.target_text(by_id[x['id']], target), report) for x, report in zip(items, reports)]
