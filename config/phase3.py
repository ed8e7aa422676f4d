# Phase 3 (optional), generation polish: SigLIP fully frozen (its LoRA too), no aux loss
# (so the aux head freezes as well), decoder LoRA and the query side keep training.
# From phase 2's best checkpoint. Effective batch: 8 x 4 = 32. Warmup is not given
# by the methodology; 100 steps keeps the first updates of the new phase gentle.
phase = 3
out_dir = 'out-phase3'
init_from = 'out-phase2/ckpt.safetensors'
epochs = 5
batch_size = 8
gradient_accumulation_steps = 4
learning_rate = 2e-5
warmup_iters = 100
label_smoothing = 0.1
lambda_gen = 1.0
lambda_aux = 0.0
