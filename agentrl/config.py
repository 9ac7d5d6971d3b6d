"""Run configuration: YAML files plus dotted command-line overrides, validated into typed objects.

``load_config("configs/quickstart.yaml", ["trainer.lr=1e-6", "rollout.max_turns=4"])`` returns a
:class:`RunConfig`. Unknown keys are errors that suggest the closest valid key; wrong types name the
key, the value and the expected type.
"""

from __future__ import annotations

import copy
import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased so that the user knows what to change."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- sections ------------------------------------------------------------------------------------


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelConfig(Section):
    """Which policy to train: a local HF path or the embedded ``smollm2-135m-instruct``."""

    name: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    lora: LoraConfig = LoraConfig()


class EnvConfig(Section):
    """The task: an env by registered name (``search_qa``) or import path (``pkg.mod:MyEnv``)."""

    name: str = "search_qa"
    train_data: str | None = None
    eval_data: str | None = None
    eval_size: int = Field(64, ge=0)
    options: dict[str, Any] = {}


class ToolsConfig(Section):
    """Tools by registered name or import path, and how their output reaches the model."""

    names: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    server_url: str | None = None
    server_token: str | None = None
    max_observation_tokens: int = Field(512, gt=0)
    observation_truncation: Literal["head", "tail", "middle"] = "tail"


class PartialRolloutConfig(Section):
    """APRIL-style partial rollouts: over-provision, stop at the target, carry the rest over. In
    ``agentrl train`` the target is ``trainer.prompts_per_step`` complete groups."""

    enabled: bool = False
    over_provision: float = Field(1.5, ge=1.0)  # groups in flight per step, as a multiple of the target
    max_staleness: int = Field(1, ge=0)  # policy versions a carried trajectory may lag before its group is dropped


