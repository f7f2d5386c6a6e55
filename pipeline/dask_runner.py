"""Beam's Dask runner with its ParDo translation fixed, so titans' pipelines run on a Dask
cluster (``--runner DaskRunner --dask_client_address tcp://SCHEDULER:8786``).

Beam 2.77's ``apache_beam.runners.dask`` translates a ParDo into ``Bag.map_partitions`` and
gets three things wrong that every titans pipeline relies on (found on a 2-worker
``distributed.LocalCluster``; see docs/runners.md for a minimal pipeline showing each):

1. Tagged outputs are mixed: the bag of a multi-output ParDo holds the elements of every
   tag, and each consumer of ``outputs.TAG`` is handed that whole bag (the visitor looks up
   the producer, not the output). ``SplitByDeferral``'s dead-letter output then holds its
   easy and hard tables too: ``'pyarrow.lib.Table' object has no attribute 'rows'``.
2. Outputs of ``finish_bundle`` are dropped (the partition's results are taken before
   ``finish_bundle`` runs): BatchElements' last batch (rows never scored) and every
   writer's file path (files never put in place).
3. A side input is computed with a separate ``Bag.compute()`` inside the consuming task,
   so everything upstream of it runs again, once per side input (both models, the writers),
   and only the last transform's bag is handed to the scheduler.

Here a ParDo's bag holds ``(tag, value)`` pairs, including ``finish_bundle``'s, and each
consumer selects its own tag; side inputs are graph dependencies (one task gathers each), so
the whole job is one task graph computed once; every bag nothing consumes is computed; and
a Reshuffle spreads its input over ``--dask_npartitions`` bundles (Beam's is a no-op).
Each partition unpickles its own copy of the DoFn (as a Beam worker does per bundle
processor), so tasks sharing a worker process never share a DoFn's state. Everything else
(Create, GroupByKey, Flatten, the no-ops, DaskOptions) is Beam's. titans swaps this class in
for Beam's DaskRunner (``options.pipeline_options``); the other runners are untouched.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.internal import pickler
from apache_beam.runners.common import (DoFnContext, DoFnInvoker, DoFnSignature, Receiver,
                                        _OutputHandler)
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import overrides
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.transforms.sideinputs import SideInputMap

class _Collect(Receiver):
    """Receives one tag's windowed values as (tag, value) pairs (windows dropped, as Beam's
    own translation does for main outputs; titans' pipelines are globally windowed)."""

    def __init__(self, tag, out: list):
        self.tag, self.out = tag, out

    def receive(self, windowed_value):
        self.out.append((self.tag, windowed_value.value))


class _Receivers(dict):
    def __init__(self, out: list):
        super().__init__()
        self.out = out

    def __missing__(self, tag):
        receiver = self[tag] = _Collect(tag, self.out)
        return receiver


@dataclasses.dataclass(frozen=True)
class _SideSpec:
    """What a SideInputMap needs, besides the values: the view and its window mapping."""
    view_class: type
    view_options: dict
    window_mapping_fn: object


@dataclasses.dataclass(frozen=True)
class _Step:
    """A ParDo as its tasks need it; one opaque object, so dask never looks inside for keys
    or tasks (a tuple whose first item is callable would be taken for a task)."""
    fn: bytes  # the pickled DoFn: unpickled per partition
    label: str
    window_fn: object
    args: tuple  # with placeholders where the side inputs go, as Beam's runners pass them
    kwargs: dict
    sides: tuple  # a _SideSpec per side input


