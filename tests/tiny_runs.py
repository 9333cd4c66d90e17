"""Training arguments shared by the tests that train tiny models through `TIPGKDTrainer` on the CPU."""

# Two rollouts per step of up to 8 tokens, fp32 on the CPU, a learning rate large enough that one step visibly moves
# the tiny weights, no checkpoints and no loggers; a test overrides what it specifies, e.g. `{**TINY_CPU_RUN, ...}`.
TINY_CPU_RUN = {
    "per_device_train_batch_size": 2,
    "max_completion_length": 8,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "seed": 7,
}

# The embedded pair's commands (`trl-tip demo`, `trl-tip study`) on the tiny local models: two steps of two rollouts
# of up to 6 tokens, 8 training and 4 held-out problems (`PairArguments` fields; the tests add the models).
TINY_PAIR_RUN = {
    "steps": 2,
    "batch_size": 2,
    "max_new_tokens": 6,
    "train_problems": 8,
    "eval_problems": 4,
}
