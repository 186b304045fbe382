"""The file names of a Hugging Face checkpoint directory that melt reads and writes."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Copied along with the weights when a checkpoint is rewritten (never the remote-code .py files).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Everything a checkpoint needs: what a Hub download fetches.
CHECKPOINT_FILES = (CONFIG_NAME, "*.safetensors", INDEX_NAME, *TOKENIZER_FILES)
