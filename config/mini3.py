# Phase 3 of the miniature (after config/mini.py), generation polish: SigLIP fully frozen (its
# LoRA too), no aux loss (so the aux head freezes as well), decoder LoRA and the query side keep
# training, from phase 2's best checkpoint.
phase = 3
out_dir = 'out-mini3'
init_from = 'out-mini2/ckpt.safetensors'
epochs = 1
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 20
label_smoothing = 0.1
lambda_aux = 0.0
