"""melt models inside other tools: Hugging Face transformers (``hf``) and lm-evaluation-harness
(``lm_eval_model``, needs the ``melt[eval]`` extra)."""
