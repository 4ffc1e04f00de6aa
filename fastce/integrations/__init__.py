"""fastce inside other libraries' training loops.

fastce.integrations.transformers: Hugging Face transformers' causal language models
(`pip install "fastce[transformers]"`). Nothing here is imported by `import fastce`.
"""
