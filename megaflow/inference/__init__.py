"""KV-cache generation, rollouts and log-prob scoring (the SFT issue brings them)."""
