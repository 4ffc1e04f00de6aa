"""fastce inside other libraries' training loops. Nothing here is imported by `import fastce`.

fastce.integrations.transformers: Hugging Face transformers' causal language models
(`pip install "fastce[transformers]"`).
fastce.integrations.megatron: Megatron-core's vocab_parallel_cross_entropy (tensor parallelism).
fastce.integrations.torchtitan: torchtitan's cross-entropy loss (sum over tokens, divided by the
global count of valid tokens), on DTensor, tensor-parallel or plain logits.
"""
