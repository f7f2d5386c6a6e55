"""The teacher stage carries its resource hints into the pipeline proto (what Dataflow reads);
the student stage does not."""
import apache_beam as beam

from conftest import write_dataset
from titans.pipeline.graphs.cascade import build_pipeline
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
    # the whole ScoreTeacher composite (BatchElements too) and nothing else
    assert not [name for name in hinted if name.split("/")[0] != "ScoreTeacher"]


def _proto(tmp_path, models, hints):
    write_dataset(tmp_path / "data", 200, files=1)
    plan = plan_run(RunConfig(input=str(tmp_path / "data"), output=str(tmp_path / "out"),
                              student=ModelRef(models[0]), teacher=ModelRef(models[1]),
                              teacher_resource_hints=hints))
    p = beam.Pipeline(runner="FnApiRunner")
    build_pipeline(p, plan, 0.0)
    return p.to_runner_api()


def _top_level(proto) -> dict:
    transforms = proto.components.transforms
    root = transforms[proto.root_transform_ids[0]]
    return {transforms[t].unique_name: transforms[t] for t in root.subtransforms}


def _hints_below(proto, transform) -> set:
    """The resource hint URNs of the environments of every step below ``transform``."""
    transforms, envs = proto.components.transforms, proto.components.environments
    found, stack = set(), [transform]
    while stack:
        t = stack.pop()
        stack += [transforms[s] for s in t.subtransforms]
        if t.environment_id in envs:
            found |= set(envs[t.environment_id].resource_hints)
    return found


def test_the_teacher_is_reached_through_a_fusion_break_and_alone_asks_for_a_gpu(tmp_path, models):
    """On Dataflow the teacher's steps run on the GPU pool and the student's on CPU workers:
    the teacher's environment carries the hint (BatchElements included, so the hard rows are
    batched where they are scored), the student's does not, and a Reshuffle between them
    makes the stage boundary explicit."""
    hint = "type:nvidia-l4;count:1;install-nvidia-driver"
    proto = _proto(tmp_path, models, {"accelerator": hint})
    top = _top_level(proto)
    accelerator = "beam:resources:accelerator:v1"
    assert accelerator in _hints_below(proto, top["ScoreTeacher"])
    batching = [t for t in proto.components.transforms.values()
                if t.unique_name.startswith("ScoreTeacher/BatchElements") and not t.subtransforms]
    assert batching and all(accelerator in _hints_below(proto, t) for t in batching)
    for name, transform in top.items():
        if name != "ScoreTeacher":
            assert not _hints_below(proto, transform), name
    # SplitByDeferral's hard rows -> ToTeacherWorkers (a GroupByKey inside) -> ScoreTeacher
    fusion_break, split = top["ToTeacherWorkers"], top["SplitByDeferral"]
    [into_break] = fusion_break.inputs.values()
    assert into_break == split.outputs["hard"]
    assert set(top["ScoreTeacher"].inputs.values()) == set(fusion_break.outputs.values())
    urns = {proto.components.transforms[t].spec.urn for t in fusion_break.subtransforms}
    below = list(fusion_break.subtransforms)
    while below:
        t = proto.components.transforms[below.pop()]
        urns.add(t.spec.urn)
        below += list(t.subtransforms)
    assert "beam:transform:group_by_key:v1" in urns
    # the student reads its input from the read, never through the break
    assert set(top["ScoreStudent"].inputs.values()).isdisjoint(fusion_break.outputs.values())


def test_no_fusion_break_without_a_hint(tmp_path, models):
    """Locally the break would only cost time (the in-process runner materialises the hard
    rows before the teacher): it is there only when the teacher has resource hints."""
    top = _top_level(_proto(tmp_path, models, {}))
    assert "ToTeacherWorkers" not in top and "ScoreTeacher" in top
