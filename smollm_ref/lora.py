"""LoRA through peft on smollm_ref's own `LlamaForCausalLM`: adapters injected in place, saved and read in peft's own
format, turned off for a reference, merged into the weights.

    spec = LoraSpec(rank=8, alpha=16)             what the adapters are: rank, alpha, dropout, target linears
    attach(model, spec)                           base frozen, adapters on the targets (B = 0: the model is unchanged)
    with adapters_disabled(model): ...            the base model under the adapters (DPO's reference, no copy)
    save(model, spec, base, directory)            config.json, adapter_config.json + adapter_model.safetensors, lora_base.json
    merge(model)                                  W + (alpha / rank) B A in each adapted linear, the adapters removed

The adapters are peft's (`peft.inject_adapter_in_model`), not a copy of them: the model keeps its class, forward,
KV cache and config, so the trainer's step, validation and samples run it as they run any model; only the adapted
linears change, into peft's `lora.Linear` around the original `nn.Linear` (`...q_proj.base_layer.weight`,
`...q_proj.lora_A.default.weight`). The module names are transformers' (`model.layers.N.self_attn.q_proj`), so the
saved adapter has exactly the keys `peft.PeftModel.save_pretrained` writes for transformers' `LlamaForCausalLM`
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`), and `PeftModel.from_pretrained` loads it there.

A LoRA checkpoint holds the adapter, not the base weights: `lora_base.json` records the base's source (`--init-from`
as the run took it, and the local files it named) and a SHA-256 of its weights (`weights_digest`), so a resume,
`generate` and the demo rebuild base + adapter (`smollm_ref.weights.load_checkpoint`) and refuse another base.

peft is imported inside the functions that need it: a run without LoRA never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from . import storage

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear of a decoder layer
ADAPTER_CONFIG = "adapter_config.json"  # peft's names
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "lora_base.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel's state dict puts before the model's own names


class LoraError(ValueError):
    """A LoRA setting or an adapter that cannot be used; the message is one line saying why."""


def targets_rule(value: str) -> str | None:
    """None when `value` is comma-separated `TARGETS`, each once; else what it must be (an options `check`)."""
    names = [name.strip() for name in value.split(",")]
    if all(names) and set(names) <= set(TARGETS) and len(set(names)) == len(names):
        return None
    return f"comma-separated linears of the decoder layers, each at most once, from {','.join(TARGETS)}"


def _in_layer_order(names) -> tuple[str, ...]:
    """`names` as `TARGETS` orders them (peft saves its targets as a set, in no order); unknown names after, kept."""
    return tuple(sorted(names, key=lambda name: TARGETS.index(name) if name in TARGETS else len(TARGETS)))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters: rank r, scale alpha / r, dropout on their input (a probability in [0, 1)), and the linears of
    every decoder layer they adapt (`TARGETS`' names). ValueError (LoraError) for a value outside those."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"a LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LoraError(f"a LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise LoraError(f"a LoRA dropout must be a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.targets, tuple) or (rule := targets_rule(",".join(self.targets))) is not None:
            raise LoraError(f"LoRA targets must be {rule or 'a tuple of names'}, got {self.targets!r}")

    @classmethod
    def from_options(cls, options) -> LoraSpec | None:
        """The spec of a run's `cfg.lora` (`LoraOptions`), None at --lora-rank 0 (no LoRA). Alpha defaults to 2 x rank."""
        if not options.lora_rank:
            return None
        alpha = options.lora_alpha if options.lora_alpha is not None else 2 * options.lora_rank
        targets = [name.strip() for name in options.lora_targets.split(",")]
        return cls(options.lora_rank, float(alpha), float(options.lora_dropout), _in_layer_order(targets))

    @classmethod
    def read(cls, directory: Path) -> LoraSpec | None:
        """The spec of the adapter in `directory` (its adapter_config.json), None when it holds none; LoraError
        (one line) for a config that is not a LoRA adapter of this module's kind."""
        path = Path(directory) / ADAPTER_CONFIG
        if not path.exists():
            return None
        try:
            raw = storage.read_small_json(path, "adapter config")
            if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
                raise LoraError(f"{path} is not a LoRA adapter's config (peft_type {raw.get('peft_type')!r})")
            targets = raw["target_modules"]
            targets = [targets] if isinstance(targets, str) else targets
            return cls(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout", 0.0)), _in_layer_order(targets))
        except (KeyError, TypeError, ValueError) as e:
            raise LoraError(f"{path} is not a readable LoRA adapter config ({type(e).__name__}: {e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def same_adapter(self, other: LoraSpec) -> bool:
        """The same adapter's shape and scale (rank, alpha, targets); the dropout may differ, as the learning rate may."""
        return (self.rank, self.alpha, set(self.targets)) == (other.rank, other.alpha, set(other.targets))

    def describe(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha:g}, dropout {self.dropout:g}, on {','.join(self.targets)}"

    def peft_config(self, base_model_name_or_path: str | None = None):
        """peft's `LoraConfig` of this spec, for a causal LM (what PeftModel.from_pretrained builds from it)."""
        from peft import LoraConfig

        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return LoraConfig(
            r=self.rank,
            lora_alpha=alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
        )


@dataclasses.dataclass(frozen=True)
class Base:
    """The weights a LoRA run adapts, as its checkpoints record them (lora_base.json): `source` as the run took it
    (--init-from), `path` the local files it named (absolute; a training run: the checkpoint it picked), None for a
    Hub id or pypi:, and `sha256` their `weights_digest`."""

    source: str
    path: str | None
    sha256: str

    def where(self) -> str:
        """Where to read the base again: the recorded local path while it exists, else the source as given."""
        return self.path if self.path is not None and Path(self.path).exists() else self.source

    def write(self, directory: Path) -> None:
        text = json.dumps({**dataclasses.asdict(self), "weights": "sha256 of smollm_ref.lora.weights_digest"}, indent=2)
        (Path(directory) / BASE_RECORD).write_text(text + "\n")

    @classmethod
    def read(cls, directory: Path) -> Base:
        path = Path(directory) / BASE_RECORD
        try:
            raw = storage.read_small_json(path, "LoRA base record")
            return cls(str(raw["source"]), None if raw["path"] is None else str(raw["path"]), str(raw["sha256"]))
        except FileNotFoundError:
            raise LoraError(f"LoRA checkpoint {directory} has no {BASE_RECORD}: it does not say which base it adapts") from None
        except (KeyError, TypeError, ValueError) as e:
            raise LoraError(f"{path} is not a readable LoRA base record ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA run's adapter: what it is (`spec`), the weights it adapts (`base`), and the adapter weights it starts
    from (`state`, peft's names: a resumed run's; None: peft's initialisation)."""

    spec: LoraSpec
    base: Base
    state: dict[str, torch.Tensor] | None = None


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a plain model's state dict (`LlamaForCausalLM.state_dict()`, no adapters): each tensor's name,
    dtype, shape and bytes, by name. Two loads of the same base give the same digest, any changed weight another."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    return h.hexdigest()


def _tuner_layer():
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def adapted(model: torch.nn.Module) -> bool:
    """Whether `model` holds peft adapter layers. Without peft imported no model can, so this imports nothing."""
    if "peft" not in sys.modules:
        return False
    layer = _tuner_layer()
    return any(isinstance(m, layer) for m in model.modules())


def attach(model: torch.nn.Module, spec: LoraSpec, state: dict[str, torch.Tensor] | None = None) -> int:
    """Inject `spec`'s adapters into `model` in place (`peft.inject_adapter_in_model`) and freeze everything else;
    `state` (an adapter's tensors in peft's saved format, `read_adapter`) sets their weights, else they start as
    peft starts them (A Kaiming-uniform, B zero: the model computes what it computed). Returns the number of
    trainable parameters, rank x (in + out) summed over the adapted linears. The adapters take the dtype and
    device of the linears they adapt. LoraError when `state` does not fit."""
    from peft.functional import inject_adapter_in_model

    if adapted(model):
        raise LoraError("the model already holds adapters; attach one LoRA adapter to a plain model")
    inject_adapter_in_model(spec.peft_config(), model)
    if state is not None:
        load_adapter_state(model, state)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names `peft.PeftModel.save_pretrained` writes for transformers' model
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...), detached, on the CPU, contiguous."""
    from peft.functional import get_peft_model_state_dict

    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the adapter's weights from `state` (`adapter_state`'s names); LoraError unless every adapter weight of
    the model is given, with its shape, and nothing else."""
    from peft.functional import set_peft_model_state_dict

    own = adapter_state(model)
    plain = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        said = [f"{what} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "") for what, names in
                (("lacks", missing), ("has an unexpected", extra), ("has another shape for", shapes)) if names]  # fmt: skip
        raise LoraError(f"the adapter does not fit the model's LoRA layers: it {'; '.join(said)}")
    result = set_peft_model_state_dict(model, plain)
    if getattr(result, "unexpected_keys", None):
        raise LoraError(f"peft did not place the adapter's {result.unexpected_keys[0]}")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """A context in which `model` computes its base alone: each peft layer's adapters off (peft's own
    `enable_adapters(False)`, what `PeftModel.disable_adapter` does), on again after. A model without adapters
    runs as it is."""
    if not adapted(model):
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, _tuner_layer())]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # also makes the adapters trainable again


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters into the weights they adapt (peft's `merge`: W + scale B A, in the weights' dtype) and put
    each plain linear back in its place: the model holds no adapter after, and computes what it computed with it
    (to the rounding of the merge). Returns `model`."""
    layer_kind = _tuner_layer()
    for name, module in list(model.named_modules()):
        if isinstance(module, layer_kind):
            module.merge(safe_merge=True)  # refuses a merge that makes a weight non-finite
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def read_adapter(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of `directory`'s adapter_model.safetensors (peft's names), on the CPU."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        return load_file(path)
    except FileNotFoundError:
        raise LoraError(f"LoRA checkpoint {directory} has no {ADAPTER_WEIGHTS}") from None
    except Exception as e:  # safetensors raises its own error classes for a damaged file
        raise LoraError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None


def save(model: torch.nn.Module, spec: LoraSpec, base: Base, directory: Path) -> None:
    """Write the adapter of `model` into `directory` as peft saves one (adapter_config.json with the base's source as
    `base_model_name_or_path`, adapter_model.safetensors), the base's record (lora_base.json) and the model's
    config.json (the base's: what smollm_ref reads the model's shape from)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    spec.peft_config(base.source).save_pretrained(directory)  # peft writes adapter_config.json
    save_file(adapter_state(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    storage.follow_umask(directory / ADAPTER_WEIGHTS)
    base.write(directory)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")


def resume_problem(spec: LoraSpec | None, directory: Path) -> str | None:
    """Why a run with `spec` (None: without LoRA) cannot resume checkpoint `directory`, or None when it can: the
    checkpoint's adapter (or its whole model) must be what the run trains."""
    saved = LoraSpec.read(directory)
    if saved is None and spec is None:
        return None
    if saved is None:
        return (
            f"checkpoint {directory} is of a run without LoRA (it holds the whole model), so --lora-rank {spec.rank} cannot "
            f"resume it; resume it without LoRA options, or start a LoRA run on its weights with --init-from {directory}"
        )
    if spec is None:
        return (
            f"checkpoint {directory} holds a LoRA adapter ({saved.describe()}), not the whole model: resume it with LoRA "
            f"(a resume takes the run's own LoRA options when --lora-rank is not given), or start a run from base and "
            f"adapter merged with --init-from {directory}"
        )
    if not spec.same_adapter(saved):
        return (
            f"checkpoint {directory} holds a LoRA adapter of {saved.describe()}, not {spec.describe()}: resume it with the "
            f"run's own --lora-rank, --lora-alpha and --lora-targets (leave them out to take them from the run), or start "
            f"a new run from base and adapter merged with --init-from {directory}"
        )
    return None
