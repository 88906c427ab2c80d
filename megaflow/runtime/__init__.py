"""Process setup and the CPU compatibility layer for megatron-core."""
