"""Typed, validated model configuration, read from and written to transformers' `config.json`.

The field names and meanings are those of transformers' `LlamaConfig`, so every preset under
`smollm_ref/configs/models/` is a valid transformers config and every SmolLM2 `config.json` on the Hub reads here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .configs import preset_names, preset_path
from .storage import BadFile, is_int, read_small_json, shown

# Keys that appear in real Llama/SmolLM2 config.json files and carry no architecture: they are
# accepted on read and never silently change the model. Anything else unknown is an error.
_METADATA_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_name_or_path",
        "_model_name_or_path",
        "is_llama_config",  # nanotron export artefact in SmolLM2's own config.json
        "quantization_config",  # present when transformers read a GGUF file
        "transformers.js_config",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


_FLOAT_FIELDS = frozenset({"initializer_range", "rms_norm_eps", "rope_theta", "attention_dropout"})
_BOOL_FIELDS = frozenset({"tie_word_embeddings", "attention_bias", "mlp_bias"})
_OPTIONAL_INT_FIELDS = frozenset({"head_dim", "bos_token_id", "eos_token_id", "pad_token_id"})


_MAX_SIZE = 2**31 - 1  # GGUF and llama.cpp keep sizes in 32 bits; nothing real comes near it
_FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32
_FLOAT32_MAX = 3.4028234663852886e38


def _show(value) -> str:
    """A value for a one-line error: its repr, cut short (a config.json field can be any size)."""
    return f"{shown(value)} ({type(value).__name__})"


def _same(value, neutral) -> bool:
    """`value == neutral` with JSON's types kept apart (true is not 1, 1 is 1.0)."""
    if isinstance(value, bool) or isinstance(neutral, bool) or value is None or neutral is None:
        return value is neutral
    if isinstance(neutral, (int, float)):
        return isinstance(value, (int, float)) and value == neutral
    return type(value) is type(neutral) and value == neutral


# Keys of transformers configs (of Llama and of its relatives) that change the computation unless they hold
# their neutral value: (neutral values, what the key asks for). Neutral values are accepted and dropped.
_NEUTRAL = {
    "pretraining_tp": ((1,), "the model's projections are not split into pretraining_tp slices"),
    "rope_interleaved": ((False,), "SmolLM2 uses the rotate_half RoPE layout, not the interleaved one"),
    "partial_rotary_factor": ((1,), "RoPE is applied to the whole head (partial_rotary_factor 1)"),
    "sliding_window": ((None, 0), "sliding-window attention is not implemented; every position sees all earlier ones"),
    "use_sliding_window": ((False,), "sliding-window attention is not implemented"),
    "attn_logit_softcapping": ((None,), "attention logit softcapping is not implemented"),
    "final_logit_softcapping": ((None,), "final logit softcapping is not implemented"),
    "num_local_experts": ((None, 0, 1), "mixture-of-experts layers are not implemented"),
    "num_experts": ((None, 0, 1), "mixture-of-experts layers are not implemented"),
    "num_experts_per_tok": ((None, 0, 1), "mixture-of-experts layers are not implemented"),
    "use_qk_norm": ((False,), "query/key normalisation is not implemented"),
    "qk_layernorm": ((False,), "query/key normalisation is not implemented"),
    "embedding_multiplier": ((1,), "embeddings are not scaled"),
    "logits_scaling": ((1,), "logits are not scaled"),
    "residual_multiplier": ((1,), "residual branches are not scaled"),
    "attention_multiplier": ((None,), "attention is scaled by 1/sqrt(head_dim) only"),
    "layer_types": ((), "every layer is full causal attention"),  # neutral: a list of "full_attention" only
}

_ROPE_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


