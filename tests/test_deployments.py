"""infra/prefect.yaml: each entrypoint is the real flow, its parameters validate against the flow and
RunConfig, the nightly schedule ships inactive, and the Kubernetes GPU job template renders a GPU request and
limit.

Offline and quick: the files are parsed and checked against the code they name. The real deployment against a
Prefect server on loopback (20-60 s of server start here) is infra/check_deploy.sh.
"""

import copy
import importlib
import inspect
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ParameterTypeError
from prefect.flows import load_flow_from_entrypoint
from prefect.server.schemas.actions import validate_base_job_template
from prefect.utilities.templating import apply_values

import flows.self_play
from ampo.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "infra" / "prefect.yaml"
GPU_TEMPLATE = REPO / "infra" / "k8s" / "gpu-base-job-template.json"
DOCKERFILE = REPO / "infra" / "Dockerfile"

PROCESS_POOL, GPU_POOL = "ampo-process", "ampo-k8s-gpu"
EXPECTED = {  # deployment -> (flow object, work pool)
    "self-play-round": (flows.self_play.self_play_round, PROCESS_POOL),
    "self-play": (flows.self_play.self_play, PROCESS_POOL),
    "self-play-round-gpu": (flows.self_play.self_play_round, GPU_POOL),
}


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}


def gpu_template() -> dict:
    return json.loads(GPU_TEMPLATE.read_text())


def import_entrypoint(entrypoint: str):
    """`flows/self_play.py:self_play_round` -> `flows.self_play.self_play_round`, imported as a package."""
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def render_job(template: dict, job_variables: dict) -> dict:
    """The job configuration a worker builds: variable defaults, overridden by the deployment's job variables,
    put into the template's placeholders (prefect.workers.base: from_template_and_values).
    """
    properties = template["variables"]["properties"]
    values = {k: v["default"] for k, v in properties.items() if v.get("default") is not None}
    return apply_values(copy.deepcopy(template["job_configuration"]), {**values, **job_variables})


def unknown_job_variables(template: dict, job_variables: dict) -> set[str]:
    """Job variables the template never reads: a typo there is otherwise silently ignored by Prefect."""
    return set(job_variables) - set(template["variables"]["properties"])


def test_three_deployments_each_on_its_pool():
    found = deployments()
    assert set(found) == set(EXPECTED)
    for name, (_, pool) in EXPECTED.items():
        assert found[name]["work_pool"]["name"] == pool, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entrypoint_is_the_real_flow(name):
    entrypoint = deployments()[name]["entrypoint"]
    flow = EXPECTED[name][0]
    assert import_entrypoint(entrypoint) is flow
    # `prefect deploy` loads the file by path from the repository root: the same flow, the same signature
    loaded = load_flow_from_entrypoint(str(REPO / entrypoint))
    assert loaded.name == flow.name
    assert inspect.signature(loaded.fn) == inspect.signature(flow.fn)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameters_validate_against_the_flow_and_runconfig(name):
    params = deployments()[name]["parameters"]
    flow = EXPECTED[name][0]
    validated = flow.validate_parameters(params)  # as Prefect does before a run; required ones included
    assert isinstance(validated["config"], RunConfig)
    assert validated["config"] == RunConfig.model_validate(params["config"])
    assert set(params) <= set(inspect.signature(flow.fn).parameters)


