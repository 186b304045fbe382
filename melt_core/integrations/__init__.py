"""melt models inside other tools: Hugging Face transformers (``hf``, which ``autoregister`` imports
once transformers' auto classes are imported) and lm-evaluation-harness (``lm_eval_model``, needs the
``melt[eval]`` extra)."""
