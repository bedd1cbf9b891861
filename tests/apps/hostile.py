"""Values and a task base class the hardening rows send to real workers (importable by both)."""

from __future__ import annotations

from typing import Any

from celery import Task


class BadRepr:
    """Hashable and picklable, but its __repr__ raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)


class FailingStore(Task):  # type: ignore[misc]
    """A task whose result store fails after the body succeeded (Celery calls task_postrun
    with SUCCESS first, then task_internal_error)."""

    _failing: Any = None

    @property
    def backend(self) -> Any:  # type: ignore[override]
        if FailingStore._failing is None:
            real = type(self.app.backend)

            class Failing(real):  # type: ignore[misc,valid-type]
                def store_result(self, *args: Any, **kwargs: Any) -> Any:
                    raise ConnectionError("result store went away")

            FailingStore._failing = Failing(app=self.app, url=self.app.conf.result_backend)
        return FailingStore._failing

    @backend.setter
    def backend(self, value: Any) -> None:
        pass
