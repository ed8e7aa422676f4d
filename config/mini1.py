# Phase 1 of the miniature (after config/mini.py), query alignment: the condition queries, cross-attention
# and aux head learn to read the frozen SigLIP for the 14 labels, on the aux loss alone (lambda_gen=0 runs
# no decoder), over SigLIP's outputs cached in the first epoch. The queries were short of steps, not of
# capacity (docs/history.md): 1,953 steps in some 2 minutes on 2 cores, where both losses afforded 186 in 1.
phase = 1
out_dir = 'out-mini1'
init_from = 'scratch'
epochs = 21
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 30
label_smoothing = 0.0
lambda_gen = 0.0
lambda_aux = 1.0
cache_features = True
