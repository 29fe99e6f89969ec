"""Distill a teacher into an Argonne student (or resume): the pretraining run with the distillation loss.

    torchrun --nproc-per-node 2 launch/distill.py --config distill-tiny.toml             # CPU, gloo, TP 2
    torchrun --nproc-per-node 8 launch/distill.py --config distill-4b9.toml --distill.teacher=/models/Qwen2.5-14B

loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) per token ([distill] in the config).
"""

import sys

from train_dt import main

from argonne_dt.distill import distill

if __name__ == "__main__":
    sys.exit(main(distill, __doc__))
