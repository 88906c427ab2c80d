"""megaflow: pretrain -> SFT -> reward model -> DPO/PPO/GRPO on NVIDIA megatron-core."""

__version__ = "0.1.0"
