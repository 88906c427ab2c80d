"""Hugging Face <-> megaflow weight conversion (the HF interop issue brings it)."""
