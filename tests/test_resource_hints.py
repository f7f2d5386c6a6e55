"""The teacher stage carries its resource hints into the pipeline proto (what Dataflow reads);
the student stage does not."""
import apache_beam as beam

from conftest import write_dataset
from titans.pipeline.cascade import build_pipeline
from titans.pipeline.plan import RunConfig, plan_run
from titans.models.loading import ModelRef


def test_accelerator_hint_lands_on_the_teacher_inference_only(tmp_path, models):
    write_dataset(tmp_path / "data", 200, files=1)
    hint = "type:nvidia-l4;count:1;install-nvidia-driver"
    plan = plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                              student=ModelRef(models[0]), teacher=ModelRef(models[1]),
                              teacher_resource_hints={"accelerator": hint, "min_ram": "16GB"}))
    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, plan, 0.0)
    proto = p.to_runner_api()
    hinted = {}
    for t in proto.components.transforms.values():
        env = proto.components.environments.get(t.environment_id)
        if env is not None and env.resource_hints:
            hinted[t.unique_name] = dict(env.resource_hints)
    teacher = [name for name in hinted if name.startswith("ScoreTeacher/BeamML_RunInference")]
    assert teacher, f"no hinted teacher transform among {sorted(hinted)}"
    hints = hinted[teacher[0]]
    assert hints["beam:resources:accelerator:v1"] == hint.encode()
    assert int(hints["beam:resources:min_ram_bytes:v1"]) == 16 * 10**9
    assert not [name for name in hinted if not name.startswith("ScoreTeacher/")]