def _run_bundle(items, step: _Step, *sides):
    """One partition through a fresh copy of the DoFn: [(tag, value), ...], finish_bundle's
    outputs included. ``sides``: each side input's whole contents."""
    out: list = []
    receivers = _Receivers(out)
    handler = _OutputHandler(window_fn=step.window_fn, main_receivers=receivers[None],
                             tagged_receivers=receivers, per_element_output_counter=None,
                             output_batch_converter=None, process_yields_batches=False,
                             process_batch_yields_elements=False)
    side_maps = [SideInputMap(s.view_class, s.view_options,
                              [te.get_windowed_value(v, s.window_mapping_fn) for v in values])
                 for s, values in zip(step.sides, sides)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(pickler.loads(step.fn)), handler, side_inputs=side_maps,
        context=DoFnContext(step.label, state=None), input_args=list(step.args),
        input_kwargs=step.kwargs, user_state_context=None,
        bundle_finalizer_param=beam.DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(te.get_windowed_value(item, step.window_fn))
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return out


def _select(pairs, tag):
    return [value for t, value in pairs if t == tag]


def _flat(lists):
    return [x for part in lists for x in part]


class _ParDo(te.DaskBagOp):
    """A ParDo: a task per partition of its main input, which also depends on one task per
    side input that gathers the side input's partitions. Built as a graph layer of its own:
    dask's ``map_partitions`` would embed each side input's whole upstream graph in a
    subgraph task of its own (recomputing it), which is the problem this module avoids."""

    def apply(self, input_bag, side_inputs=None):
        from dask.base import tokenize
        from dask.bag.core import Bag
        from dask.highlevelgraph import HighLevelGraph

        transform = self.transform
        main = next(iter(self.applied.main_inputs.values()))
        window_fn = main.windowing.windowfn if hasattr(main, "windowing") else None
        side_inputs = list(side_inputs or ())
        step = _Step(pickler.dumps(transform.fn), transform.label, window_fn,
                     tuple(transform.args), dict(transform.kwargs),
                     tuple(spec for spec, _ in side_inputs))
        bags = [bag for _, bag in side_inputs]
        name = f"pardo-{tokenize(input_bag.name, step.fn, step.label, [b.name for b in bags])}"
        layer: dict = {}
        side_keys = []
        for i, bag in enumerate(bags):
            side_keys.append(f"{name}-side-{i}")
            layer[side_keys[-1]] = (_flat, [(bag.name, j) for j in range(bag.npartitions)])
        for j in range(input_bag.npartitions):
            layer[(name, j)] = (_run_bundle, (input_bag.name, j), step, *side_keys)
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[input_bag, *bags])
        return Bag(graph, name, input_bag.npartitions)


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner with the ParDo translation above (see the module docstring)."""

    @staticmethod
    def to_dask_bag_visitor(bag_kwargs=None):
        return _Visitor(bag_kwargs or {})

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.bag as db
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)  # noqa: SLF001
        client = ddist.Client(**dask_options)
        pipeline.replace_all(beam_dask.dask_overrides())
        visitor = self.to_dask_bag_visitor(bag_kwargs)
        pipeline.visit(visitor)
        # every bag no step consumes (the job's last steps), as one collection (optimized
        # apart, collections would each get their own copy of a shared upstream step), and
        # counted rather than gathered: the client needs only to know they ran
        ends = db.concat([visitor.output_of(node, tag) for node, tag in visitor.unconsumed()])
        futures = [client.compute(dask.optimize(ends.count())[0])]
        return beam_dask.DaskRunnerResult(client, futures)


class _Visitor(beam.pipeline.PipelineVisitor):
    """Beam's DaskBagVisitor, but each input is the producer's bag for that output's tag."""

    def __init__(self, bag_kwargs: dict):
        self.bag_kwargs = bag_kwargs
        self.bags: dict = {}  # applied transform -> its bag
        self.pardos: set = set()  # applied transforms whose bag holds (tag, value) pairs
        self.consumed: set = set()  # (applied transform, tag) read by a later step

    def output_of(self, node, tag):
        bag = self.bags[node]
        return bag.map_partitions(_select, tag) if node in self.pardos else bag

    def _input(self, pcoll):
        self.consumed.add((pcoll.producer, pcoll.tag))
        return self.output_of(pcoll.producer, pcoll.tag)

    def unconsumed(self):
        produced = [(node, tag) for node in self.bags for tag in node.outputs]
        ends = [(node, tag) for node, tag in produced if (node, tag) not in self.consumed]
        return ends or [(node, None) for node in list(self.bags)[-1:]]

    def visit_transform(self, node) -> None:
        transform = node.transform
        is_pardo = transform.__class__ is beam.ParDo
        op_class = _ParDo if is_pardo else te.TRANSLATIONS.get(transform.__class__, te.NoOp)
        op = op_class(node, bag_kwargs=self.bag_kwargs)
        inputs = [self._input(i) for i in node.inputs if not isinstance(i, pvalue.PBegin)]
        if not inputs:
            input_bag = None
        elif len(inputs) == 1 and not isinstance(op, te.Flatten):
            input_bag = inputs[0]
        else:
            input_bag = inputs
        sides = [(_SideSpec(type(si), si._view_options(), si._window_mapping_fn),  # noqa: SLF001
                  self._input(si.pvalue)) for si in node.side_inputs]
        spread = self.bag_kwargs.get("npartitions") or 0
        if is_pardo:
            self.bags[node] = op.apply(input_bag, sides)
            self.pardos.add(node)
        elif isinstance(transform, overrides._Reshuffle) and spread > input_bag.npartitions:  # noqa: SLF001
            # Beam's translation makes a Reshuffle a no-op; here it spreads its input over
            # --dask_npartitions bundles (a reader's few shards, the teacher's hard rows)
            self.bags[node] = input_bag.repartition(npartitions=spread)
        else:
            if sides:
                raise NotImplementedError(f"{node.full_label}: side inputs on a non-ParDo step")
            self.bags[node] = op.apply(input_bag)
