"""The query tokenizer: the generator's own text tokenizer, or a byte-level one when none is at hand.

Q-DOVE embeds the query with the generator's embedding table, so the ids must come from the tokenizer
the generator was trained with (Pythia's for `from_components`). Presets built from config alone get a
byte-level tokenizer: 256 byte ids plus specials, needs no training and no download, and its ids fit
any generator vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"


def byte_level_text_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab[PAD_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)


def prepare_query_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding keeps every query flush against the timestep slots; a pad token is added if missing."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"
    return tokenizer


def load_text_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(directory)`, with a damaged file named instead of a bare parse error.

    The libraries report a corrupt `tokenizer.json` as "Expecting ',' delimiter: line 1 column 6" or a
    Rust panic message, naming no file; each JSON file of the folder is checked to say which one it is.
    """
    directory = Path(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
            raise ValueError(
                f"text tokenizer file {path} is not valid JSON{where}: {err}; restore it or save the model again"
            ) from err
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # tokenizers raises plain Exceptions from Rust
        raise ValueError(f"could not load the text tokenizer in {directory}: {type(err).__name__}: {err}") from err
