"""
CheXQuery checkpoints: which weights one holds, writing and reading it, and the
table of what trains in each phase.

    save_checkpoint('out/ckpt.safetensors', model, meta)   # one file, renamed into place
    model, meta = load_checkpoint('out')                     # a directory means out/ckpt.safetensors
    print(param_table(model))

A checkpoint is one .safetensors file: the weights that trained or were randomly
initialized (frozen pretrained backbone weights are reloaded from their source
instead), any extra tensors under 'name/...' keys (train.py's optimizer state and
RNG), and the meta (run config, iteration, model config) as JSON in its header.
"""
import json
import os
from dataclasses import asdict

import lora
from chexpert import CONDITIONS
from chexquery import CheXQuery, CheXQueryConfig


def pretrained_prefixes(model):
    """Prefixes of the weights reloaded from their pretrained source, not saved."""
    return tuple(p for p, given in (('vision.', model.cfg.vision_config), ('t5.', model.cfg.text_config))
                 if given is None)


def checkpoint_state_dict(model):
    """Everything trained or randomly initialized; frozen pretrained weights are left out."""
    skip, seen, out = pretrained_prefixes(model), set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # a tied alias (t5.decoder.embed_tokens is t5.shared): save once
            continue
        seen.add(v.data_ptr())
        if 'lora_' in k or not k.startswith(skip):
            out[k] = v
    return out


def load_weights(model, state, source):
    """Loads a checkpoint_state_dict, listing every mismatched key."""
    lora.check_state_dict(checkpoint_state_dict(model), state, source)
    model.load_state_dict(state, strict=False)


def save_checkpoint(path, model, meta, extra_tensors=None):
    """Writes the model's checkpoint_state_dict, any extra tensors and the meta (with the model's
    config added) to path. One file renamed into place is atomic, so a kill during a save leaves
    the previous checkpoint intact. A .json copy of the meta is written beside it for people."""
    from safetensors.torch import save_file
    path = str(path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint_state_dict(model).items()}
    tensors.update(extra_tensors or {})
    meta = dict(meta, model_config=asdict(model.cfg))
    save_file(tensors, path + '.tmp', metadata={'chexquery': json.dumps(meta)})
    os.replace(path + '.tmp', path)
    json_path = os.path.splitext(path)[0] + '.json'
    with open(json_path + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(json_path + '.tmp', json_path)


def read_checkpoint(path):
    """(tensors, meta) from a .safetensors checkpoint, or a directory holding ckpt.safetensors."""
    from safetensors import safe_open
    path = str(path)
    if not path.endswith('.safetensors'):
        path = os.path.join(path, 'ckpt.safetensors')
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint: {path} does not exist")
    try:
        with safe_open(path, 'pt') as f:
            meta = json.loads((f.metadata() or {})['chexquery'])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{path} is not a CheXQuery checkpoint ({type(e).__name__}: {e})") from None
    return tensors, meta


def load_checkpoint(path, device='cpu', merge_lora=False):
    """(model, meta) from a checkpoint; pretrained backbones are reloaded from their source.
    merge_lora=True folds the adapters into their weights, for inference at no extra cost."""
    tensors, meta = read_checkpoint(path)
    cfg = CheXQueryConfig(**dict(meta['model_config'], query_init='random'))  # queries come from the file
    model = CheXQuery(cfg)
    load_weights(model, {k: v for k, v in tensors.items() if '/' not in k}, path)
    if merge_lora:
        lora.merge_lora(model)
    return model.to(device).eval(), meta


# (label, name prefix, LoRA only (True), LoRA excluded (False) or both (None))
COMPONENTS = (('vision encoder (SigLIP)', 'vision.', False), ('  vision LoRA', 'vision.', True),
              ('condition queries', 'condition_queries', None), ('anatomical queries', 'anatomical_queries', None),
              ('cross-attention', 'cross_attention.', None), ('gated fusion + pooling', 'fusion.', None),
              ('projection', 'proj.', None), ('auxiliary head', 'aux_head.', None),
              ('decoder (T5)', 't5.', False), ('  decoder LoRA', 't5.', True))


def param_table(model, full_backbones=False):
    """Total and trainable parameters per component and phase, as a table."""
    rows = []
    for label, prefix, want_lora in COMPONENTS:
        ps = [(n, p.numel()) for n, p in model.named_parameters()
              if n.startswith(prefix) and (want_lora is None or ('lora_' in n) == want_lora)]
        rows.append([label, sum(k for _, k in ps)] +
                    [sum(k for n, k in ps if model.trainable(n, ph, full_backbones=full_backbones)) for ph in (1, 2, 3)])
    rows.append(['total'] + [sum(r[i] for r in rows) for i in range(1, 5)])
    lines = [f"{'component':<26}{'params':>14}{'phase 1':>13}{'phase 2':>13}{'phase 3':>13}"]
    lines += [f"{r[0]:<26}" + ''.join(f"{v:>14,}" if i == 0 else f"{v:>13,}" for i, v in enumerate(r[1:]))
              for r in rows]
    return '\n'.join(lines)


def decision_thresholds(meta, override=0.0):
    """(thresholds, source): the aux head's probability threshold per condition (a list of 14) and
    where they come from: `override` for all when it is set, else those train.py chose on val and
    the checkpoint keeps, else 0.5 (where none was chosen: a condition with one class on val)."""
    if override:
        return [override] * len(CONDITIONS), f"{override} for every condition, as asked"
    saved = meta.get('thresholds')
    if saved is None:
        return [0.5] * len(CONDITIONS), "0.5 for every condition: this checkpoint has no thresholds chosen on val"
    return [0.5 if t is None else t for t in saved], "per condition, chosen on val (F1)"
