"""Stage 3b, critic-free: GRPO (Shao et al. 2024) and its relatives on the RL loop of megaflow/algorithms/rl.py.

G samples per prompt; each sample's advantage is its reward against its group's (rl_losses.group_advantages):
normalised by the group's std (GRPO), or not (Dr. GRPO, Liu et al. 2025: `rl.std_normalize: false`, with
`rl.loss_aggregation: seq-mean-token-sum-norm`), leave-one-out (`rl.advantage: rloo`), or REINFORCE++'s
batch-whitened returns (`rl.advantage: reinforce_pp`). The reference enters as a KL loss
(`rl.kl_loss_coef`, k3 by default) or, for REINFORCE++, as a KL penalty in the reward.
"""

from megaflow.algorithms.rl import RLStage


class GRPO(RLStage):
    name = "grpo"
    summary = "GRPO: group-normalised advantages (Dr. GRPO, RLOO, REINFORCE++), KL loss to the reference, no critic"
    algorithm = "grpo"


STAGE = GRPO()
