"""The deploy-time files in cluster/: each parses, has what its schema requires, and uses only this
package's real commands, flags and settings. Nothing is started: no Ray, no Serve, no Kubernetes.

- launcher YAML: Ray's own schema (ray/autoscaler/ray-schema.json) and `ray up`'s offline checks;
- KubeRay manifests: the ray.io/v1 fields their Go types require (RayCluster, RayJob, RayService);
- every `quantselect ...` command line (entrypoints, shell commands, comments, README examples)
  names a real command of `quantselect.cli:cli` with flags it has; a YAML command must parse;
- every `ray start` line / `rayStartParams` key is a flag of Ray's own `ray start`;
- every QUANTSELECT_* name is one the package reads;
- the Serve applications build through quantselect.serving.app:app_builder, as Serve would call it.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import yaml

from quantselect.cli import cli
from tests.fixtures.common import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: hatchling's tomli
    import tomli as tomllib

CLUSTER = REPO / "cluster"
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"]
# Settings another change is adding while these configs are written: allowed before the package
# reads them (once it does, the name is found in the source anyway).
SETTINGS_BEING_ADDED = {"QUANTSELECT_GPU_MEMORY"}
SHARED_CLAIM = "quantselect-shared"
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
COMMAND_STARTS = SEPARATORS | {"--", "sudo", "RUN"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


# ---- command lines ------------------------------------------------------------------------------

def shell_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def invocations(text: str, program: str) -> Iterator[list[str]]:
    """The arguments of every ``program ...`` command of a shell text (one command line per line),
    up to the end of that command. ``program`` counts only where a command starts."""
    for line in text.replace("\\\n", " ").splitlines():
        words = shell_words(line)
        for i, w in enumerate(words):
            if (w == program or w.endswith("/" + program)) and (i == 0 or words[i - 1] in COMMAND_STARTS):
                args = []
                for a in words[i + 1:]:
                    if a in SEPARATORS:
                        break
                    args.append(a)
                yield args


def examples(text: str, program: str, *, line_start: bool) -> Iterator[list[str]]:
    """``program ...`` command lines quoted in prose: after a backtick, a quote, a separator or
    `` -- `` (and at a line's start when ``line_start``), up to the next quote, backtick or `#`."""
    text = text.replace("\\\n", " ")
    starts = r"[`'\"(;&|]\s*|\s--\s+" + (r"|^\s*" if line_start else "")
    pattern = re.compile(rf"(?:{starts})((?:[\w./~-]*/)?{program}(?:[ \t][^`'\"#;&|()\n]*)?)(?=$|[`'\"#;&|()\n])", re.M)
    for m in pattern.finditer(text):
        args = shell_words(m.group(1))[1:]
        if args:
            yield args


def comment_examples(text: str, program: str) -> Iterator[list[str]]:
    """Command lines in a YAML file's or Dockerfile's comments; a comment indented by two spaces or
    more (``#   ray up ...``) is an example command line."""
    lines = [ln.strip()[1:] for ln in text.splitlines() if ln.strip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    for body in joined.splitlines():
        yield from examples(body, program, line_start=body.startswith("  "))


def resolve(group: click.Group, args: list[str]) -> tuple[click.Command, list[str], str]:
    """The (sub)command ``args`` name, the arguments left for it, and its full name."""
    cmd, name = group, "quantselect"
    while isinstance(cmd, click.Group):
        if args and args[0].startswith("-") and args[0] in flags_of(cmd):
            break  # `quantselect --version`
        if not args or args[0] not in cmd.commands:
            raise AssertionError(f"`{name} {args[0] if args else ''}`: not a command; commands: {sorted(cmd.commands)}")
        name = f"{name} {args[0]}"
        cmd, args = cmd.commands[args[0]], args[1:]
    return cmd, args, name


def flags_of(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


def check_quantselect(args: list[str], *, parse: bool) -> str:
    """A `quantselect ...` command line must name a real command and only flags it has; with
    ``parse``, click must accept the whole line (arguments, option values, choices)."""
    cmd, rest, name = resolve(cli, args)
    for a in rest:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and flag not in flags_of(cmd):
            raise AssertionError(f"`{name}` has no option {flag}; it has {sorted(flags_of(cmd))}")
    if parse:
        try:
            cmd.make_context(name, list(rest), resilient_parsing=False)
        except click.exceptions.Exit:
            pass
        except click.ClickException as e:
            raise AssertionError(f"`{name} {' '.join(rest)}` does not parse: {e.format_message()}") from None
    return name


def ray_start_flags() -> set[str]:
    from ray.scripts.scripts import start

    return flags_of(start)


def check_ray_start(args: list[str]) -> None:
    assert args and args[0] == "start", args
    known = ray_start_flags()
    for a in args[1:]:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, f"`ray start` has no option {a.split('=', 1)[0]}"


# ---- the checkers themselves can fail ---------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("quantselect sumbit m d", "not a command"),
    ("quantselect submit m d --adress http://h:8265", "no option --adress"),
    ("quantselect submit only-the-model", "does not parse"),
    ("quantselect submit m d --policy greedy", "does not parse"),
    ("quantselect db upgrad", "not a command"),
])
def test_a_wrong_quantselect_line_fails(line, message):
    (args,) = invocations(line, "quantselect")
    with pytest.raises(AssertionError, match=message):
        check_quantselect(args, parse=True)


def test_a_wrong_ray_start_flag_fails():
    (args,) = invocations("ulimit -n 65536; ray start --head --dashbord-host=0.0.0.0", "ray")
    with pytest.raises(AssertionError, match="dashbord-host"):
        check_ray_start(args)


def test_command_lines_are_found_where_commands_start():
    text = "source ~/env; ray stop && quantselect status abc | tee log # quantselect nope\nchown u /x/quantselect"
    assert list(invocations(text, "quantselect")) == [["status", "abc"]]
    assert list(invocations(text, "ray")) == [["stop"]]
    prose = "Run `quantselect status JOB`, or 'quantselect jobs' -- quantselect cancel J; quantselect.serving"
    assert list(examples(prose, "quantselect", line_start=False)) == [["status", "JOB"], ["jobs"], ["cancel", "J"]]
    comments = "# quantselect sizes a job's work\n#   kubectl exec pod -- \\\n#     quantselect resume J --wait"
    assert list(comment_examples(comments, "quantselect")) == [["resume", "J", "--wait"]]


# ---- the Ray cluster launcher --------------------------------------------------------------------

def launcher_commands(cfg: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    return [c for k in keys for c in cfg.get(k) or []]


def test_launcher_matches_rays_schema_and_ray_up_checks():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the schema `ray up` validates against
    for field in schema["required"]:
        assert field in cfg, field
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks before it calls AWS

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, "no node type with GPUs"
    for name, t in gpu.items():
        assert name != cfg["head_node_type"]
        # A job plans its parallelism from the GPUs up when it starts: GPU workers must be kept up.
        assert t["min_workers"] >= 1, f"{name}: min_workers 0 leaves jobs without GPUs"
        assert t["node_config"]["InstanceType"]
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


def test_launcher_commands_are_real():
    cfg = load("ray-cluster.yaml")
    text = "\n".join(launcher_commands(cfg))
    starts = list(invocations(text, "ray"))
    assert any(a[:2] == ["start", "--head"] for a in starts)
    assert any(a[:1] == ["start"] and any(x.startswith("--address") for x in a) for a in starts)
    for args in starts:
        if args[0] == "start":
            check_ray_start(args)
    assert "--dashboard-host=0.0.0.0" in cfg["head_start_ray_commands"][-1]  # the Jobs API, for --address
    for args in invocations(text, "quantselect"):
        check_quantselect(args, parse=True)


def test_launcher_installs_this_package_with_cuda_torch():
    cfg = load("ray-cluster.yaml")
    installs = [args for c in cfg["setup_commands"] for args in invocations(c, "pip") if args[:1] == ["install"]]
    reqs = [a for args in installs for a in args[1:] if not a.startswith("-")]
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert f"torch=={torch_pin}" in reqs  # the Makefile's torch; on Linux x86_64 PyPI's is the CUDA build
    # PyPI's `quantselect` is another project: this one comes from the wheel file_mounts copies.
    assert not [r for r in reqs if re.match(r"quantselect\b", r)], reqs
    (mount,) = [remote for remote, local in cfg["file_mounts"].items() if local.rstrip("/") == "./dist"]
    wheel = [r for r in reqs if mount in r]
    assert wheel and wheel[0].endswith("[gptq]"), reqs
    ray_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    assert "2.60" in ray_pin  # the version the comments and rayVersion below name


def test_launcher_environment_reaches_ray_and_the_shared_storage():
    cfg = load("ray-cluster.yaml")
    env_cmd = next(c for c in cfg["setup_commands"] if "> ~/quantselect.env" in c)
    env = dict(re.findall(r"export (QUANTSELECT_[A-Z_]+)=\"?([^\"' ]+)", env_cmd))
    assert env["QUANTSELECT_DB_URL"].startswith("postgresql://")
    mount = re.search(r"mount -t nfs4 .* (/\S+)\)", " ".join(cfg["setup_commands"])).group(1)
    assert env["QUANTSELECT_ARTIFACTS_DIR"].startswith(mount + "/")
    assert env["QUANTSELECT_HOME"].startswith(mount + "/")
    assert re.search(rf"export HF_HOME={re.escape(mount)}/", env_cmd), env_cmd
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in c:  # Ray's workers, job drivers and Serve replicas inherit `ray start`'s environment
            assert c.startswith("source ~/quantselect.env"), c


# ---- KubeRay -----------------------------------------------------------------------------------

def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers), where
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> list[dict]:
    """The fields KubeRay's RayClusterSpec requires (ray.io/v1 Go types); returns every Ray
    container (head first)."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    containers = check_pod_template(head["template"], f"{where} head")[:1]
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    assert len({g["groupName"] for g in groups}) == len(groups)
    known = ray_start_flags()
    for group in [head, *groups]:
        for k, v in group["rayStartParams"].items():
            assert isinstance(v, str), f"{where}: rayStartParams.{k} must be a string (map[string]string)"
            assert f"--{k}" in known, f"{where}: `ray start` has no --{k}"
    gpu_groups = 0
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        cs = check_pod_template(g["template"], f"{where} {g['groupName']}")
        gpus = int(cs[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        if gpus:
            gpu_groups += 1
            assert g["minReplicas"] >= 1, f"{g['groupName']}: jobs plan from the GPUs up when they start"
        containers.append(cs[0])
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu"
    assert spec["rayVersion"].startswith("2.60."), spec["rayVersion"]
    return containers


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def shared_mount(template: dict, container: dict) -> str:
    claims = {v["name"] for v in template["spec"].get("volumes", [])
              if v.get("persistentVolumeClaim", {}).get("claimName") == SHARED_CLAIM}
    (path,) = [m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in claims]
    return path


def templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *[g["template"] for g in spec["workerGroupSpecs"]]]


def check_quantselect_env(spec: dict, *, db: bool) -> None:
    """Every Ray pod mounts the shared claim and points the artifacts there; the database URL comes
    from the Secret."""
    for template in templates(spec):
        c = template["spec"]["containers"][0]
        env, mount = env_of(c), shared_mount(template, c)
        assert env["QUANTSELECT_ARTIFACTS_DIR"]["value"].startswith(mount + "/"), c["name"]
        assert env["HF_HOME"]["value"].startswith(mount + "/"), c["name"]  # Hub downloads the workers load
        assert c.get("imagePullPolicy") == "Always", c["name"]  # a rebuild under the same tag reaches every node
        if db:
            ref = env["QUANTSELECT_DB_URL"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "quantselect-db", "key": "url"}
            assert "value" not in env["QUANTSELECT_DB_URL"]


def image_tag() -> str:
    return f"ghcr.io/quantselect/quantselect:{PYPROJECT['project']['version']}"


def test_shared_volume_is_read_write_many():
    pvc = load("kuberay-storage.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == SHARED_CLAIM
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]


def test_raycluster():
    doc = load("kuberay-raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    containers = check_ray_cluster_spec(doc["spec"], "RayCluster")
    assert {c["image"] for c in containers} == {image_tag()}
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    check_quantselect_env(doc["spec"], db=True)


def test_rayjob_runs_a_real_quantselect_command():
    doc = load("kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    (args,) = invocations(spec["entrypoint"], "quantselect")
    assert check_quantselect(args, parse=True) == "quantselect submit"
    assert "--address" not in " ".join(args)  # the entrypoint is the driver: the job runs in it
    if "rayClusterSpec" in spec:
        containers = check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
        assert {c["image"] for c in containers} == {image_tag()}
        check_quantselect_env(spec["rayClusterSpec"], db=True)
        # The model and dataset the driver and the workers read are on the shared volume.
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
        mount = shared_mount(head, head["spec"]["containers"][0])
        cmd, rest, _ = resolve(cli, args)
        ctx = cmd.make_context("submit", rest)
        assert ctx.params["model"].startswith(mount + "/") and ctx.params["dataset"].startswith(mount + "/")


def serve_apps(config: dict) -> list[Any]:
    """Each application as Serve would build it: the config schema, then the import path's builder
    called with the args (quantselect's AppArgs and the candidate config allow-list validate them)."""
    from ray._common.utils import import_attr
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from quantselect.serving.deploy import APP_PREFIX, check_name

    schema = ServeDeploySchema.model_validate(config)
    assert schema.applications
    for app in schema.applications:
        assert app.import_path == "quantselect.serving.app:app_builder"
        built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        assert isinstance(built, Application)
        name = check_name(app.args["name"])
        # The names and routes `quantselect deploy` uses, so its listing and URLs find this one too.
        assert app.name == APP_PREFIX + name and app.route_prefix == f"/models/{name}"
    return schema.applications


def test_serve_config_builds():
    serve_apps(load("serve-config.yaml"))


def test_rayservice_wraps_the_serve_config():
    doc = load("kuberay-rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes it as a YAML string
    apps = serve_apps(yaml.safe_load(spec["serveConfigV2"]))
    base = load("serve-config.yaml")["applications"][0]
    for app in apps:
        assert app.import_path == base["import_path"]
        assert set(app.args) == set(base["args"])
        assert app.args["use_gpu"] is True  # the cluster below has GPU workers for it
    containers = check_ray_cluster_spec(spec["rayClusterConfig"], "RayService")
    assert {c["image"] for c in containers} == {image_tag()}
    check_quantselect_env(spec["rayClusterConfig"], db=False)
    model_path = apps[0].args["model_path"]
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]
    assert model_path.startswith(shared_mount(head, head["spec"]["containers"][0]) + "/")


def test_kuberay_manifests_agree():
    """The RayJob and RayService clusters use the RayCluster's image, volume and settings."""
    cluster = load("kuberay-raycluster.yaml")["spec"]
    job = load("kuberay-rayjob.yaml")["spec"].get("rayClusterSpec")
    service = load("kuberay-rayservice.yaml")["spec"]["rayClusterConfig"]
    ref = env_of(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
    for spec in filter(None, [job, service]):
        assert spec["rayVersion"] == cluster["rayVersion"]
        for template in templates(spec):
            env = env_of(template["spec"]["containers"][0])
            for name in ("QUANTSELECT_HOME", "QUANTSELECT_ARTIFACTS_DIR"):
                assert env[name] == ref[name], name


# ---- Dockerfile --------------------------------------------------------------------------------

def test_dockerfile_installs_this_package():
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0].startswith("FROM ")
    copied = {w.rstrip("/") for ln in lines if ln.startswith("COPY ") for w in ln.split()[1:-1]}
    wheel = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *wheel["packages"], *wheel["force-include"]}
    assert needed <= copied, f"the wheel build needs {sorted(needed - copied)}"
    dest = next(ln.split()[-1].rstrip("/") for ln in lines if ln.startswith("COPY ") and "pyproject.toml" in ln)
    runs = "\n".join(ln for ln in lines if ln.startswith("RUN "))
    reqs = [a for args in invocations(runs, "pip") if args[:1] == ["install"] for a in args[1:] if not a.startswith("-")]
    assert any(r.startswith(dest + "${EXTRAS}") or r.startswith(dest + "[") for r in reqs), reqs
    assert not [r for r in reqs if re.match(r"quantselect\b", r)], "PyPI's `quantselect` is another project"
    assert re.search(r'ARG EXTRAS="\[gptq\]"', text)
    torch_pin = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert re.search(rf"ARG TORCH_VERSION={re.escape(torch_pin)}\b", text)
    apt = re.search(r"apt-get install ([^&]+)", runs).group(1).split()
    assert {"bash", "wget"} <= set(apt)  # KubeRay's health probes run `bash -c "wget ..."`
    for args in invocations(runs, "quantselect"):
        check_quantselect(args, parse=True)


# ---- across every file ---------------------------------------------------------------------------

def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.is_file())


