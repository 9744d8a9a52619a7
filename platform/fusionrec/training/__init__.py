"""`fusionrec train`: fit a model with Ray Train, track it in MLflow, optionally register it.

    config.py     TrainConfig: the settings of a run, checked when made (no torch, no Ray)
    data.py       prepare(): dataset + feature tables -> content, index-coded ratings, split;
                  loop_data(): the training and validation parts a worker or a trial receives
    engine.py     loss, optimiser, weight average, validation and the epoch loop (`run_epochs`),
                  shared by Ray Train's workers and Ray Tune's trials (search/trial.py); no Ray, no MLflow
    ray_train.py  fit(): TorchTrainer (ScalingConfig, RunConfig, FailureConfig) and its workers
    tracking.py   MLflow: params, identity tags, per-epoch history, the progress bar, the loss
                  curve, the logged model
    command.py    train(): the whole command: fit -> score the test part once -> MLflow -> register

On a Ray cluster with GPUs each worker reserves one and trains on it (`ray_runtime.use_gpus`: the
cluster decides, not the driver's torch); the loop takes its device explicitly, keeps the best
weights on the CPU and reads every saved state onto the CPU (`engine.load_state`), so a CPU driver
loads what a GPU trained, and a checkpoint resumes on either.
Every epoch's report (and MLflow history) also carries each worker's checksum of its weights
(`replica_checksums`, `param_checksum_rank<N>`): equal on every rank while DDP keeps them in step.
Checkpoints are written every epoch; a lost worker restarts the group from the last one
(`FailureConfig(max_failures=...)`). The checkpoint also keeps the best weights on validation
(`SELECTION`: validation MSE for ratings, validation nDCG@10 over full ranking for implicit
feedback), which are what gets evaluated and registered; what is validated is a moving average of
the weights (`WeightAverage`, `ema_decay`). The test part is scored once, after.
Models without gradients (`models.config.NO_GRADIENT`: the genre-pop and content-knn baselines) skip
the Trainer: they are fitted in one pass from the training ratings and validated the same way.

This package's own __init__ imports nothing, so `training.config` stays free of torch and Ray.
"""
