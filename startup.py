"""
What train.py checks before it writes anything, so that a bad setting, an out_dir holding
another run's checkpoints, or a resume that would not continue the same run stops with
nothing changed; and what a checkpoint to start from decides.

    check_settings(config, world_size)                   # values, before anything divides by them
    check_out_dir(out_dir, init_from, overwrite)         # no other run's checkpoint replaced unasked
    settings_from_checkpoint(model_config, config)       # the checkpoint's architecture wins
    model_config(config, vocab_size, atlas)              # without a checkpoint, the settings decide it
    check_resumable(meta, config, world_size)            # a resume continues the same run
"""
import os
from dataclasses import replace

from chexquery import ANATOMICAL_PRIORS, CheXQueryConfig, tiny_config

AT_LEAST_1 = ('batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval', 'epochs', 'max_len',
              'max_bad_steps', 'image_size', 'finding_weight')
AT_LEAST_0 = ('max_iters', 'eval_iters', 'sample_reports', 'num_workers', 'warmup_iters', 'min_lr', 'weight_decay',
              'grad_clip', 'label_smoothing', 'lambda_gen', 'lambda_aux')
CHECKPOINTS = ('ckpt.safetensors', 'last.safetensors')  # what a run writes into its out_dir


def check_settings(c, world_size):
    """Raises ValueError naming the first setting of config c that cannot work."""
    for key in AT_LEAST_1:
        if c[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {c[key]}")
    for key in AT_LEAST_0:
        if c[key] < 0:
            raise ValueError(f"{key} must be 0 or more, got {c[key]}")
    if not c['learning_rate'] > 0 or c['min_lr'] > c['learning_rate']:
        raise ValueError(f"need 0 <= min_lr <= learning_rate and learning_rate > 0, got min_lr={c['min_lr']}, "
                         f"learning_rate={c['learning_rate']}")
    if not (0 <= c['beta1'] < 1 and 0 <= c['beta2'] < 1 and c['label_smoothing'] < 1):
        raise ValueError(f"beta1, beta2 and label_smoothing must be in [0, 1), got {c['beta1']}, {c['beta2']}, "
                         f"{c['label_smoothing']}")
    for key in ('context_dropout', 'own_diagnosis'):
        if not 0 <= c[key] <= 1:
            raise ValueError(f"{key} is a share of the training samples, in [0, 1], got {c[key]}")
    rate = c['dropout']
    if rate is not None and (type(rate) not in (int, float) or not 0 <= rate < 1):  # type(): not a bool
        raise ValueError(f"dropout must be a rate in [0, 1), or None for the model's own, got {rate!r}")
    if c['lambda_gen'] == c['lambda_aux'] == 0:
        raise ValueError("lambda_gen and lambda_aux are both 0: there would be no loss to train on")
    if c['model_size'] not in ('base', 'tiny'):
        raise ValueError(f"model_size must be 'base' or 'tiny', got {c['model_size']!r}")
    if c['anatomical_prior'] not in ANATOMICAL_PRIORS:
        raise ValueError(f"anatomical_prior must be 'none', 'soft' or 'strict', got {c['anatomical_prior']!r}")
    if c['cache_features'] and (c['phase'] != 1 or c['full_backbones']):
        raise ValueError("cache_features=True needs phase 1 with frozen backbones: in phases 2 and 3 "
                         "SigLIP's outputs change as it trains (phase 3: its input augmentation does)")
    if c['gradient_accumulation_steps'] % world_size:  # before torchrun's rendezvous, which would wait
        raise ValueError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must divide by the "
                         f"{world_size} processes, so the effective batch stays the same")


