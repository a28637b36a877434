"""The decoder-only transformer shared by the Llama, Mistral and Qwen families."""
