"""deploy/Dockerfile pins what Dataflow needs to match: the Beam SDK version and the Python
version of the environment that launches the job (this one), the Beam boot entrypoint of
that same SDK image, a CUDA build of torch; and the no-container CPU route stages a package
that holds titans."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile():
    inst = instructions(DOCKERFILE)
    args: dict[str, str] = {}
    for keyword, rest in inst:
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip()

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)

    stages = {}
    for keyword, rest in inst:
        if keyword == "FROM":
            parts = rest.split()
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages[alias] = expand(parts[0])
    return {"inst": inst, "args": args, "expand": expand, "stages": stages}


def pyproject_beam_pin() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (beam,) = [d for d in deps if re.match(r"apache-beam\b", d)]
    return re.search(r"==\s*([\w.]+)", beam).group(1)


def test_beam_and_python_pins_match_the_launching_environment(dockerfile):
    import apache_beam

    args = dockerfile["args"]
    assert args["BEAM_VERSION"] == apache_beam.__version__ == pyproject_beam_pin()
    assert args["PYTHON_VERSION"] == "%d.%d" % sys.version_info[:2]


def test_boot_entrypoint_comes_from_the_same_beam_sdk_image(dockerfile):
    v = dockerfile["args"]
    assert dockerfile["stages"]["beam_sdk"] == \
        f"apache/beam_python{v['PYTHON_VERSION']}_sdk:{v['BEAM_VERSION']}"
    inst = dockerfile["inst"]
    assert ("COPY", "--from=beam_sdk /opt/apache/beam /opt/apache/beam") in inst
    assert inst[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    # the final stage installs that same Beam version into the Python that boot runs
    run_lines = " ".join(rest for k, rest in inst if k == "RUN")
    assert '"apache-beam[gcp]==${BEAM_VERSION}"' in run_lines
    assert "python${PYTHON_VERSION} -m venv /opt/venv" in run_lines
    env = " ".join(rest for k, rest in inst if k == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env and "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in env
    assert "ARROW_DEFAULT_MEMORY_POOL=jemalloc" in env  # as the titans command (cli/startup.py)


def test_flex_template_launcher_matches_python_and_runs_launch_py(dockerfile):
    major, minor = dockerfile["args"]["PYTHON_VERSION"].split(".")
    assert f"/python{major}{minor}-template-launcher-base:" in dockerfile["stages"]["flex_launcher"]
    inst = dockerfile["inst"]
    assert ("COPY", "--from=flex_launcher /opt/google/dataflow/python_template_launcher "
                    "/opt/google/dataflow/python_template_launcher") in inst
    workdir = [rest for k, rest in inst if k == "WORKDIR"][-1]
    (py_file,) = [rest.split("=", 1)[1] for k, rest in inst
                  if k == "ENV" and rest.startswith("FLEX_TEMPLATE_PYTHON_PY_FILE=")]
    assert py_file.startswith(workdir + "/")
    assert ("COPY", "deploy ./deploy") in inst
    assert (ROOT / py_file[len(workdir) + 1:]).is_file()


def test_torch_is_a_pinned_cuda_build_matching_the_base_image(dockerfile):
    args = dockerfile["args"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    makefile_pin = re.search(r"TORCH\s*\?=\s*torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin and args["TORCH_VERSION"] == makefile_pin.group(1)
    cu = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(12)(\d)", args["TORCH_INDEX_URL"])
    assert cu, args["TORCH_INDEX_URL"]
    # the -base- variant: torch's wheels bring CUDA and cuDNN, a -cudnn-runtime- base would
    # hold a second copy of both
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert base, args["CUDA_IMAGE"]
    assert base.groups() == cu.groups(), "CUDA of the base image and of the torch wheel differ"
    # CUDA 12 (any 525+ driver, what Dataflow documents for its GPUs), not PyPI's CUDA 13,
    # and the build checks the installed torch really is that build
    assert args["TORCH_CUDA"] == "%s.%s" % cu.groups()
    assert "--index-url \"${TORCH_INDEX_URL}\"" in DOCKERFILE.read_text()
    run_lines = " ".join(rest for k, rest in dockerfile["inst"] if k == "RUN")
    assert "torch.version.cuda == '${TORCH_CUDA}'" in run_lines


def test_everything_copied_from_the_build_context_exists(dockerfile):
    for keyword, rest in dockerfile["inst"]:
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), src


def test_dockerfile_parses_with_docker_own_parser():
    """The moby/buildkit parser (PyPI package `dockerfile`), where it is installed."""
    dockerfile = pytest.importorskip("dockerfile")
    commands = dockerfile.parse_file(str(DOCKERFILE))
    assert commands[-1].cmd == "ENTRYPOINT"


def test_cpu_route_stages_a_package_with_titans(tmp_path):
    """No container: `--setup_file ./pyproject.toml` makes Beam 2.77 run `python -m build
    --no-isolation --sdist` in the project directory and stage the sdist for the workers.
    The same PEP 517 call on a copy of the project must give an sdist holding the package;
    torch comes from deploy/requirements-cpu-worker.txt."""
    from apache_beam.runners.portability import stager

    assert "'pyproject.toml'" in Path(stager.__file__).read_text()  # accepted by 2.77's stager
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for package in ("pipeline", "transforms", "models"):
        shutil.copytree(ROOT / package, project / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; "
                               "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "dist")],
        cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sdist = tmp_path / "dist" / done.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for module in ("pipeline/cli/main.py", "transforms/inference.py", "models/loading.py"):
        assert any(n.endswith(module) for n in names), module
    requirements = (ROOT / "deploy" / "requirements-cpu-worker.txt").read_text()
    version = re.search(r"TORCH_VERSION=([\d.]+)", DOCKERFILE.read_text()).group(1)
    assert f"torch=={version}+cpu" in requirements
