"""One module per stage with only what is specific to it: pretrain now; sft, rm, dpo, ppo, grpo follow."""
