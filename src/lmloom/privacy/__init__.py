"""Differential privacy for training: DP-SGD through Opacus (`dp.py`) and the `train.dp_pretrain` stage."""
