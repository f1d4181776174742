"""GGUF files (llama.cpp's format): the metadata read and checked key by key against what the model here
computes (anything else is refused, not ignored), the config and transformers tensor names derived from it,
and the tensors dequantised to float32 with llama.cpp's q/k row order undone."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..storage import is_int, shown
from .sources import SourceError
from .tensors import check_fits_memory, check_regular, check_shapes, reading

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_value(field, decode_arrays: bool):
    """A metadata field's value as Python: a number, bool or string, or a list of them for an array (left as
    `...` unless `decode_arrays`: a tokenizer's vocabulary is tens of thousands of entries nothing here reads)."""
    kinds = [t.name for t in field.types]
    if kinds and kinds[0] == "ARRAY":
        if not decode_arrays:
            return ...
        if kinds[1:] == ["STRING"]:
            return [bytes(field.parts[i]).decode(errors="replace") for i in field.data]
        return [field.parts[i].item() for i in field.data]
    value = field.parts[field.data[0]]
    if kinds == ["STRING"]:
        return bytes(value).decode(errors="replace")
    return value.item()


def gguf_metadata(reader) -> dict[str, object]:
    """Every metadata key of a GGUF file (a `gguf.GGUFReader`) with its value; tokenizer arrays as `...`."""
    return {key: _gguf_value(field, not key.startswith("tokenizer.")) for key, field in reader.fields.items()}


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers' rotate_half wants the two halves
    of each head contiguous. Undo llama.cpp's permutation (rows of head h: pairs (2i, 2i+1) -> (i, i+D/2))."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open_gguf(path: Path):
    """(config, transformers name of each tensor, the reader's tensors, their shapes) of a GGUF file: its
    metadata and tensor shapes read and checked against each other, no tensor data read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise SourceError("reading .gguf files needs the `gguf` package: pip install gguf") from None
    check_regular(path, "GGUF file")
    with reading(path, "GGUF file"):
        reader = GGUFReader(str(path))
        metadata = gguf_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    config, keys = gguf_config(metadata, shapes, path)
    check_shapes(config, {keys[n]: shape for n, shape in shapes.items()}, path)
    return config, keys, tensors, shapes


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a llama GGUF file, from its metadata and tensor shapes (`gguf_config`, `check_shapes`);
    no tensor is read or dequantised. Raises SourceError (one line) as `read_gguf` does."""
    return _open_gguf(Path(path))[0]


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 state dict of a llama-architecture GGUF file (any quantisation gguf can dequantise).
    Raises SourceError (one line) for metadata that asks for something the model does not compute
    (`gguf_config`) and for tensors that do not fit it, before any tensor is dequantised."""
    from gguf import dequantize

    config, keys, tensors, shapes = _open_gguf(path)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    check_fits_memory(config)
    state = {}
    for name, t in tensors.items():
        with reading(path, "GGUF file"):
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).to(torch.float32)
        w = w.reshape(shapes[name]) if len(shapes[name]) > 1 else w.reshape(-1)
        if ".attn_q." in name:
            w = _unpermute_rope(w, heads)
        elif ".attn_k." in name:
            w = _unpermute_rope(w, kv_heads)
        state[keys[name]] = w
    return config, state


# What llama.cpp's llama architecture reads from `llama.*` keys beyond the sizes: each key's values that
# leave the computation as the model here does it (llama.cpp treats 0 as "not set" for its scales), and
# what any other value asks for. A `llama.*` key in neither this table nor `_GGUF_READ` is refused.
_GGUF_NEUTRAL = {
    "rope.scaling.attn_factor": ((0.0, 1.0), "RoPE scaling's attention factor"),
    "expert_count": ((0,), "mixture-of-experts layers"),
    "expert_used_count": ((0,), "mixture-of-experts layers"),
    "attention.causal": ((True,), "non-causal attention"),
    "use_parallel_residual": ((False,), "parallel attention and MLP residuals"),
    "attention.clamp_kqv": ((0.0,), "clamping of the q/k/v projections"),
    "attention.max_alibi_bias": ((0.0,), "ALiBi position biases"),
    "attention.sliding_window": ((0,), "sliding-window attention"),
    "attn_logit_softcapping": ((0.0,), "attention logit softcapping"),
    "final_logit_softcapping": ((0.0,), "final logit softcapping"),
    "router_logit_softcapping": ((0.0,), "router logit softcapping"),
    "logit_scale": ((0.0, 1.0), "scaled logits"),
    "embedding_scale": ((0.0, 1.0), "scaled embeddings"),
    "residual_scale": ((0.0, 1.0), "scaled residual branches"),
    "pooling_type": ((0,), "pooled (embedding-model) outputs"),
}
# Keys that are read into the config, or that describe a RoPE scaling only when one is asked for.
_GGUF_READ = frozenset(
    {
        "vocab_size",
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "attention.layer_norm_rms_epsilon",
        "attention.scale",
        "rope.freq_base",
        "rope.dimension_count",
        "rope.scaling.type",  # with rope.scaling.factor: checked together
        "rope.scaling.factor",
        "rope.scaling.original_context_length",
        "rope.scaling.finetuned",
        "tensor_data_layout",
    }
)
# Namespaces that carry no architecture: names, licences, the tokenizer, how the file was quantised.
_GGUF_HARMLESS = ("GGUF.", "general.", "tokenizer.", "quantize.")
# The key each config field is read from, to name it when its value is refused.
_GGUF_SOURCE = {
    "intermediate_size": "llama.feed_forward_length",
    "num_hidden_layers": "llama.block_count",
    "num_attention_heads": "llama.attention.head_count",
    "num_key_value_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length",
    "max_position_embeddings": "llama.context_length",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "rope_theta": "llama.rope.freq_base",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def _gguf_same(value, neutral) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, str):
        return value == neutral
    return isinstance(value, (int, float)) and value == neutral


def _gguf_one(metadata: dict, key: str, where, default=None):
    """A size that llama.cpp lets be one value per layer: every layer must have the same one here."""
    value = metadata.get(key, default)
    if isinstance(value, list):
        if not value or any(not _gguf_same(v, value[0]) for v in value):
            raise SourceError(f"{where}: GGUF key {key} = {shown(value)} varies by layer; every layer must be the same here")
        value = value[0]
    return value


def gguf_config(metadata: dict, shapes: dict[str, tuple[int, ...]], where) -> tuple[ModelConfig, dict[str, str]]:
    """The config a llama GGUF file describes, from its metadata (`gguf_metadata`) and its tensors' shapes
    (transformers order, outermost first), and each tensor's transformers name. Raises SourceError, one line
    naming the key and its value, for every key or tensor that asks for what the model does not compute:
    RoPE scaling, sliding windows, experts, softcapping, ALiBi, partial RoPE, a LayerNorm, unknown keys."""
    _check_keys(metadata, where)
    keys = _tensor_names(shapes, where)
    vocab, hidden, heads, head_dim = _check_sizes(metadata, shapes, where)
    layer = "blk.0."
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_gguf_one(metadata, "llama.feed_forward_length", where),
        num_hidden_layers=metadata["llama.block_count"],
        num_attention_heads=heads,
        num_key_value_heads=_gguf_one(metadata, "llama.attention.head_count_kv", where, heads),
        head_dim=head_dim,
        max_position_embeddings=metadata["llama.context_length"],
        rms_norm_eps=metadata["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=metadata.get("llama.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias=f"{layer}attn_q.bias" in shapes,
        mlp_bias=f"{layer}ffn_gate.bias" in shapes,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    try:
        return ModelConfig(**fields), keys
    except ValueError as e:
        field = str(e).removeprefix("ModelConfig.").split(" ", 1)[0]
        source = _GGUF_SOURCE.get(field)
        named = f"GGUF key {source} = {shown(metadata[source])}: " if source in metadata else ""
        raise SourceError(f"{where}: {named}{e}") from None


def _check_keys(metadata: dict, where) -> None:
    """Refuse a file that is not one whole llama model, and every metadata key that asks for what the model
    does not compute (RoPE scaling, LayerNorm, an unknown key): `gguf_config`'s first check."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise SourceError(f"{where} holds a {arch!r} model; only the llama architecture (SmolLM2) is supported")
    if metadata.get("general.type", "model") != "model":
        raise SourceError(f"{where} is a GGUF {metadata['general.type']!r} file, not a model; give a model's .gguf")
    if _gguf_one(metadata, "split.count", where, 1) not in (0, 1):
        raise SourceError(
            f"{where} is one part of a GGUF split into {metadata['split.count']} files; merge them first "
            "(llama-gguf-split --merge) and give the merged file"
        )
    # llama.cpp scales linearly by default once a factor is given, whatever the type says (or without one)
    scaling = {k: metadata[k] for k in ("llama.rope.scaling.type", "llama.rope.scaling.factor") if k in metadata}
    kind, factor = scaling.get("llama.rope.scaling.type", "none"), scaling.get("llama.rope.scaling.factor", 0.0)
    if kind not in ("none", "linear") or not (_gguf_same(factor, 0.0) or _gguf_same(factor, 1.0)):
        named = ", ".join(f"{k} = {shown(v)}" for k, v in scaling.items())
        raise SourceError(
            f"{where}: GGUF {named} asks for RoPE scaling, which this model does not implement (plain RoPE only); "
            "use a model without it"
        )
    for key in sorted(metadata):
        if key.startswith(_GGUF_HARMLESS) or key in ("split.count", "split.no", "split.tensors.count"):
            continue
        name = key.removeprefix("llama.")
        value = metadata[key]
        if name in _GGUF_READ and key != name:
            continue
        if name in _GGUF_NEUTRAL and key != name:
            neutral, what = _GGUF_NEUTRAL[name]
            if not any(_gguf_same(value, n) for n in neutral):
                raise SourceError(
                    f"{where}: GGUF key {key} = {shown(value)} asks for {what}, which this model does not implement; "
                    "use a model without it"
                )
            continue
        if name == "attention.layer_norm_epsilon":
            raise SourceError(
                f"{where}: GGUF key {key} = {shown(value)} describes LayerNorm; the llama architecture here uses "
                "RMSNorm (llama.attention.layer_norm_rms_epsilon)"
            )
        raise SourceError(
            f"{where}: GGUF key {key} = {shown(value)} is not one this llama model reads, and it may change what "
            "the model computes; refused rather than ignored"
        )


