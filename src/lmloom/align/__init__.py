"""Alignment maths: sequence log-probs, the DPO loss family, GRPO advantages and loss, reward models."""
