"""Names shared by the whole adapter: the label that losses skip and the image placeholder in text."""

IGNORE_INDEX = -100
"""Label value that `torch.nn.CrossEntropyLoss` (and every Hugging Face causal LM) skips."""

IMAGE_TOKEN = "<image>"
"""The placeholder written in conversations; each one is replaced by one image's visual tokens."""
