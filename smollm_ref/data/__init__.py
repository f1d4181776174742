"""Training data: a data spec -> a stream of documents -> a token store (tokenised once, by several
processes, into memory-mapped shards) -> windows read in a seeded order.

    sources   data specs (stdlib, files, .jsonl, hf:PATH[:CONFIG][@SPLIT], a prepared store), streamed;
              chat records (stdlib-chat, .jsonl or hf: with `messages`), preference records (stdlib-preferences, ...)
    conversations  chat data for fine-tuning: encoded, held out, packed into rows
    preferences    preference pairs (prompt, chosen, rejected) for DPO: encoded and cut as TRL does, held out
    stdlib_chat    the embedded chat set
    stdlib_preferences  the embedded preference set (built on the chat set's questions)
    store     token stores: their format, `Store` (opened, verified, memory-mapped)
    tokenise  `prepare` a token store (parallel, bounded memory, resumable), the trainer's cache
    batches   the validation split, windows of seq_len + 1 tokens, their order

`python -m smollm_ref.data prepare SPEC --out DIR` builds a store; `--data DIR` trains from it. Every
other spec goes through the same `prepare` into a store under the cache, so there is one path.
"""

from .batches import Order, Split, Windows, split_tokens
from .sources import (
    CHAT_DATA,
    DEFAULT_DATA,
    FORMAT_VERSION,
    PREFERENCE_DATA,
    DataError,
    HFSpec,
    iter_documents,
    iter_records,
    looks_like_chat,
    read_documents,
    source_key,
)
from .store import ShardedTokens, Store, is_store, separator_id, token_dtype, tokenizer_fingerprint
from .tokenise import DEFAULT_SHARD_TOKENS, cached_store, prepare, prepare_or_open, store_dir

__all__ = [
    "CHAT_DATA",
    "iter_records",
    "looks_like_chat",
    "DEFAULT_DATA",
    "DEFAULT_SHARD_TOKENS",
    "FORMAT_VERSION",
    "PREFERENCE_DATA",
    "DataError",
    "HFSpec",
    "Order",
    "ShardedTokens",
    "Split",
    "Store",
    "Windows",
    "cached_store",
    "is_store",
    "iter_documents",
    "prepare",
    "prepare_or_open",
    "read_documents",
    "separator_id",
    "source_key",
    "split_tokens",
    "store_dir",
    "token_dtype",
    "tokenizer_fingerprint",
]