def _tensor_names(shapes: dict[str, tuple[int, ...]], where) -> dict[str, str]:
    """Each GGUF tensor's transformers name; a tensor with no place in the model is refused."""
    keys = {}
    for name in shapes:
        stem, _, suffix = name.rpartition(".")
        part = stem.split(".", 2)[2] if stem.startswith("blk.") and stem.count(".") >= 2 else stem
        if part not in _GGUF_NAMES or suffix not in ("weight", "bias"):
            what = " (per-frequency RoPE factors: Llama 3.1's RoPE scaling)" if stem == "rope_freqs" else ""
            raise SourceError(f"{where}: GGUF tensor {name}{what} has no place in this llama model; it is not implemented")
        prefix = f"model.layers.{stem.split('.')[1]}." if stem.startswith("blk.") else ""
        keys[name] = f"{prefix}{_GGUF_NAMES[part]}.{suffix}"
    return keys


def _check_sizes(metadata: dict, shapes: dict[str, tuple[int, ...]], where) -> tuple[int, int, object, object]:
    """(vocab, hidden, heads, head_dim) from the embedding's shape and the metadata, each checked against the
    other: the keys every llama file has, and no head size, partial RoPE or attention scale the model lacks."""
    if len(shapes.get("token_embd.weight", ())) != 2:
        raise SourceError(f"{where} has no two-dimensional token_embd.weight tensor; it is not a llama model")
    vocab, hidden = shapes["token_embd.weight"]
    for key, actual in (("llama.vocab_size", vocab), ("llama.embedding_length", hidden)):
        if key in metadata and not _gguf_same(metadata[key], actual):
            raise SourceError(f"{where}: GGUF key {key} = {shown(metadata[key])} but token_embd.weight is {vocab} x {hidden}")
    for key in ("llama.block_count", "llama.feed_forward_length", "llama.attention.head_count", "llama.context_length"):
        if key not in metadata:
            raise SourceError(f"{where} lacks the GGUF key {key}; it is not a complete llama model file")
    if "llama.attention.layer_norm_rms_epsilon" not in metadata:
        raise SourceError(f"{where} lacks the GGUF key llama.attention.layer_norm_rms_epsilon (RMSNorm's epsilon)")
    heads = _gguf_one(metadata, "llama.attention.head_count", where)
    head_dim = metadata.get("llama.attention.key_length")
    if head_dim is None and is_int(heads) and heads > 0:
        head_dim = hidden // heads if hidden % heads == 0 else None
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if key in metadata and not _gguf_same(metadata[key], head_dim):
            what = "partial RoPE" if key.endswith("dimension_count") else "values of another width than keys"
            raise SourceError(
                f"{where}: GGUF key {key} = {shown(metadata[key])} differs from the head size {head_dim}: {what} is not implemented"
            )
    scale = metadata.get("llama.attention.scale", 0.0)
    if not _gguf_same(scale, 0.0) and not (
        isinstance(head_dim, int) and isinstance(scale, float) and abs(scale * head_dim**0.5 - 1) < 1e-6
    ):
        raise SourceError(
            f"{where}: GGUF key llama.attention.scale = {shown(scale)} asks for an attention scale other than 1/sqrt(head_dim), "
            "which this model does not implement"
        )
    return vocab, hidden, heads, head_dim
