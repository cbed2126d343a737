"""The validated stage graph: stages with their implementation and parsed params, dependencies, and
topological order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .errors import Problem
from .records import StageImpl


@dataclass
class Stage:
    """A validated stage: the spec entry, its implementation and its parsed params.

    Attributes:
        index: position in the spec's ``stages`` list. spec: the :class:`~rlhf_spec.spec.models.StageSpec`.
        deps: stage ids it depends on (data ``inputs`` plus stages named by model references).
        model_refs: ``param path -> name`` for every model reference that is set (nested ones included).
        dataset_refs: ``param path -> dataset name`` for every dataset reference that is set.
        output_type: the artifact type of its output.
    """

    index: int
    spec: Any
    impl: StageImpl
    params: BaseModel
    deps: list[str] = field(default_factory=list)
    model_refs: dict[str, str] = field(default_factory=dict)
    dataset_refs: dict[str, str] = field(default_factory=dict)
    output_type: str = ""

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def ptr(self) -> str:
        """The stage's JSON pointer, ``/stages/<index>``."""
        return f"/stages/{self.index}"


@dataclass
class Pipeline:
    """A validated spec: the parsed document, stages in topological order, and where it came from."""

    spec: Any
    stages: list[Stage]
    source: str
    raw: dict

    def stage(self, sid: str) -> Stage:
        """The stage with id ``sid``.

        Raises:
            KeyError: if there is none.
        """
        for s in self.stages:
            if s.id == sid:
                return s
        raise KeyError(sid)

    def ancestors(self, sid: str) -> list[Stage]:
        """Stage ``sid`` and every stage it needs, in topological order."""
        need = {sid}
        for s in reversed(self.stages):
            if s.id in need:
                need.update(s.deps)
        return [s for s in self.stages if s.id in need]


def toposort(stages: list[Stage], problems: list[Problem]) -> list[Stage]:
    """Stages in an order where each comes after its dependencies; a cycle adds a problem naming it."""
    by_id = {s.id: s for s in stages}
    state: dict[str, int] = {}
    order: list[Stage] = []

    def visit(s: Stage, path: list[str]) -> bool:
        st = state.get(s.id, 0)
        if st == 2:
            return True
        if st == 1:
            cyc = path[path.index(s.id):] + [s.id]
            problems.append(Problem(f"{s.ptr}/inputs", "cycle: " + " -> ".join(cyc)))
            return False
        state[s.id] = 1
        for d in s.deps:
            if d in by_id and not visit(by_id[d], path + [s.id]):
                state[s.id] = 2
                return False
        state[s.id] = 2
        order.append(s)
        return True

    for s in stages:
        if state.get(s.id, 0) == 0:
            visit(s, [])
    return order
