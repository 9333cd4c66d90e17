"""Publishing a run: Hub pushes with retries (`trl-tip push`), model and dataset cards, the quadrant plot."""
