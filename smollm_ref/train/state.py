"""The run's mutable state as one object: what a checkpoint saves and a resume restores whole.

Everything else a run needs (options, model, data) is rebuilt from the command line and the checkpoint's
files; this is what changes from step to step."""

from __future__ import annotations

from dataclasses import dataclass

from .. import checkpoint

FORMAT = 1


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all ranks
    data_position: int = 0  # sequences consumed in the window order, all ranks
    horizon: int = 0  # the learning-rate schedule's horizon (kept when a run is extended)
    wandb_run_id: str | None = None
    data_key: str = ""  # the token store the position refers to
    data_budget: int | None = None  # the token budget a streamed spec was read to (the store's identity with the spec)
    data_split: dict | None = None  # rows to train and hold out, and a checksum of the held-out ones (Objective.split_digest)

    def advance(self, rows: int, tokens: int) -> None:
        """One step done: `rows` more of the data order read (all ranks), `tokens` more tokens trained on."""
        self.step += 1
        self.data_position += rows
        self.tokens += tokens

    def to_checkpoint(self, schedule: dict, world_size: int, fsdp: bool, global_batch: int, val_rows: int) -> dict:
        """The plain values of `trainer_state.pt` (format 1), RNG states included; the optimizer and scaler
        states are added by the checkpointer. `global_batch`: rows a step, all ranks (processes x --batch-size x
        --grad-accum), and `val_rows`: held-out rows a validation reads, all ranks; what a resume on another number
        of processes keeps."""
        return {
            "format": FORMAT,
            "step": self.step,
            "tokens": self.tokens,
            "data_position": self.data_position,
            "data_key": self.data_key,
            "data_budget": self.data_budget,
            "data_split": self.data_split or {},
            "schedule": {**schedule, "horizon": self.horizon},
            "rng": checkpoint.rng_state(),
            "wandb_run_id": self.wandb_run_id or "",
            "world_size": world_size,
            "global_batch": global_batch,
            "val_rows": val_rows,
            "fsdp": fsdp,
        }

    @staticmethod
    def check_saved(saved: dict, where) -> None:
        """Raise ValueError (one line naming `where`, the checkpoint) when the run state `saved` holds a count that
        is not a whole number in range: a step, token count or position below 0, a horizon or budget below 1."""
        schedule = saved.get("schedule")
        values = {
            "step": (saved.get("step"), 0),
            "tokens": (saved.get("tokens"), 0),
            "data_position": (saved.get("data_position"), 0),
            "schedule.horizon": (schedule.get("horizon") if isinstance(schedule, dict) else None, 1),
        }
        if saved.get("data_budget") is not None:
            values["data_budget"] = (saved["data_budget"], 1)
        for name, (value, low) in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"checkpoint {where} holds {name} {value!r} in its run state, not an integer >= {low}; resume from "
                    "another checkpoint"
                )

    @classmethod
    def from_checkpoint(cls, saved: dict, horizon: int) -> RunState:
        """The state `saved` recorded. `horizon` is this invocation's; the caller decides whether the saved one
        wins. RNG states are restored separately (`checkpoint.set_rng_state(saved["rng"])`)."""
        return cls(
            step=int(saved["step"]),
            tokens=int(saved["tokens"]),
            data_position=int(saved["data_position"]),
            horizon=horizon,
            wandb_run_id=saved.get("wandb_run_id") or None,
            data_key=str(saved.get("data_key", "")),
            data_budget=saved.get("data_budget"),
            data_split=saved.get("data_split") or None,
        )
