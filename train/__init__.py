"""The training loop: `python -m train.pretrain` under torchrun."""