class RolloutConfig(Section):
    engine: Literal["hf", "vllm", "openai"] = "hf"
    engine_url: str | None = None
    engine_model: str | None = None
    group_size: int = Field(4, gt=0)
    max_turns: int = Field(4, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    max_response_tokens: int = Field(1024, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_concurrent_trajectories: int = Field(64, gt=0)
    max_batch_size: int = Field(32, gt=0)
    # the HF engine's float32 CPU decoding through oneDNN with packed weights (a second copy of the
    # linear weights); None: wherever it applies
    packed_weights: bool | None = None
    # The vLLM engine's serving dtype; auto: model.dtype. bfloat16 beside a float32 trainer samples
    # from a rounded copy of the policy (rollout/logprob_mismatch; algo.is_all_tokens corrects it).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # vLLM on a GPU the local trainer also uses: the share of that GPU's memory vLLM may take (its
    # weights and KV cache); None: 0.5, verl's default, which verl also keeps. The local trainer's
    # server then sleeps through each update (KV cache freed, weights moved to host memory).
    gpu_memory_utilization: float | None = Field(None, gt=0.0, lt=1.0)
    end_on_format_error: bool = False  # False: the model sees the parse error as an observation and goes on
    # Several tool calls per turn: the turn is not cut at a call's closing tag but ends at EOS.
    parallel_tool_calls: bool = False
    max_model_len: int | None = Field(None, gt=0)  # prompt + response; default: the engine's context length
    group_retries: int = Field(1, ge=0)  # reruns of a group with a failed trajectory before it is dropped
    reward_timeout_s: float = Field(60.0, gt=0.0)
    reward_workers: int = Field(4, gt=0)  # threads for synchronous reward functions
    # A vision-language model's images per trajectory (the prompt's and the tools'): their number
    # and their pixels together. Images that would pass either end the trajectory (stop max_images).
    max_images: int = Field(8, ge=0)
    max_image_pixels: int = Field(16_000_000, gt=0)
    partial: PartialRolloutConfig = PartialRolloutConfig()


KLEstimator = Literal["k1", "k2", "mse", "k3", "low_var_kl"]
KL_IN_REWARD_ESTIMATORS = ("reinforce_pp", "gae")  # their papers put the KL into the token reward


class GigpoConfig(Section):
    """GiGPO (``algo.advantage=gigpo``): weight of the step-level advantage and its discount."""

    step_weight: float = Field(1.0, ge=0.0)
    gamma: float = Field(0.95, ge=0.0, le=1.0)


class ArcherConfig(Section):
    """The ArCHer utterance-level critic (``algo.advantage=archer``, ``agentrl/algos/critic.py``)."""

    gamma: float = Field(0.95, ge=0.0, le=1.0)  # discount across turns
    tau: float = Field(0.1, gt=0.0, le=1.0)  # Polyak rate of the target network
    lr: float = Field(1e-4, gt=0.0)
    hidden_size: int = Field(256, gt=0)
    updates_per_step: int = Field(8, ge=0)  # TD minibatch updates per RL step
    batch_size: int = Field(64, gt=0)
    buffer_size: int = Field(4096, gt=0)  # turn transitions kept for off-policy TD
    warmup_steps: int = Field(2, ge=0)  # RL steps that train only the critic


class AlgoConfig(Section):
    """Advantage estimator and policy loss (see ``agentrl/algos``)."""

    advantage: Literal[
        "grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "gae", "turn_grpo", "gigpo",
        "archer"
    ] = "grpo"
    norm_std: bool = True
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(1.0, ge=0.0, le=1.0)
    turn_gamma: float = Field(1.0, ge=0.0, le=1.0)
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "dr-grpo"] = "token-mean"
    clip_low: float = Field(0.2, ge=0.0)
    clip_high: float = Field(0.28, ge=0.0)
    dual_clip: float | None = Field(None, gt=1.0)
    kl_coef: float = Field(0.0, ge=0.0)
    kl_in_reward: bool | None = None  # None: in the reward for reinforce_pp and gae, in the loss otherwise
    kl_reward_type: KLEstimator = "k1"  # as a token reward only k1 follows grad KL(pi || ref)
    kl_loss_type: KLEstimator = "low_var_kl"  # k1 as a loss has zero expected gradient
    kl_type: KLEstimator | None = None  # deprecated name of kl_loss_type
    entropy_coef: float = Field(0.0, ge=0.0)
    clip_cov_ratio: float = Field(0.0, ge=0.0, le=1.0)
    clip_cov_lower: float = 1.0
    clip_cov_upper: float = 5.0
    kl_cov_ratio: float = Field(0.0, ge=0.0, le=1.0)
    kl_cov_coef: float = Field(1.0, ge=0.0)
    stale_is_cap: float = Field(2.0, gt=0.0)
    is_all_tokens: bool = False  # the truncated weight min(pi_old/mu, cap) on every model token, not only stale ones
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = Field(2, ge=0)  # extra rollout rounds to refill the filtered batch
    overlong_filter: bool = False
    value_lr: float = Field(1e-5, gt=0.0)
    value_clip: float = Field(0.2, ge=0.0)
    value_coef: float = Field(1.0, ge=0.0)
    value_trunk_grad: bool = True  # False: the value loss trains only the head, not the shared trunk
    whiten_gae: bool = True  # masked whitening of GAE advantages over the batch (as verl)
    gigpo: GigpoConfig = GigpoConfig()
    archer: ArcherConfig = ArcherConfig()

    @model_validator(mode="before")
    @classmethod
    def _rename_kl_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kl_type") is not None:
            warnings.warn("algo.kl_type is deprecated: it sets algo.kl_loss_type (the KL in the loss); the KL "
                          "in the reward is algo.kl_reward_type", DeprecationWarning, stacklevel=2)
            data = dict(data)
            data.setdefault("kl_loss_type", data["kl_type"])
            data["kl_type"] = None
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> AlgoConfig:
        in_reward = self.kl_in_reward if self.kl_in_reward is not None else self.advantage in KL_IN_REWARD_ESTIMATORS
        if self.kl_coef > 0 and not in_reward and self.kl_loss_type == "k1":
            warnings.warn("algo.kl_loss_type=k1 as a loss has zero expected gradient (E[grad log pi] = 0) and adds only "
                          "noise; use k2 (mse) for grad KL(pi || ref) or low_var_kl/k3", UserWarning, stacklevel=2)
        if self.dynamic_sampling and self.advantage in ("reinforce", "reinforce_pp", "gae", "archer"):
            raise ValueError(f"algo.dynamic_sampling drops groups whose rewards tie, but under {self.advantage} (no group "
                             "baseline) those still carry signal: set algo.dynamic_sampling=false")
        return self


class TrainerConfig(Section):
    backend: Literal["local", "verl"] = "local"  # verl: `agentrl train` runs verl's trainer (the verl section)
    steps: int = Field(10, ge=0)
    prompts_per_step: int = Field(8, gt=0)
    epochs: int = Field(1, gt=0)
    minibatch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    eval_every: int = Field(0, ge=0)
    eval_before: bool = True
    save_every: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0
    torch_threads: int | None = Field(None, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocasts the forward passes; weights stay in model.dtype
    # where the policy, reference, value head or critic, optimizer state and batches live, and the
    # HF engine samples: auto (CUDA when torch finds it, else the CPU), cpu, cuda or cuda:N
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    eval_temperature: float = Field(0.0, ge=0.0)
    deterministic: bool = False  # torch.use_deterministic_algorithms, for exactly reproducible runs
    log_entropy: bool = False  # log the policy's token entropy every step (it is computed anyway when in the loss)


class DrBoTConfig(Section):
    """Dr.BoT's loss masks and group filter (recipes ``drbot`` and ``spear``; docs/spear.md)."""

    masks: list[Literal["overlong", "incomplete", "repetitive", "unreadable"]] = [
        "overlong", "incomplete", "repetitive", "unreadable"]
    ngram: int = Field(20, gt=0)  # a row is repetitive when one n-gram of an assistant turn repeats this often
    ngram_repeats: int = Field(10, gt=1)
    keep_tool_callers: bool = False  # incomplete rows that called a tool keep their loss
    group_keep_ratio: float = Field(0.75, gt=0.0, le=1.0)  # the groups with the largest reward std
    trim_to_power_of_two: bool = True


class SpearConfig(Section):
    """SPEAR's two curricula (recipe ``spear``; docs/spear.md): the tool-call reward and self-imitation."""

    tool_call_schedule: Literal["cosine", "constant", "none"] = "cosine"
    tool_call_steps: int = Field(200, gt=0)  # T_tc: the cosine decays the bonus weight to 0 by this step
    tool_call_variant: Literal["count", "qwen3"] = "count"
    tool_call_per_call: float = Field(0.1, ge=0.0)
    tool_call_cap: float = Field(1.0, ge=0.0)
    invalid_action_penalty: float = Field(0.1, ge=0.0)  # per malformed tool call
    buffer_size: int = Field(2048, gt=0)  # N: replay fires when more than trigger_factor * N rows beat the baseline
    trigger_factor: float = Field(1.5, gt=0.0)
    max_staleness: int = Field(5, ge=0)  # steps a buffered row may age before it is dropped
    baseline_size: int = Field(10240, gt=0)  # group means kept for the P50 baseline
    norm_std: bool = False  # divide the recalibrated advantages by the P50 group std
    strict_positive: bool = False  # keep only rows strictly above the baseline (the math recipe)
    require_tool_call: bool = False  # only rows with at least one tool call enter the buffer (the math recipe)
    sil_coef: float = Field(1.0, ge=0.0)  # c_sil
    sil_ramp_steps: int = Field(200, ge=0)  # T_sil: the cosine ramp of the SIL weight 0 -> c_sil
    replay_clip_cov_ratio: float = Field(0.02, ge=0.0, le=1.0)
    replay_clip_cov_lower: float = 2.0
    replay_clip_cov_upper: float = 60.0


class SelfPlayConfig(Section):
    """Search self-play (recipe ``self_play``; docs/self_play.md): the answers it reads (and nothing
    else), the rule filters, the RAG check or judge, both roles' rewards, the problem pool, the
    per-role sampling and how the two roles update."""

    answers: str | None = None  # JSONL of {"answer", "hops"}; default: the fictional world's answers
    hops: list[int] = []  # keep only answers with these hop counts (empty: all)
    answers_per_step: int | None = Field(None, gt=0)  # proposer rollouts per step; default trainer.prompts_per_step
    # SSP's dynamic sampling (off in the reference script): while a step has fewer valid questions than
    # answers_per_step, up to this many further proposer rounds on the next answers; the pool fills what is left
    dynamic_sampling_max_draws: int = Field(0, ge=0)
    n_solve: int = Field(5, gt=0)  # solver attempts per question (the solver's GRPO group)
    proposer_prompt: Literal["full", "short"] = "full"
    proposer_max_turns: int | None = Field(None, gt=0)  # default rollout.max_turns
    proposer_temperature: float | None = Field(None, ge=0.0)  # default rollout.temperature (reference 0.8)
    solver_temperature: float | None = Field(None, ge=0.0)  # default rollout.temperature
    distractors: int = Field(4, ge=0)  # k: blocks from other proposer trajectories in the RAG check
    rag_max_new_tokens: int = Field(64, gt=0)
    min_chars: int = Field(10, ge=0)
    max_chars: int = Field(1000, gt=0)
    min_words: int = Field(10, ge=0)
    min_searches: int = Field(2, ge=0)
    allow_repeated_searches: bool = False
    forbid_answer_in_queries: bool = False
    reward: Literal["1-acc", "intermediate_difficulty", "format_only"] = "1-acc"
    invalid_penalty: float = 0.0  # the proposer's reward for an invalid question (reference script 0, yaml -1)
    spam_limit: int = Field(10, gt=0)  # more <answer> or </answer> tags than this divide the solver reward by 4
    proposer_advantage: Literal["reinforce_pp", "grpo_batch", "reward"] = "reinforce_pp"
    combine_update: bool = False  # one loss batch of both roles instead of proposer, then solver
    # the roles whose trajectories enter the loss; the others are still sampled, checked and scored
    # (an ablation: [solver] trains the solver on questions from a proposer that does not learn)
    train_roles: list[Literal["proposer", "solver"]] = Field(default_factory=lambda: ["proposer", "solver"], min_length=1)
    pool_clear_every: int = Field(10, gt=0)
    pool_max_success_rate: float = Field(1.0, ge=0.0, le=1.0)  # pool problems solved more often are not reused
    # slots one pool problem may fill, over all steps (None: no bound, as the reference); with few
    # valid questions an unbounded pool trains the solver on one question again and again
    pool_max_uses: int | None = Field(None, gt=0)
    judge_url: str | None = None  # an OpenAI-compatible endpoint (.../v1) for semantic answer matches
    judge_model: str = "judge"
    judge_timeout_s: float = Field(30.0, gt=0.0)  # per attempt
    judge_attempts: int = Field(3, gt=0)
    judge_failure: Literal["reject", "raise"] = "reject"  # after the retries: reject the question / stop the run

    @model_validator(mode="after")
    def _check_combinations(self) -> SelfPlayConfig:
        if self.combine_update and self.proposer_advantage != "grpo_batch":
            raise ValueError("self_play.combine_update trains both roles with the run's estimator: set "
                             "self_play.proposer_advantage=grpo_batch (the step's proposals as one GRPO group)")
        if len(set(self.train_roles)) != len(self.train_roles):
            raise ValueError(f"self_play.train_roles names a role twice: {self.train_roles}")
        return self


class VerlConfig(Section):
    """``trainer.backend=verl`` (docs/scale-out.md): the cluster, verl's prompt budget and raw overrides."""

    nnodes: int = Field(1, gt=0)
    n_gpus_per_node: int = Field(1, gt=0)
    rollout_name: Literal["vllm", "sglang"] = "vllm"
    tensor_parallel_size: int = Field(1, gt=0)  # of each rollout server
    max_prompt_length: int = Field(1024, gt=0)  # verl's data.max_prompt_length (rows with longer prompts are dropped)
    data_dir: str | None = None  # where the parquet data goes; default output_dir/verl_data
    python: str | None = None  # the interpreter that has verl; default this one
    overrides: list[str] = []  # further hydra overrides for verl, key=value; a key agentrl sets is an error


class SftConfig(Section):
    """Supervised warm start on demonstration trajectories before RL."""

    enabled: bool = False
    data: str | None = None
    num_demonstrations: int = Field(64, ge=0)
    epochs: int = Field(1, gt=0)
    lr: float = Field(1e-5, gt=0.0)
    batch_size: int = Field(8, gt=0)


class TrackingConfig(Section):
    backends: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = ["jsonl"]
    project: str = "agentrl"
    run_name: str | None = None
    sample_trajectories: int = Field(4, ge=0)
    progress: bool = True
    plot: bool = True


class RunConfig(Section):
    """A whole run. Every section has defaults; a YAML file overrides what it names."""

    output_dir: str = "runs/default"
    resume: bool = False
    recipe: str = "default"  # the training step's parts: default (GRPO/PPO family), drbot, spear, or pkg.mod:Recipe
    model: ModelConfig = ModelConfig()
    env: EnvConfig = EnvConfig()
    tools: ToolsConfig = ToolsConfig()
    rollout: RolloutConfig = RolloutConfig()
    algo: AlgoConfig = AlgoConfig()
    trainer: TrainerConfig = TrainerConfig()
    sft: SftConfig = SftConfig()
    tracking: TrackingConfig = TrackingConfig()
    verl: VerlConfig = VerlConfig()
    drbot: DrBoTConfig = DrBoTConfig()
    spear: SpearConfig = SpearConfig()
    self_play: SelfPlayConfig = SelfPlayConfig()

    @model_validator(mode="after")
    def _check_rollout_dtype(self) -> RunConfig:
        dtype, engine = self.rollout.dtype, self.rollout.engine
        if self.trainer.backend == "local" and dtype not in ("auto", self.model.dtype) and engine != "vllm":
            where = ("samples from the trainer's module itself, in model.dtype" if engine == "hf"
                     else "samples from a server whose weights and dtype are its own")
            raise ValueError(f"rollout.dtype={dtype}: rollout.engine={engine} {where}; serve another dtype "
                             "with rollout.engine=vllm, or leave rollout.dtype=auto")
        return self

    @property
    def rollout_dtype(self) -> str:
        """The dtype the rollout engine samples in: ``rollout.dtype``, or ``model.dtype`` for auto."""
        return self.model.dtype if self.rollout.dtype == "auto" else self.rollout.dtype


# -- loading -------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.lr=1e-6"`` -> ``(["trainer", "lr"], 1e-6)``; values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-6 as a string (it wants 1.0e-6); numbers written the Python way are numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return [part.strip() for part in key.split(".")], value


def _check_keys(model: type[BaseModel], data: Any, prefix: str) -> None:
    """Reject unknown keys, naming the closest valid key (pydantic's message does not)."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        if key not in model.model_fields:
            valid = sorted(model.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(annotation, value, f"{prefix}{key}.")


def _set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        value = item.get("input")
        lines.append(f"config key '{key}' = {value!r}: {item['msg']}")
    return "\n".join(lines)


def build_config(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = copy.deepcopy(dict(data or {}))  # an override of a nested key must not write into the caller's dict
    for text in overrides:
        path, value = parse_override(text)
        _set_dotted(data, path, value)
    _check_keys(RunConfig, data, "")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or none, for all defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
        data = loaded or {}
    return build_config(data, overrides)


SECRET_NAME_ENDINGS = ("token", "key", "secret", "password", "passwd", "credential", "credentials")
REDACTED = "<redacted>"


def is_secret_name(name: str) -> bool:
    """``server_token``, ``api_key``, ``HF_TOKEN``, ``apiKey``, ``db_password``, ``client_secret``;
    not ``tokenizer`` or ``max_new_tokens``."""
    lowered = str(name).lower()
    return lowered.endswith(SECRET_NAME_ENDINGS) or any(
        part in SECRET_NAME_ENDINGS for part in re.split(r"[^a-z0-9]+", lowered))


def redact_secrets(data: Any) -> Any:
    """A copy of ``data`` with every non-empty string under a secret-looking name replaced by
    ``<redacted>``, at any depth (tool options, environment maps), for what leaves the process:
    the run's config.yaml, printed configs and trackers."""
    if isinstance(data, dict):
        return {key: REDACTED if is_secret_name(key) and isinstance(value, str) and value
                else redact_secrets(value) for key, value in data.items()}
    if isinstance(data, list):
        return [redact_secrets(item) for item in data]
    return data


def dump_config(config: RunConfig, redact: bool = True) -> str:
    """The config as YAML; secrets are redacted unless ``redact=False``."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(redact_secrets(data) if redact else data, sort_keys=False)
