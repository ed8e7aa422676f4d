# Phase 1, query alignment: queries, cross-attention, fusion and the aux head
# learn to read a frozen SigLIP for a frozen Flan-T5.
# Effective batch: 16 per micro-step x 2 accumulation steps (split across GPUs) = 32.
phase = 1
out_dir = 'out-phase1'
init_from = 'scratch'
epochs = 5
batch_size = 16
gradient_accumulation_steps = 2
learning_rate = 1e-4
warmup_iters = 200
label_smoothing = 0.0
lambda_gen = 1.0
lambda_aux = 0.5
