"""The Flex Template: metadata.json is `titans run`'s flags (regenerating it gives the same
file, so a new flag forces a regen), it is valid Dataflow template metadata, and the shell
scripts that build and run the template are syntactically sound and call gcloud with a
template, an image and parameters that the metadata accepts."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATAFLOW = ROOT / "deploy" / "dataflow"
METADATA = DATAFLOW / "metadata.json"
SCRIPTS = sorted((ROOT / "deploy").rglob("*.sh"))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mm = load(DATAFLOW / "make_metadata.py")


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(METADATA.read_text())


def test_parameters_are_exactly_the_flags_of_titans_run(metadata):
    from titans.pipeline.cli.main import build_parser

    parser = build_parser()
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]
    flags = {a.dest: a for a in run._actions if a.option_strings and a.dest != "help"
             and a.dest not in mm.NOT_PARAMETERS}
    params = {p["name"]: p for p in metadata["parameters"]}
    assert set(params) == set(flags), "regenerate: python deploy/dataflow/make_metadata.py"
    # a template launch must submit a job: --describe (print the graph, submit nothing) is
    # not a parameter
    assert "describe" not in params and mm.NOT_PARAMETERS == {"describe"}
    for name, action in flags.items():
        assert params[name]["isOptional"] == (not action.required), name
        assert ("--" + name.replace("_", "-")) in action.option_strings, name
        if action.nargs == 0:
            assert params[name]["paramType"] == "BOOLEAN", name
        if action.choices:
            assert [o["value"] for o in params[name]["enumOptions"]] == list(action.choices)


def test_metadata_json_is_what_the_generator_writes_today():
    assert METADATA.read_text() == mm.render(mm.build_metadata()), (
        "deploy/dataflow/metadata.json is stale: run python deploy/dataflow/make_metadata.py")
    done = subprocess.run([sys.executable, str(DATAFLOW / "make_metadata.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_metadata_is_valid_dataflow_template_metadata(metadata):
    """Parsed strictly (unknown fields, wrong types and enum values fail) into Dataflow's
    own TemplateMetadata message."""
    from google.cloud.dataflow_v1beta3.types import templates
    from google.protobuf import json_format

    message = templates.TemplateMetadata.pb()()
    json_format.ParseDict(metadata, message, ignore_unknown_fields=False)
    assert len(message.parameters) == len(metadata["parameters"])
    assert not message.streaming
    names = [p["name"] for p in metadata["parameters"]]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names)


def test_regexes_accept_defaults_and_examples_and_reject_junk(metadata):
    from titans.pipeline.cli.main import build_parser

    run = next(a for a in build_parser()._actions if a.dest == "command").choices["run"]
    defaults = {a.dest: a.default for a in run._actions if a.option_strings}
    params = {p["name"]: p for p in metadata["parameters"]}

    def ok(name, value):
        return all(re.search(r, value) for r in params[name].get("regexes", []))

    for name, default in defaults.items():
        if name in params and default not in (None, ""):
            value = str(default).lower() if isinstance(default, bool) else str(default)
            assert ok(name, value), (name, value)
    good = {"input": "gs://b/events/dt=2026-11-28/", "output": "gs://b/labels/dt=2026-11-28",
            "teacher": "/models/teacher.pt", "deferral_rate": "0.25", "audit_rate": "1",
            "threshold": "-inf", "rule": "entropy", "overwrite": "true",
            "teacher_accelerator": "type:nvidia-l4;count:1;machine_type:g2-standard-4;"
                                   "install-nvidia-driver",
            "teacher_min_ram": "16GB", "feature_columns": "a,b, c", "teacher_device": "cuda"}
    for name, value in good.items():
        assert ok(name, value), (name, value)
    bad = {"input": "/local/data", "deferral_rate": "1.5", "batch_size": "0", "rule": "vote",
           "overwrite": "yes", "teacher_accelerator": "nvidia-l4", "teacher_device": "tpu",
           "teacher_min_ram": "lots"}
    for name, value in bad.items():
        assert not ok(name, value), (name, value)


def test_check_parameters(metadata):
    base = {"input": "gs://b/in/", "output": "gs://b/out", "student": "gs://b/s.pt",
            "teacher": "gs://b/t.pt"}
    assert mm.check_parameters(base, metadata) == []
    assert mm.check_parameters({**base, "sdk_container_image": "img"}, metadata) == []
    errors = mm.check_parameters({"input": "gs://b/in/", "teacher_batchsize": "1",
                                  "deferral_rate": "2"}, metadata)
    assert any("teacher_batchsize" in e for e in errors)
    assert any("'output' is missing" in e for e in errors)
    assert any("deferral_rate" in e for e in errors)


def test_no_parameter_shadows_a_beam_option(metadata):
    """The launcher passes template parameters and Beam options side by side as --name=value."""
    assert not {p["name"] for p in metadata["parameters"]} & mm.beam_option_names()


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud not installed")
def test_gcloud_builds_the_template_spec_offline(tmp_path, metadata):
    """gcloud's own parser reads metadata.json (--print-only: nothing is uploaded)."""
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               CLOUDSDK_CORE_DISABLE_PROMPTS="1")
    done = subprocess.run(
        ["gcloud", "dataflow", "flex-template", "build", "gs://bucket/templates/titans.json",
         "--image", "us-central1-docker.pkg.dev/p/titans/titans:1", "--sdk-language", "PYTHON",
         "--metadata-file", str(METADATA), "--print-only", "--project", "p"],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout[done.stdout.index("{"):])
    assert spec["sdkInfo"]["language"] == "PYTHON"
    assert [p["name"] for p in spec["metadata"]["parameters"]] == \
        [p["name"] for p in metadata["parameters"]]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_are_strict_and_parse(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.stat(script).st_mode & stat.S_IXUSR, f"chmod +x {script}"
    # settings first: every variable assignment of the settings block precedes the first command
    assert "# --- settings" in text
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` on PATH that records its arguments (one JSON list per call) and succeeds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.jsonl"
    script = bin_dir / "gcloud"
    script.write_text(f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    script.chmod(0o755)

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, calls


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def parse_gcloud_dict(value: str) -> dict:
    """gcloud's KEY=VALUE,... syntax, with its '^DELIM^' alternative delimiter."""
    delim = ","
    if value.startswith("^"):
        delim, value = value[1:].split("^", 1)
    return dict(item.split("=", 1) for item in value.split(delim) if item)


def test_build_script_builds_the_template_from_the_image(fake_gcloud):
    env, calls = fake_gcloud
    env.update(PROJECT="proj", BUCKET="bkt", TAG="t1", BUILDER="cloudbuild")
    done = subprocess.run(["bash", str(DATAFLOW / "build.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    submit, build = calls()
    assert submit[:2] == ["builds", "submit"] and "--config" in submit
    build_args = build
    assert build_args[:3] == ["dataflow", "flex-template", "build"]
    assert build_args[3] == "gs://bkt/templates/titans-t1.json"
    assert _flag(build_args, "--image") == "us-central1-docker.pkg.dev/proj/titans/titans:t1"
    assert _flag(build_args, "--sdk-language") == "PYTHON"
    assert _flag(build_args, "--metadata-file") == "deploy/dataflow/metadata.json"


def test_run_script_passes_parameters_the_template_accepts(fake_gcloud, metadata):
    env, calls = fake_gcloud
    env.update(PROJECT="proj", BUCKET="bkt", IMAGE="img:1", TEMPLATE="gs://bkt/t.json",
               INPUT="gs://bkt/events/dt=2026-11-28/", OUTPUT="gs://bkt/labels/dt=2026-11-28",
               STUDENT="gs://bkt/models/student.pt", TEACHER="gs://bkt/models/teacher.pt",
               FEATURE_COLUMNS="a,b")
    done = subprocess.run(["bash", str(DATAFLOW / "run.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    (args,) = calls()
    assert args[:3] == ["dataflow", "flex-template", "run"]
    assert _flag(args, "--template-file-gcs-location") == "gs://bkt/t.json"
    params = parse_gcloud_dict(_flag(args, "--parameters"))
    assert mm.check_parameters(params, metadata) == []
    assert params["feature_columns"] == "a,b" and params["sdk_container_image"] == "img:1"
    assert params["teacher_accelerator"].startswith("type:nvidia-l4;count:1;")
    # right fitting: the GPU comes from the teacher's resource hint, never for the whole job
    assert not [a for a in args if "worker_accelerator" in a]
    assert _flag(args, "--worker-machine-type").startswith("n2-")
    # the launcher imports torch and loads both models: not Dataflow's n1-standard-1
    assert _flag(args, "--launcher-machine-type") == "n2-standard-4"
    assert int(params["disk_size_gb"]) >= 50  # the workers' disk holds the multi-GB image
    env["LAUNCHER_MACHINE_TYPE"] = "n2-highmem-8"
    done = subprocess.run(["bash", str(DATAFLOW / "run.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _flag(calls()[-1], "--launcher-machine-type") == "n2-highmem-8"


def test_build_script_prints_the_image_size(tmp_path, fake_gcloud):
    """Cloud Build: a step after the build prints the image's unpacked size into the build
    log; a local Docker build prints it here."""
    env, calls = fake_gcloud
    saved = tmp_path / "cloudbuild.yaml"
    gcloud = Path(env["PATH"].split(os.pathsep)[0]) / "gcloud"
    gcloud.write_text(gcloud.read_text() + (
        "if '--config' in sys.argv:\n"
        f"    open({str(saved)!r}, 'w').write(open(sys.argv[sys.argv.index('--config') + 1]).read())\n"))
    env.update(PROJECT="proj", BUCKET="bkt", TAG="t1", BUILDER="cloudbuild")
    done = subprocess.run(["bash", str(DATAFLOW / "build.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    import yaml

    config = yaml.safe_load(saved.read_text())
    image = "us-central1-docker.pkg.dev/proj/titans/titans:t1"
    build, size = config["steps"]
    assert build["args"][0] == "build" and config["images"] == [image]
    assert size["entrypoint"] == "bash" and size["args"][0] == "-c"
    assert size["args"][1] == f"docker image inspect --format 'image size: {{{{.Size}}}} bytes unpacked' '{image}'"
    # a local Docker build: the same command, run here (a docker on PATH that knows the image)
    docker = gcloud.parent / "docker"
    docker.write_text(f"#!{sys.executable}\nimport sys\n"
                      "if sys.argv[1:3] == ['image', 'inspect']:\n"
                      "    print(sys.argv[4].replace('{{.Size}}', '6123456789'))\n")
    docker.chmod(0o755)
    env["BUILDER"] = "docker"
    done = subprocess.run(["bash", str(DATAFLOW / "build.sh")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "image size: 6123456789 bytes unpacked" in done.stdout