def flat(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_demo_deployments_carry_infra_configs_demo_yaml():
    """The anchor `demo` in infra/prefect.yaml is a copy of infra/configs/demo.yaml: edit both together."""
    demo = flat(load_config(REPO / "infra" / "configs" / "demo.yaml").model_dump())
    for name in ("self-play-round", "self-play"):
        deployed = flat(RunConfig.model_validate(deployments()[name]["parameters"]["config"]).model_dump())
        keys = deployed.keys() | demo.keys()
        differ = {k: (deployed.get(k), demo.get(k)) for k in keys if deployed.get(k) != demo.get(k)}
        assert differ == {}, f"{name}: (infra/prefect.yaml, infra/configs/demo.yaml) differ at {differ}"


def test_a_bad_config_parameter_is_refused_before_the_run():
    params = copy.deepcopy(deployments()["self-play-round"]["parameters"])
    params["config"]["generation"]["n"] = 3  # coreset k=3 needs n >= k + 1 = 4 responses per prompt
    with pytest.raises(ParameterTypeError, match="generation.n=3"):
        flows.self_play.self_play_round.validate_parameters(params)
    params = copy.deepcopy(deployments()["self-play-round"]["parameters"])
    params["config"]["selection"]["kk"] = 3  # a typo: extra="forbid"
    with pytest.raises(ParameterTypeError, match="kk"):
        flows.self_play.self_play_round.validate_parameters(params)


def test_process_schedule_is_a_valid_cron_and_inactive():
    found = deployments()
    (schedule,) = found["self-play-round"]["schedules"]
    assert schedule["active"] is False
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad expression
    assert cron.cron == "0 3 * * *"
    assert not found["self-play"].get("schedules") and not found["self-play-round-gpu"].get("schedules")


def test_pull_steps_enter_the_project_or_the_image_workdir():
    found = deployments()
    for name in ("self-play-round", "self-play"):
        (step,) = found[name]["pull"]
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        assert directory == "{{ $AMPO_PROJECT_DIR }}"  # resolved on the worker when a run starts
    (step,) = found["self-play-round-gpu"]["pull"]
    workdir = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert f"WORKDIR {workdir}\n" in DOCKERFILE.read_text()  # the project is where the pull step looks


def test_gpu_template_passes_prefects_checks_and_knows_every_job_variable():
    template = gpu_template()
    validate_base_job_template(template)  # the server's own check: every placeholder is a declared variable
    job_variables = deployments()["self-play-round-gpu"]["work_pool"]["job_variables"]
    assert unknown_job_variables(template, job_variables) == set()
    jsonschema.validate(job_variables, template["variables"])


def test_gpu_template_schema_refuses_bad_job_variables():
    template = gpu_template()
    with pytest.raises(jsonschema.ValidationError, match="less than the minimum of 1"):
        jsonschema.validate({"gpu_count": 0}, template["variables"])
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        jsonschema.validate({"gpu_count": "1"}, template["variables"])
    assert unknown_job_variables(template, {"gpus": 2, "image": "x"}) == {"gpus"}


def test_gpu_job_renders_gpu_limit_selector_env_and_volume():
    deployment = deployments()["self-play-round-gpu"]
    job_variables = deployment["work_pool"]["job_variables"]
    job = render_job(gpu_template(), job_variables)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1  # an int
    assert container["image"] == job_variables["image"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["envFrom"] == [{"secretRef": {"name": "ampo-object-store", "optional": True}}]
    env = job["env"]  # the worker turns this mapping into the container's env list
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/data" in mounts and "/dev/shm" in mounts
    config = RunConfig.model_validate(deployment["parameters"]["config"])
    for path in (env["HF_HOME"], env["AMPO_CACHE"], config.runtime.workdir):
        assert path.startswith("/data/"), path  # caches and checkpoints live on the persistent volume
    assert config.store.uri.startswith("s3://") and config.checkpoints.uri.startswith("s3://")
    assert config.runtime.device == "cuda" and config.runtime.stage_isolation == "subprocess"
    # more GPUs is one job variable: request and limit move together
    two = render_job(gpu_template(), {**job_variables, "gpu_count": 2})
    (container,) = two["job_manifest"]["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 2


def test_process_job_variables_fit_the_process_pool():
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    for name in ("self-play-round", "self-play"):
        job_variables = deployments()[name]["work_pool"]["job_variables"]
        assert unknown_job_variables(template, job_variables) == set(), name
        jsonschema.validate(job_variables, template["variables"])
        assert render_job(template, job_variables)["env"]["HF_HUB_OFFLINE"] == "1"  # the demo needs no hub


def test_example_volume_claim_is_the_one_the_template_mounts():
    claim = yaml.safe_load((REPO / "infra" / "k8s" / "data-pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["metadata"]["name"] == gpu_template()["variables"]["properties"]["data_claim"]["default"]
    assert claim["metadata"]["namespace"] == gpu_template()["variables"]["properties"]["namespace"]["default"]


def test_local_flow_settings_drop_heartbeats_only_without_a_server():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):
        with flows.self_play.local_flow_settings():  # the temporary in-process server: no one to warn
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180
    server = {PREFECT_API_URL: "http://127.0.0.1:4200/api", PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}
    with temporary_settings(updates=server), flows.self_play.local_flow_settings():
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180  # a real server detects crashed runs by them


def test_local_flow_settings_give_the_temporary_servers_client_a_one_certificate_ca_file():
    """The temporary server speaks plain HTTP on loopback; Prefect's client still parses its CA file at every flow run.
    Without a server it gets a file of one certificate (whatever CA file it had: the temporary server uses none); with
    a server nothing changes."""
    import ssl

    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None, PREFECT_API_SSL_CERT_FILE: None}):
        with flows.self_play.local_flow_settings():
            path = PREFECT_API_SSL_CERT_FILE.value()
            assert path == flows.self_play.loopback_ca_file() and Path(path).read_text().count("BEGIN CERT") == 1
            assert ssl.create_default_context(cafile=path).cert_store_stats()["x509_ca"] == 1  # what the client builds
            assert Path(path).stat().st_mode & 0o077 == 0  # its user's only
        assert PREFECT_API_SSL_CERT_FILE.value() is None
    own = {PREFECT_API_URL: None, PREFECT_API_SSL_CERT_FILE: "/etc/my-ca.pem"}  # e.g. from SSL_CERT_FILE
    with temporary_settings(updates=own), flows.self_play.local_flow_settings():
        assert PREFECT_API_SSL_CERT_FILE.value() == path
    server = {PREFECT_API_URL: "https://prefect.example.com/api", PREFECT_API_SSL_CERT_FILE: "/etc/my-ca.pem"}
    with temporary_settings(updates=server), flows.self_play.local_flow_settings():
        assert PREFECT_API_SSL_CERT_FILE.value() == "/etc/my-ca.pem"  # a real server: the user's CA file
    with temporary_settings(updates={**server, PREFECT_API_SSL_CERT_FILE: None}), flows.self_play.local_flow_settings():
        assert PREFECT_API_SSL_CERT_FILE.value() is None  # or certifi's bundle, as Prefect chooses
