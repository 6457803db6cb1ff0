"""GPT-1's special tokens and the smallest vocabulary that holds them: what a config is checked against, kept
apart from the tokenizer (and `tokenizers`) so that loading a config imports neither."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|start|>", "<|delim|>", "<|extract|>")
BYTE_ALPHABET = 256
SMALLEST_VOCAB = BYTE_ALPHABET + len(SPECIAL_TOKENS)  # every byte and the special tokens
