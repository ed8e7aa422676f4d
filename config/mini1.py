# Phase 1 of the miniature (after config/mini.py), query alignment: queries, cross-attention,
# fusion and the aux head learn to read the frozen SigLIP for the frozen T5.
phase = 1
out_dir = 'out-mini1'
init_from = 'scratch'
epochs = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 30
label_smoothing = 0.0
lambda_aux = 0.5
