"""Jinja templates of the model and dataset cards trl-tip writes (installed as `trl_tip.model_cards`)."""
