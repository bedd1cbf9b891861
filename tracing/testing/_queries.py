"""Reading what arrived: observations, requests, scores, and traces as Langfuse v4 shows them."""

from __future__ import annotations

from ._faults import FaultInjection
from ._model import Observation, ReceivedRequest, Trace
from ._render import render_trace, summarise
from ._state import TRACES_PATH
from ._traces import build_trace

__all__ = ["Queries"]


class Queries(FaultInjection):
    """Snapshots of the stored data; each call copies under the lock."""

    @property
    def observations(self) -> list[Observation]:
        """Every accepted span in arrival order (a copy; duplicates included)."""
        with self._cond:
            return list(self._observations)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Every request received (a copy), including rejected and failed ones."""
        with self._cond:
            return list(self._requests)

    @property
    def trace_requests(self) -> list[ReceivedRequest]:
        """The requests to the OTLP traces endpoint."""
        return [r for r in self.requests if r.path == TRACES_PATH]

    @property
    def scores(self) -> list[dict[str, object]]:
        """Score bodies received through ``/api/public/scores`` or ``/api/public/ingestion``."""
        with self._cond:
            return list(self._scores)

    @property
    def ingestion_events(self) -> list[dict[str, object]]:
        """All events received through the ``/api/public/ingestion`` endpoint."""
        with self._cond:
            return list(self._ingestion_events)

    def observations_by_id(self) -> dict[str, list[Observation]]:
        """Observations grouped by span id; a list longer than one is a duplicate."""
        out: dict[str, list[Observation]] = {}
        for obs in self.observations:
            out.setdefault(obs.id, []).append(obs)
        return out

    def duplicates(self) -> dict[str, int]:
        """Span ids accepted more than once, with how many times."""
        with self._cond:
            return {span_id: n for span_id, n in self._id_counts.items() if n > 1}

    def traces(self) -> dict[str, list[Observation]]:
        """Observations grouped by trace id (first-seen order), each list by start time."""
        out: dict[str, list[Observation]] = {}
        for obs in self.observations:
            out.setdefault(obs.trace_id, []).append(obs)
        return {tid: sorted(group, key=lambda o: o.start_time) for tid, group in out.items()}

    def trace(self, trace_id: str) -> Trace:
        """The trace as Langfuse v4 shows it (name, input, output, ...); KeyError if none."""
        arrived = [o for o in self.observations if o.trace_id == trace_id]
        if not arrived:
            raise KeyError(trace_id)
        return build_trace(trace_id, arrived)

    def traces_view(self) -> dict[str, Trace]:
        """Every trace as Langfuse v4 shows it, by trace id, in first-arrival order."""
        grouped: dict[str, list[Observation]] = {}
        for obs in self.observations:
            grouped.setdefault(obs.trace_id, []).append(obs)
        return {tid: build_trace(tid, group) for tid, group in grouped.items()}

    def find_traces(self, name: str | None = None) -> list[Trace]:
        """Traces (Langfuse v4 view) with this trace name, or all, earliest first."""
        found = [t for t in self.traces_view().values() if name is None or t.name == name]
        return sorted(found, key=lambda t: t.timestamp)

    def find(
        self,
        name: str | None = None,
        type: str | None = None,
        trace_id: str | None = None,
        level: str | None = None,
    ) -> list[Observation]:
        """Observations matching every given criterion, in arrival order."""
        return [
            obs
            for obs in self.observations
            if (name is None or obs.name == name)
            and (type is None or obs.type == type)
            and (trace_id is None or obs.trace_id == trace_id)
            and (level is None or obs.level == level)
        ]

    def get(self, observation_id: str) -> Observation:
        """The (first received) observation with this id; KeyError when none arrived."""
        for obs in self.observations:
            if obs.id == observation_id:
                return obs
        raise KeyError(observation_id)

    def clear(self) -> None:
        """Forget observations, requests and scores (faults stay as they are)."""
        with self._cond:
            self._observations.clear()
            self._id_counts.clear()
            self._requests.clear()
            self._scores.clear()
            self._ingestion_events.clear()
            self._cond.notify_all()

    def tree(self, trace_id: str) -> str:
        """One trace as Langfuse v4 shows it: its name, input and output, then the tree."""
        try:
            trace = self.trace(trace_id)
        except KeyError:
            return f"trace {trace_id}: no observations received"
        return render_trace(trace, self.duplicates())

    def format_traces(self) -> str:
        """Every trace as :meth:`tree` prints it, earliest first."""
        duplicates = self.duplicates()
        ordered = sorted(self.traces_view().values(), key=lambda t: t.timestamp)
        return "\n\n".join(render_trace(trace, duplicates) for trace in ordered)

    def summary(self) -> str:
        """A short account of what arrived: counts, names, request statuses, trees."""
        return summarise(
            self.observations, self.trace_requests, self.duplicates(), self.format_traces()
        )