def _default_rope(key: str, rope) -> float | None:
    """The rope_theta of a `rope_parameters` / `rope_scaling` value that asks for the plain RoPE the model
    implements (None when it gives none); ValueError naming the entry for anything else."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"config {key} must be an object or null, got {_show(rope)}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(
            f"config {key} type {shown(kind)} is not supported; only the default RoPE is implemented (no RoPE scaling)"
        )
    for name in sorted(str(k) for k in rope):
        if name not in _ROPE_KEYS:
            raise ValueError(f"config {key}.{name}={shown(rope[name])} is not supported with the default RoPE; remove it")
    if "partial_rotary_factor" in rope and not _same(rope["partial_rotary_factor"], 1):
        raise ValueError(
            f"config {key}.partial_rotary_factor={shown(rope['partial_rotary_factor'])} is not supported; "
            "RoPE is applied to the whole head"
        )
    return rope.get("rope_theta")


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-architecture decoder, as transformers' `LlamaConfig` describes it."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        self._check_types()
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
                raise ValueError(f"ModelConfig.{name} must be an integer in [1, {_MAX_SIZE}], got {_show(value)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"ModelConfig.num_attention_heads ({self.num_attention_heads}) must divide "
                    f"hidden_size ({self.hidden_size}), or head_dim must be given"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        elif not 0 < self.head_dim <= _MAX_SIZE:
            raise ValueError(f"ModelConfig.head_dim must be an integer in [1, {_MAX_SIZE}], got {_show(self.head_dim)}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"ModelConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        # The model computes in float32 at most: a value that float32 rounds to 0 or infinity gives NaNs.
        if not _FLOAT32_TINY <= self.rms_norm_eps <= _FLOAT32_MAX:
            raise ValueError(
                f"ModelConfig.rms_norm_eps must be > 0 and within float32's range (a normal float32), got {self.rms_norm_eps!r}"
            )
        if not 1.0 <= self.rope_theta <= _FLOAT32_MAX:
            # theta below 1 turns RoPE's frequencies upside down, and near 0 they overflow to infinity
            raise ValueError(f"ModelConfig.rope_theta must be >= 1 and within float32's range, got {self.rope_theta!r}")
        if not _FLOAT32_TINY <= self.initializer_range <= _FLOAT32_MAX:
            raise ValueError(
                f"ModelConfig.initializer_range must be > 0 and within float32's range, got {self.initializer_range!r}"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"ModelConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act must be 'silu' (SmolLM2's activation), got {self.hidden_act!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ModelConfig.{name} ({value}) must lie in [0, vocab_size={self.vocab_size})")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        if any(e is not None and not 0 <= e < self.vocab_size for e in eos):
            raise ValueError(f"ModelConfig.eos_token_id ({self.eos_token_id}) must lie in [0, vocab_size={self.vocab_size})")

    def _check_types(self) -> None:
        """Every field has the JSON type its annotation names (a config.json can hold anything): a one-line
        ValueError naming the field otherwise. bool is not an int here, and an int float field becomes float."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _FLOAT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"ModelConfig.{field.name} must be a finite number, got {_show(value)}")
                object.__setattr__(self, field.name, float(value))
            elif field.name in _BOOL_FIELDS:
                if not isinstance(value, bool):
                    raise ValueError(f"ModelConfig.{field.name} must be true or false, got {_show(value)}")
            elif field.name == "hidden_act":
                if not isinstance(value, str):
                    raise ValueError(f"ModelConfig.hidden_act must be a string, got {_show(value)}")
            elif field.name == "eos_token_id" and isinstance(value, list):
                if not all(is_int(v) for v in value):
                    raise ValueError(f"ModelConfig.eos_token_id must be an integer or a list of integers, got {_show(value)}")
            elif not (is_int(value) or (value is None and field.name in _OPTIONAL_INT_FIELDS)):
                what = "an integer or null" if field.name in _OPTIONAL_INT_FIELDS else "an integer"
                raise ValueError(f"ModelConfig.{field.name} must be {what}, got {_show(value)}")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameter count of `LlamaForCausalLM` for this config (a tied lm_head counted once)."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    def check_vocab(self, tokenizer_size: int) -> None:
        """Raise if a tokenizer of `tokenizer_size` tokens can produce ids the embedding lacks."""
        if self.vocab_size < tokenizer_size:
            raise ValueError(
                f"ModelConfig.vocab_size ({self.vocab_size}) is smaller than the tokenizer's {tokenizer_size} tokens; "
                "use a config with vocab_size >= the tokenizer size"
            )

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """A config from a transformers `config.json` dict. Raises ValueError (one line naming the key and
        its value) for a key that asks for something this model does not compute: another architecture,
        RoPE scaling, sliding-window attention, logit softcapping, experts, ... and for any unknown key."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a JSON object of settings, got {_show(data)}")
        data = dict(data)
        model_type = data.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config model_type must be 'llama' (a LLaMA-architecture model), got {shown(model_type)}")
        for key in sorted(k for k in data if k in _NEUTRAL):
            value = data.pop(key)
            full = key == "layer_types" and isinstance(value, list) and all(v == "full_attention" for v in value)
            if not full and not any(_same(value, neutral) for neutral in _NEUTRAL[key][0]):
                raise ValueError(f"config {key}={shown(value)} is not supported: {_NEUTRAL[key][1]}; remove the key")
        # transformers >= 5 nests theta in rope_parameters; older files use rope_theta + rope_scaling.
        for key in ("rope_parameters", "rope_scaling"):
            theta = _default_rope(key, data.pop(key, None))
            if theta is not None:
                if "rope_theta" in data and not _same(data["rope_theta"], theta):
                    raise ValueError(
                        f"config {key}.rope_theta={shown(theta)} differs from rope_theta={shown(data['rope_theta'])}; keep one"
                    )
                data["rope_theta"] = theta
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields and k not in _METADATA_KEYS)
        if unknown:
            raise ValueError(
                f"config has unknown key(s) {shown(unknown)}, which may change what the model computes; remove them "
                "or fix their spelling"
            )
        kwargs = {k: v for k, v in data.items() if k in fields}
        return cls(**kwargs)  # __post_init__ checks every value's type (rope_theta: 10000 becomes 10000.0)

    def to_dict(self) -> dict:
        """A transformers-loadable `config.json` dict (written in the pre-v5 flat style, which v5 reads too)."""
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        out.update(dataclasses.asdict(self))
        out["pretraining_tp"] = 1
        out["rope_scaling"] = None
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """The config in a transformers `config.json` file. Raises FileNotFoundError when there is none, and a
        one-line ValueError (`storage.BadFile` for the file itself) for a file that is not a small regular
        JSON file (a FIFO, a device, too large) or a config the model does not implement (`from_dict`)."""
        path = Path(path)
        try:
            data = read_small_json(path, "model config")
        except FileNotFoundError:
            raise FileNotFoundError(f"model config {path} does not exist; pass a preset name or an existing JSON file") from None
        except BadFile:
            raise
        except OSError as e:  # permission denied, a dangling link's loop, ...
            raise BadFile(
                f"model config {path} cannot be read ({e.strerror or e}); fix its permissions or give another"
            ) from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"model config {path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name_or_path: str | Path) -> ModelConfig:
        """A preset shipped in `smollm_ref/configs/models/` (e.g. `smollm2-135m`) or a config.json file. The
        config of a model source (a transformers directory, a training run or checkpoint, a .gguf) is read by
        `smollm_ref.weights.read_config`, which takes these too. Raises FileNotFoundError for a missing
        config.json, one-line ValueError (BadFile) for anything else."""
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
            raise ValueError(f"a model config is a preset name or a path to a config.json, got {_show(name_or_path)}")
        name = str(name_or_path)
        path = Path(name).expanduser()
        if path.suffix == ".json" and not path.is_dir():
            return cls.from_json(path)
        if path.is_file() and path.suffix != ".gguf":
            return cls.from_json(path)  # a config.json by another name
        if name in preset_names() and not path.exists():
            return cls.from_json(preset_path(name))
        raise ValueError(
            f"unknown model config {name!r}; choose one of {', '.join(preset_names())} or give a config.json "
            "(the config of a model directory, training run, checkpoint or .gguf: smollm_ref.weights.read_config)"
        )