def test_settings_named_are_ones_the_package_reads():
    source = "\n".join(p.read_text() for p in (REPO / "quantselect").rglob("*.py"))
    read = set(re.findall(r"\bQUANTSELECT_[A-Z0-9_]+\b", source)) | SETTINGS_BEING_ADDED
    for path in cluster_files():
        named = set(re.findall(r"\bQUANTSELECT_[A-Z0-9_]+\b", path.read_text()))
        assert named <= read, f"{path.name}: {sorted(named - read)} are not read by quantselect"


def test_commands_in_comments_are_real():
    """The example command lines in the files' comments name real commands and flags."""
    for path in cluster_files():
        if path.suffix == ".md":
            continue
        for args in comment_examples(path.read_text(), "quantselect"):
            check_quantselect(args, parse=False)


def test_readme_commands_are_real():
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    text = (CLUSTER / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)

    def found(program: str) -> Iterator[list[str]]:
        yield from examples(blocks, program, line_start=True)
        yield from examples(prose, program, line_start=False)

    seen = {check_quantselect(args, parse=False) for args in found("quantselect")}
    assert {"quantselect submit", "quantselect db upgrade", "quantselect status", "quantselect results",
            "quantselect recommend", "quantselect resume", "quantselect cancel", "quantselect deploy"} <= seen
    for program, group in (("ray", ray_cli), ("serve", serve_cli)):
        for args in found(program):
            assert args[0] in group.commands, f"`{program} {args[0]}`: not a command"
            cmd = group.commands[args[0]]
            for a in args[1:]:
                if a.startswith("-"):
                    assert a.split("=", 1)[0] in flags_of(cmd), f"`{program} {args[0]}` has no {a}"
    for name in ["ray-cluster.yaml", "Dockerfile", "kuberay-storage.yaml", *KUBERAY, "serve-config.yaml"]:
        assert f"`{name}`" in text or f"cluster/{name}" in text, f"README says nothing of {name}"