def is_inside(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_out_dir(out_dir, init_from, overwrite):
    """A new run (init_from 'scratch' or a checkpoint) must not replace the checkpoints another
    run left in out_dir, nor start from a checkpoint inside its own out_dir, unless overwrite
    is set. Raises FileExistsError naming the file; touches nothing."""
    if init_from == 'resume' or overwrite:
        return
    held = [os.path.join(out_dir, name) for name in CHECKPOINTS if os.path.exists(os.path.join(out_dir, name))]
    if held:
        problem = f"{held[0]} holds another run's checkpoint, which this new run would replace"
    elif init_from != 'scratch' and is_inside(init_from, out_dir):
        problem = f"init_from={init_from} lies inside out_dir={out_dir}, where this new run writes its checkpoints"
    else:
        return
    raise FileExistsError(f"{problem}. Continue that run with --init_from=resume, write this one to another "
                          f"--out_dir, or set --overwrite=True to replace its checkpoints and metrics.jsonl.")


def settings_from_checkpoint(model_config, config):
    """{key: the checkpoint's value} for each setting its architecture fixes where config differs.
    model_config: the checkpoint's CheXQueryConfig. model_size follows from random ('tiny') or
    pretrained ('base') backbones; the backbones' names and query_init mean something for
    pretrained ones only."""
    own = dict(model_size='tiny' if model_config.text_config is not None else 'base',
               image_size=model_config.image_size, anatomical_prior=model_config.anatomical_prior,
               n_anatomical_queries=model_config.n_anatomical_queries, learned_gate=model_config.learned_gate)
    if own['model_size'] == 'base':
        own.update(vision_model=model_config.vision_model, text_model=model_config.text_model,
                   query_init=model_config.query_init)
    return {k: v for k, v in own.items() if config[k] != v}


def model_config(c, vocab_size, atlas):
    """The CheXQueryConfig of config c's settings, for a new model: 'tiny' (random backbones, the
    phantom demo's) or 'base' (pretrained backbones)."""
    variant = dict(n_anatomical_queries=c['n_anatomical_queries'], learned_gate=c['learned_gate'],
                   anatomical_prior=c['anatomical_prior'], atlas=atlas)
    if c['model_size'] == 'tiny':
        return tiny_config(vocab_size=vocab_size, image_size=c['image_size'], **variant)
    return CheXQueryConfig(vision_model=c['vision_model'], text_model=c['text_model'], image_size=c['image_size'],
                           query_init=c['query_init'], **variant)


def with_dropout(model_config, rate):
    """model_config with every dropout the model has at `rate`: the new modules', the aux head's,
    both LoRAs' and T5's own (SigLIP has none). None: unchanged, which for a model from an earlier
    phase's checkpoint means that phase's rates. Dropout shapes no weight, so a phase may change it."""
    if rate is None:
        return model_config
    return replace(model_config, dropout=rate, aux_dropout=rate, vision_lora_dropout=rate, text_lora_dropout=rate,
                   text_dropout=rate)


def check_resumable(meta, config, world_size, path):
    """The data position and the optimizer's state mean something only for the same run:
    raises ValueError naming each setting that differs from the checkpoint's."""
    was = dict(meta['config'], world_size=meta.get('world_size'), aux=meta['config'].get('lambda_aux', 0) > 0)
    now = dict(config, world_size=world_size, aux=config['lambda_aux'] > 0,
               dropout=was.get('dropout') if config['dropout'] is None else config['dropout'])  # None: the checkpoint's
    keys = ('phase', 'full_backbones', 'aux', 'batch_size', 'seed', 'world_size', 'dropout')
    differ = [f"{k}={was.get(k)!r} there, {now[k]!r} here" for k in keys if was.get(k) != now[k]]
    if differ:
        raise ValueError(f"cannot resume {path} exactly: {'; '.join(differ)}. Resume with its settings "
                         f"(world_size is the number of processes), or start a new run from its weights with "
                         f"--init_from={path}")


def iters_per_epoch(n_train, n_val, samples_per_step, data_dir):
    """Optimizer steps in an epoch of n_train samples; an error for an empty validation split or
    too few samples for one step."""
    if not n_val:
        raise ValueError(f"{data_dir}/val.jsonl has no records: validation needs some")
    if n_train < samples_per_step:
        raise ValueError(f"{n_train} training samples are fewer than one step of {samples_per_step} samples")
    return n_train // samples_per_step
