"""Stage 3b: PPO (Schulman et al. 2017) as in RLHF (Ziegler et al. 2019, InstructGPT), on the RL loop of
megaflow/algorithms/rl.py.

The reward of a response is its score at the last token minus a per-token KL penalty to the reference
(`rl.kl_penalty_coef`, fixed or adaptive with `rl.kl_target`); a critic (a scalar-head model started from
the reward model, or `rl.critic_from`) gives the values of GAE (`rl.gamma`, `rl.lam`); the actor steps on
the clipped surrogate (clip-higher, dual clip), the critic on the clipped value loss, both on the same
minibatches, and the critic is saved and resumed with the actor.
"""

from megaflow.algorithms.rl import RLStage


class PPO(RLStage):
    name = "ppo"
    summary = "PPO: GAE with a critic from the reward model, KL penalty in the reward, clipped surrogate and value loss"
    algorithm = "ppo"


STAGE = PPO()
