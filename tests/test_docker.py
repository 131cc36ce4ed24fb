"""The Docker image for real: build, run, health, client from outside and inside, stop, bind mount, autograde.

On this machine the engine comes from ../shared/tools/docker-sandbox; where no engine can be had the
module skips with the reason (under CI=true it fails instead).
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import autograde
from serverproc import free_port
from tests.fixtures import ROOT, SHARED, train_example

IMAGE = "p3"
SANDBOX = SHARED / "tools" / "docker-sandbox"
LRU_RATE = "0.3333333333333333"


def no_engine(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs Docker: {reason}")
    pytest.skip(reason)


def engine_ready() -> bool:
    return (
        shutil.which("docker") is not None
        and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    )


@pytest.fixture(scope="session")
def docker_env():
    """Make an engine answer, and set the build variables the sandbox asks for."""
    if SANDBOX.exists():
        result = subprocess.run([str(SANDBOX), "up"], capture_output=True, text=True, timeout=1800, check=False)
        if result.returncode != 0:
            no_engine(f"docker-sandbox up failed: {result.stderr.strip()[-300:]}")
        settings = dict(re.findall(r"^export (\w+)=(\S+)$", result.stdout, re.MULTILINE))
    elif engine_ready():
        settings = {}
    else:
        no_engine("no Docker engine answers and ../shared/tools/docker-sandbox is not there to start one")
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield settings
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def image(docker_env):
    autograde.build_image(IMAGE)
    return IMAGE


def wait_healthy(container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = autograde.docker("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", container)
        status, health = state.stdout.split()
        if (status, health) == ("running", "healthy"):
            return
        assert status == "running", f"the container stopped: {autograde.docker('logs', container, check=False).stderr}"
        time.sleep(0.5)  # Docker has no call that blocks until healthy
    raise AssertionError(f"the container was not healthy within {timeout:.0f} s")


def start_container(image, *run_args, command=(), container_port=5440):
    """docker run on a free loopback port; returns (name, host port) once healthy."""
    name, port = f"p3-test-{os.getpid()}-{free_port()}", free_port()
    publish = f"127.0.0.1:{port}:{container_port}"
    autograde.docker("run", "-d", "--name", name, "-p", publish, *run_args, image, *command)
    try:
        wait_healthy(name, timeout=120)
    except BaseException as error:
        logs = autograde.docker("logs", name, check=False)
        autograde.docker("rm", "-f", name, check=False)
        raise AssertionError(f"container never healthy: {logs.stderr[-500:]}") from error
    return name, port


@pytest.fixture(scope="module")
def container(image):
    name, port = start_container(image)
    yield name, port
    autograde.docker("rm", "-f", name, check=False)


def exec_client(name, *csvs, coefs="1,2,3"):
    return autograde.docker("exec", name, "python3", "client.py", "5440", coefs, *csvs, timeout=120, check=False)


def test_healthcheck_reports_healthy(container):
    name, _ = container
    status = autograde.docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    assert status == "healthy"


def test_client_from_the_host_through_the_mapped_loopback_port(container):
    _, port = container
    result = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), str(port), "1,2,3", "workloads/lru_order.csv"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE


def test_client_through_docker_exec_on_5440(container):
    name, _ = container
    result = exec_client(name, "workloads/lru_order.csv")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE


def test_graders_python_has_every_dependency(container):
    name, _ = container
    script = "import numpy, torch, grpc, grpc_health, modelserver_pb2; print(torch.__version__)"
    result = autograde.docker("exec", name, "python3", "-c", script)
    assert result.stdout.strip().startswith("2.13.0")


def test_the_server_process_does_not_run_as_root(container):
    name, _ = container
    status = autograde.docker("exec", name, "cat", "/proc/1/status").stdout
    real, effective, saved, _ = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert real == effective == saved == "10001"
    assert "server.py" in autograde.docker("exec", name, "cat", "/proc/1/cmdline").stdout


def test_image_stays_under_1_5_gb(image):
    size = int(autograde.docker("image", "inspect", "--format", "{{.Size}}", image).stdout)
    assert size <= 1.5e9, f"the image is {size / 1e9:.2f} GB"


def test_docker_stop_takes_under_5_seconds_and_exits_0(image):
    name, _ = start_container(image)
    try:
        started = time.monotonic()
        autograde.docker("stop", name, timeout=30)
        elapsed = time.monotonic() - started
        exit_code = autograde.docker("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    finally:
        autograde.docker("rm", "-f", name, check=False)
    assert elapsed < 5, f"docker stop took {elapsed:.1f} s"
    assert exit_code == "0"


def test_serves_with_the_project_folder_bind_mounted_as_working_directory(image, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "workloads", project / "workloads")
    shutil.copy(ROOT / "client.py", project)
    shutil.copy(ROOT / "stubs.py", project)  # a fresh clone: no generated stubs in the folder
    name, _ = start_container(image, "-w", "/autograde", "-v", f"{project}:/autograde")
    try:
        result = exec_client(name, "workloads/lru_order.csv")
    finally:
        autograde.docker("rm", "-f", name, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE


def test_editing_server_py_does_not_reinstall_torch(image, tmp_path):
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".hypothesis"))
    server_py = context / "server.py"
    server_py.write_text(server_py.read_text() + "\n# an edit\n")
    extra = ["--network", "host"] if os.environ.get("DOCKER_BUILD_NETWORK") else []
    torch_index = os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    result = autograde.docker(
        "build",
        *extra,
        "--build-arg",
        f"TORCH_INDEX_URL={torch_index}",
        "-t",
        f"{IMAGE}-edited",
        str(context),
        timeout=900,
    )
    autograde.docker("rmi", f"{IMAGE}-edited", check=False)
    output = result.stdout + result.stderr
    legacy_steps = re.split(r"\nStep \d+/\d+ : ", output)
    torch_step = next((step for step in legacy_steps if step.startswith("RUN pip install --index-url")), "")
    assert "Using cache" in torch_step or re.search(r"CACHED .*RUN pip install --index-url", output), output[-2000:]


def test_autograde_in_docker_mode_scores_100(image, tmp_path):
    results = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "autograde.py"), "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Score: 100/100" in result.stdout
    assert '"score": 100' in results.read_text()
    leftover = autograde.docker("ps", "-a", "--filter", "name=autograde-", "--format", "{{.Names}}").stdout.strip()
    assert leftover == ""


def test_serves_a_model_file_mounted_into_the_container(image, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    train_example("train_linear.py", models / "linear.pt")
    models.chmod(0o755)  # the container's user is not the owner
    name, _ = start_container(image, "-v", f"{models}:/models:ro", command=("--model", "/models/linear.pt"))
    try:
        result = exec_client(name, "workloads/lru_order.csv", coefs="-")
        logs = autograde.docker("logs", name).stderr
    finally:
        autograde.docker("rm", "-f", name, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE
    assert "model: /models/linear.pt" in logs


# --- the image's conventions: flags, commands, users, the probe ------------------------------------


def host_client(port: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "client.py"), str(port), "1,2,3", "workloads/lru_order.csv"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


@pytest.mark.parametrize(
    "command",
    [("--port", "6000"), ("python3", "/app/server.py", "--port", "6000")],
    ids=["flags-after-the-image", "a-command-as-given"],
)
def test_the_health_probe_follows_the_port_the_server_uses(image, command):
    name, port = start_container(image, command=command, container_port=6000)
    try:
        result = host_client(port)
    finally:
        autograde.docker("rm", "-f", name, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE


def test_a_command_that_is_not_the_server_runs_as_given(image):
    result = autograde.docker("run", "--rm", image, "python3", "-c", "print('as given')", timeout=120)
    assert result.stdout.strip() == "as given"


def test_a_missing_command_is_one_line(image):
    result = autograde.docker("run", "--rm", image, "no-such-command", timeout=120, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: cannot run 'no-such-command': No such file or directory"]


def test_serves_as_the_user_docker_run_names(image):
    name, _ = start_container(image, "-u", "1000")
    try:
        uid_line = next(
            line
            for line in autograde.docker("exec", name, "cat", "/proc/1/status").stdout.splitlines()
            if line.startswith("Uid:")
        )
        result = exec_client(name, "workloads/lru_order.csv")
    finally:
        autograde.docker("rm", "-f", name, check=False)
    assert uid_line.split()[1] == "1000"
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == LRU_RATE


def test_the_health_probe_speaks_tls_to_a_tls_server(image, certificate, tmp_path):
    cert, key = certificate
    certs = tmp_path / "certs"
    certs.mkdir(mode=0o755)
    for source in (cert, key):
        shutil.copy(source, certs)
        (certs / source.name).chmod(0o644)  # the server's user must read them
    flags = ("--tls-cert", "/certs/cert.pem", "--tls-key", "/certs/key.pem")
    name, _ = start_container(image, "-v", f"{certs}:/certs:ro", command=flags)
    health = autograde.docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    autograde.docker("rm", "-f", name, check=False)
    assert health == "healthy"


# --- the course's grading procedure, for real, on every kind of host -------------------------------

GRADER_UIDS = {"root": 0, "uid-1000": 1000, "uid-nowhere": 4242}  # 4242: no user of the image has it
STUB_MAKERS = {"grpcio-tools-1.58.0": "grpcio-tools==1.58.0", "newest-grpcio-tools": "grpcio-tools", "no-stubs": None}
STUBS_COMMAND = ["-m", "grpc_tools.protoc", "-I=.", "--python_out=.", "--grpc_python_out=.", "modelserver.proto"]
PROJECT_JUNK = shutil.ignore_patterns(".*", "__pycache__", "*_pb2.py", "*_pb2_grpc.py", "*.json")


@pytest.fixture(scope="session")
def hosts_folder():
    """A folder every uid of the matrix can enter: pytest's own temporary folders are root's alone."""
    folder = Path(tempfile.mkdtemp(prefix="p3-graders-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def everyones_python() -> str:
    """A Python every uid of the matrix may run (this one may live in root's home), or skip."""
    for candidate in (Path(sys.executable).resolve(), Path("/usr/bin/python3").resolve()):
        folders = [candidate, *candidate.parents]
        if candidate.is_file() and all(folder.stat().st_mode & stat.S_IXOTH for folder in folders):
            return str(candidate)
    pytest.skip("no Python on this host can be run by every user (needed to play a grader of another uid)")


@pytest.fixture(scope="session")
def stub_makers(hosts_folder):
    """A throwaway venv per grpcio-tools a grader may have on the host: its python, by name."""
    python, pythons = everyones_python(), {}
    for name, requirement in STUB_MAKERS.items():
        if requirement is None:
            continue
        venv = hosts_folder / f"venv-{name}"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        installed = subprocess.run([*pip, requirement], capture_output=True, text=True, timeout=600, check=False)
        assert installed.returncode == 0, installed.stderr
        pythons[name] = venv / "bin" / "python"
    return pythons


def as_host_user(uid: int, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command on the host as the folder's owner would."""
    return subprocess.run(
        command, user=uid, group=uid, extra_groups=[], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("stubs", list(STUB_MAKERS))
@pytest.mark.parametrize("owner", list(GRADER_UIDS))
def test_the_courses_grading_procedure_scores_full_marks(image, hosts_folder, stub_makers, owner, stubs):
    uid, home = GRADER_UIDS[owner], hosts_folder / f"{owner}-{stubs}"
    project = home / "project"
    shutil.copytree(ROOT, project, ignore=PROJECT_JUNK)
    shutil.copytree(ROOT / "workloads", project / "workload")
    shutil.copy(ROOT / "tests" / "course_grader.py", project / "docker_autograde.py")
    subprocess.run(["chown", "-R", f"{uid}:{uid}", str(home)], check=True, timeout=60)
    if stubs in stub_makers:  # step 1, on the host, as the grader
        made = as_host_user(uid, [str(stub_makers[stubs]), *STUBS_COMMAND], cwd=project)
        assert made.returncode == 0, made.stderr

    container = f"p3-graders-{os.getpid()}-{owner}-{stubs}"
    autograde.docker("run", "--rm", "-d", "--name", container, "-w", "/autograde", "-v", f"{project}:/autograde", image)
    try:
        time.sleep(5)  # the procedure's fixed wait, on purpose: the server must be SERVING within it
        graded = autograde.docker("exec", container, "python3", "docker_autograde.py", timeout=300, check=False)
    finally:
        autograde.docker("rm", "-f", container, check=False)
    assert graded.returncode == 0, graded.stdout + graded.stderr

    scores = json.loads((project / "test.json").read_text())
    failed = {name: test["error"] for name, test in scores.items() if test["score"] != test["max"]}
    assert failed == {}
    not_the_owners = [str(path) for path in project.rglob("*") if path.stat().st_uid != uid]
    assert not_the_owners == []

    read_overwrite_rename = "cat test.json >/dev/null && echo {} > test.json && mv test.json renamed.json"
    handled = as_host_user(uid, ["sh", "-c", read_overwrite_rename], cwd=project)
    assert handled.returncode == 0, handled.stderr
    remake = stub_makers.get(stubs, stub_makers["grpcio-tools-1.58.0"])
    assert as_host_user(uid, [str(remake), *STUBS_COMMAND], cwd=project).returncode == 0
    assert as_host_user(uid, ["rm", "-rf", str(project)], cwd=home).returncode == 0
    assert not project.exists()


def test_a_failed_build_shows_the_builds_own_error_and_leaves_no_container(image, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=PROJECT_JUNK)
    dockerfile = project / "Dockerfile"
    broken_step = "RUN pip install --no-index no-such-package==0.0.0\n"
    dockerfile.write_text(dockerfile.read_text().replace("COPY modelserver.proto inference.proto ./\n", broken_step, 1))
    result = subprocess.run(
        [sys.executable, "autograde.py", "--image", "p3-broken", "--json", str(tmp_path / "results.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=project,
        check=False,
    )
    leftover = autograde.docker("ps", "-a", "--filter", "ancestor=p3-broken", "--format", "{{.Names}}").stdout
    assert result.returncode == 1
    assert "No matching distribution found for no-such-package==0.0.0" in result.stdout
    assert "legacy builder" not in result.stdout and "Score: 0/100" in result.stdout
    assert leftover.strip() == ""
