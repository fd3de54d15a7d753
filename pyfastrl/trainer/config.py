"""``GRPOConfig``: every option of the thin trainer. Where TRL 1.16's ``GRPOConfig`` has the option,
the name, the default and the meaning are TRL's (except ``max_steps``: TRL's default -1 trains for
``num_train_epochs``, which this trainer does not have); the rest are ours and say so."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from pyfastrl.kernels.grpo_loss.reference import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16", "float64")
DISTRIBUTED = ("ddp", "fsdp")
# Options that may differ between a checkpoint and the run resuming from it (they do not change the
# optimisation already done; use_prefix_tree changes how a micro-batch is stored, not what it computes).
RESUMABLE_CHANGES = ("output_dir", "max_steps", "logging_steps", "save_steps", "plot", "progress", "distributed",
                     "use_prefix_tree")
# Names an options file may still use (the GRPO ops' former argument names) -> TRL's name, for the error.
RENAMED_OPTIONS = {"eps_low": "epsilon", "eps_high": "epsilon_high", "scale": "scale_rewards",
                   "kl_estimator": "use_bias_correction_kl"}


@dataclass
class GRPOConfig:
    """Options of ``GRPOTrainer`` (TRL's names where they overlap).

    Batch shape: one rollout samples ``num_generations`` completions for each of
    ``per_device_train_batch_size * gradient_accumulation_steps / num_generations`` prompts per
    process; each optimizer step accumulates ``gradient_accumulation_steps`` micro-batches of
    ``per_device_train_batch_size`` completions, and the rollout is reused for ``num_iterations``
    optimizer steps (old log-probs are taken at rollout time when it is reused).
    """

    output_dir: str = "pyfastrl-output"
    seed: int = 42
    max_steps: int = 60  # ours: TRL's -1 means "train num_train_epochs", which this trainer has no notion of
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_generations: int = 8
    num_iterations: int = 1
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    delta: float | None = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True  # the KL term (beta > 0) times the importance ratio, as TRL
    scale_rewards: str = "group"  # also True ("group") / False ("none"), as TRL
    reward_weights: list[float] | None = None
    logging_steps: int = 10
    save_steps: int = 500  # and always the last step
    shuffle_dataset: bool = True  # False: rollouts take the dataset's rows in order (see GRPOTrainer)
    # Ours:
    max_prompt_length: int | None = 512  # keep the prompt's last tokens (TRL 1.16 has no such option)
    # The prompt once per group (pyfastrl_prefix attention) vs repeated; an LLA model has no grouped op and
    # always runs (left-padded) repeated batches (pyfastrl.trainer.attention).
    use_prefix_grouping: bool = True
    # With use_prefix_grouping: a micro-batch whose prompts share more than themselves (a conversation's
    # earlier turns, identical prompts) is stored as a prefix tree (trainer/batches.py).
    use_prefix_tree: bool = True
    backend: str = "auto"  # op backend for the loss (see pyfastrl._backend)
    dtype: str = "float32"  # model dtype
    distributed: str = "ddp"  # under torchrun: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 fully_shard)
    plot: bool = True  # write metrics.png at the end (needs matplotlib)
    progress: bool = True  # live progress bar
    extra: dict = field(default_factory=dict)  # free-form, recorded with the run

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        self.validate()

    @property
    def completions_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.completions_per_step // self.num_generations

    def validate(self) -> None:
        def fail(name, why):
            raise ValueError(f"GRPOConfig: {name} {why}, got {getattr(self, name)!r}")

        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "num_iterations",
                     "max_completion_length", "logging_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                fail(name, "must be an integer >= 1")
        if not (isinstance(self.num_generations, int) and self.num_generations >= 2):
            fail("num_generations", "must be an integer >= 2 (with one completion per prompt every GRPO "
                 "advantage is 0 and nothing is learned)")
        if self.per_device_train_batch_size % self.num_generations:
            fail("per_device_train_batch_size", f"must be a multiple of num_generations={self.num_generations} "
                 "(micro-batches hold whole groups)")
        for name in ("save_steps", "warmup_steps"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                fail(name, "must be an integer >= 0")
        for name in ("use_bias_correction_kl", "shuffle_dataset", "use_prefix_grouping", "use_prefix_tree"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be True or False")
        for name in ("learning_rate", "temperature", "adam_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                fail(name, "must be a positive number")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if self.beta < 0 or self.weight_decay < 0:
            fail("beta" if self.beta < 0 else "weight_decay", "must be >= 0")
        choices = {"loss_type": LOSS_TYPES, "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
                   "scale_rewards": ADVANTAGE_SCALES, "lr_scheduler_type": SCHEDULERS, "dtype": DTYPES,
                   "distributed": DISTRIBUTED,
                   "backend": ("auto", "torch", "triton")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: dict) -> list[str]:
        """Options (beyond RESUMABLE_CHANGES) whose value differs from ``other`` (a saved config). An
        option the saved config lacks (written before the option existed) counts as its default."""
        mine = self.to_dict()
        defaults = GRPOConfig().to_dict()
        other = {**{n: v for n, v in defaults.items() if n not in other}, **other}
        names = sorted(set(mine) | set(other))
        return [f"{n}: checkpoint {other.get(n)!r}, now {mine.get(n)!r}" for n in names
                if n not in RESUMABLE_CHANGES and mine.get(n) != other.get(n)]


def load_config_file(path: str) -> dict:
    """Options from a TOML (``.toml``), YAML (``.yaml``/``.yml``) or JSON file, checked against GRPOConfig's
    fields (an unknown name is an error naming it)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config: no such file: {path}")
    if not path.endswith((".toml", ".yaml", ".yml", ".json")):
        raise ValueError(f"--config: {path} must end in .toml, .yaml, .yml or .json")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            import tomllib

            options = tomllib.loads(raw.decode())
        elif path.endswith(".json"):
            options = json.loads(raw)
        else:
            import yaml

            options = yaml.safe_load(raw) or {}
    except Exception as error:  # the parsers' own error types (TOMLDecodeError, YAMLError, JSONDecodeError)
        raise ValueError(f"--config: cannot parse {path}: {error}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--config: {path} must hold a table of options, got {type(options).__name__}")
    renamed = sorted(set(options) & set(RENAMED_OPTIONS))
    if renamed:
        raise ValueError("--config: " + "; ".join(f"option {old!r} is now {RENAMED_OPTIONS[old]!r} (TRL's name)"
                                                   for old in renamed) + f" in {path}")
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"--config: unknown option(s) {', '.join(unknown)} in {path}; known: {', '.join(sorted(known))}")
    return options
