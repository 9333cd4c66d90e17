"""`python -m trl_tip.train` with a custom callable selector, for tests/trainer/test_distributed.py.

`trl-tip train` names its selector in the recipe; a callable selector (`token_selector=fn`) is a Python-API feature.
This runs the same `trl_tip.train.run` (recipe, flags, dataset, `accelerate launch`) with the trainer it builds given
`token_selector=keep_short_rollouts`, and each process appends one row per micro-batch (its valid and kept token
counts and its loss) to `<output_dir>/selection_rank<process index>.jsonl`, so a test sees which process kept what.

Usage: [accelerate launch ...] short_rollouts_run.py --config recipes/tiny_cpu.yaml [--flag value ...]
"""

import json
import os
import sys

from trl_tip.train import run
from trl_tip.trainer import tip_trainer


# Dataset completions "The answer is N." take 11-13 tokens with the tiny tokenizer; the test's long completions are
# cut at max_completion_length=16. The threshold sits between the two.
SHORT_ROLLOUT_TOKENS = 14


def keep_short_rollouts(stats, generator):
    """Keeps every valid token of the rollouts with at most `SHORT_ROLLOUT_TOKENS` of them, none of longer ones.

    A statistics-free, per-rollout rule: a rollout is kept or dropped by its content alone, whichever process holds
    it, so a data set that puts the long rollouts on one process makes that process keep nothing. It declares no
    `fixed_count`, so the trainer normalizes by the kept count measured per micro-batch, as for `quadrant`."""
    lengths = stats.mask.sum(dim=-1, keepdim=True)
    return stats.mask & (lengths <= SHORT_ROLLOUT_TOKENS)


class ShortRolloutsTrainer(tip_trainer.TIPGKDTrainer):
    """The trainer `trl_tip.train` builds, with `keep_short_rollouts` as its selector and a per-process log."""

    def __init__(self, *args, **kwargs):
        self._counts = None

        def counted(stats, generator):
            keep = keep_short_rollouts(stats, generator)
            self._counts = {"valid": int(stats.mask.sum()), "kept": int(keep.sum())}
            return keep

        super().__init__(*args, token_selector=counted, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            loss = output[0] if return_outputs else output
            row = {"step": self.state.global_step + 1, "rank": self.accelerator.process_index, **self._counts}
            row["loss"] = loss.item()
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, f"selection_rank{self.accelerator.process_index}.jsonl")
            with open(path, "a") as log:
                log.write(json.dumps(row) + "\n")
        return output


if __name__ == "__main__":
    # `trl_tip.train.main` looks the trainer class up in its module when it runs.
    tip_trainer.TIPGKDTrainer = ShortRolloutsTrainer
    run(sys.argv[1:], prog="short_rollouts_run.py")
