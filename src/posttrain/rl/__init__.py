"""Online reinforcement learning: reward sources (rewards.py); the ppo and grpo stages build on them."""
