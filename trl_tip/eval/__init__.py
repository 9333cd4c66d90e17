"""Evaluation: `trl-tip eval` (mean@k on MATH-500, AIME, AMC, GSM8K or a jsonl) and math-verify answer grading.
Loads no trainer."""
