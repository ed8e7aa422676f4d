"""
The 14 CheXpert condition names as vectors: each name's [CLS] embedding under a
BERT-family model (BioBERT by default), which CheXQuery's condition queries start from.

    vectors = condition_name_vectors('dmis-lab/biobert-v1.1')   # (14, W), W the text model's width

Computed once and cached as safetensors, so training never needs the text model again.
"""
import hashlib
import os

import torch

from chexpert import CONDITIONS


def cache_stamp(path):
    """The stamp a cached file was written with ('' for a hub name)."""
    from safetensors import safe_open
    with safe_open(path, 'pt') as f:
        return (f.metadata() or {}).get('stamp', '')


def directory_stamp(path):
    """A local model can be retrained in place: its files' names, sizes and times, hashed."""
    files = sorted((f, os.stat(os.path.join(path, f))) for f in os.listdir(path))
    return hashlib.sha256(repr([(f, s.st_size, s.st_mtime_ns) for f, s in files]).encode()).hexdigest()


def embed_names(name):
    """(14, W): the text model's [CLS] vector of each condition name."""
    from transformers import AutoModel, AutoTokenizer
    try:
        tok, text_model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise OSError(f"query_init: could not load the text model '{name}' to embed the "
                      f"condition names ({str(e).splitlines()[0]}). Point query_init at a local "
                      f"directory of it, at a cached .safetensors, or use query_init='random'.") from None
    text_model.eval()
    with torch.no_grad():
        batch = tok(list(CONDITIONS), padding=True, return_tensors='pt')
        return text_model(**batch).last_hidden_state[:, 0].float().contiguous()


def condition_name_vectors(name, cache_dir=None):
    """(14, W) vectors of the condition names. name: a BERT-family hub name or directory, or a
    .safetensors file holding a (14, W) 'condition_queries' tensor. A directory's cache is
    recomputed when its files change (and still used when the directory is gone)."""
    from safetensors.torch import load_file, save_file
    if name.endswith('.safetensors'):
        vectors = load_file(name)['condition_queries']
    else:
        cache_dir = cache_dir or os.environ.get('CHEXQUERY_CACHE', os.path.expanduser('~/.cache/chexquery'))
        cache = os.path.join(cache_dir, f"condition_queries-{name.strip('/').replace('/', '--')}.safetensors")
        stamp = directory_stamp(name) if os.path.isdir(name) else ''
        if os.path.exists(cache) and (not stamp or stamp == cache_stamp(cache)):
            vectors = load_file(cache)['condition_queries']
        else:
            vectors = embed_names(name)
            os.makedirs(cache_dir, exist_ok=True)
            save_file({'condition_queries': vectors}, cache + '.tmp', metadata={'stamp': stamp})
            os.replace(cache + '.tmp', cache)  # a killed run never leaves half a cache
    if vectors.shape[0] != len(CONDITIONS):
        raise ValueError(f"condition query init '{name}' has {vectors.shape[0]} rows, expected {len(CONDITIONS)}")
    return vectors
