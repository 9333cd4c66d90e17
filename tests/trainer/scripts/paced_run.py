"""`python -m trl_tip.train` with a reward function for PACED, for tests/trainer/test_distributed.py.

`trl-tip train` grades PACED's rollouts against the dataset's `answer` column; a reward function (`reward_func=`) is a
Python-API feature. This runs the same `trl_tip.train.run` (recipe, flags, dataset, `accelerate launch`) with the
trainer it builds given `reward_func=parity_reward`, and each process appends one row per generation batch to
`<output_dir>/paced_rank<process index>.jsonl`: the kept ratio in force, and per local rollout its question, its
reward, its valid tokens and the weight the trainer gave it; and one row per training micro-batch (its loss) to
`<output_dir>/loss_rank<process index>.jsonl`. The rewards and token counts are read from the rollouts here, not from
the trainer's grading, so a test recomputes PACED's weights from what each process holds.

Usage: [accelerate launch ...] paced_run.py --config recipes/tiny_cpu.yaml [--flag value ...]
"""

import json
import os
import sys

from trl_tip.train import run
from trl_tip.trainer import tip_trainer


def parity_reward(completion_ids, **kwargs):
    """A rollout is "correct" when its completion token ids sum to an odd number: deterministic given the rollout, and
    right about half of the time, so a problem's pass rate over two rollouts is 0, 1/2 or 1."""
    return [float(sum(ids) % 2) for ids in completion_ids]


class PacedTrainer(tip_trainer.TIPGKDTrainer):
    """The trainer `trl_tip.train` builds, grading with `parity_reward` and logging what each process holds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, reward_func=parity_reward, **kwargs)

    def _log(self, name: str, row: dict) -> None:
        row = {"step": self.state.global_step + 1, "rank": self.accelerator.process_index, **row}
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, f"{name}_rank{self.accelerator.process_index}.jsonl")
        with open(path, "a") as log:
            log.write(json.dumps(row) + "\n")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            rollouts = []
            weights = output.get("rollout_weights")
            for i, (example, ids, mask) in enumerate(zip(inputs, output["completion_ids"], output["completion_mask"])):
                kept = ids[mask.bool()].tolist()
                rollouts.append(
                    {
                        "question": example["prompt"][0]["content"],
                        "reward": float(sum(kept) % 2),
                        "tokens": int(mask.sum()),
                        "weight": None if weights is None else float(weights[i]),
                    }
                )
            self._log("paced", {"ratio": self._ratio_kept(), "rollouts": rollouts})
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self._log("loss", {"loss": (output[0] if return_outputs else output).item()})
        return output


if __name__ == "__main__":
    # `trl_tip.train.main` looks the trainer class up in its module when it runs.
    tip_trainer.TIPGKDTrainer = PacedTrainer
    run(sys.argv[1:], prog="paced_run.py")
