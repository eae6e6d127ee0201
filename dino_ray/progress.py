"""Live progress from wherever a stage's work runs to the driver's console.

Training runs inside Ray Train workers whose output does not reach the driver, and a stage's Ray Data
loops report nothing readable. So producers (rank 0 of the train loop, the batch-inference loop, the
eval loop) push small :class:`Snapshot` objects to a named Ray actor, the *board*, which keeps the
latest one per task; the console polls the board from a driver thread (:mod:`dino_ray.console`).

Cheap and safe for the training step: :meth:`Reporter.update` sends at most one snapshot per second,
fire-and-forget (``.remote()`` only enqueues the call, nothing waits for it), and without a board (no
console, e.g. in tests or when a stage runs outside ``dino-ray run``) reporting is a no-op. Nothing in
here imports torch; ray is imported only when a board is opened or looked up.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

log = logging.getLogger("dino_ray.progress")

BOARD = "dino_ray_progress"
NAMESPACE = "dino_ray"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Where one task stands. ``base_done``/``base_at`` is its first report, the origin of its rate."""

    task: str
    done: int
    total: int
    unit: str
    at: float  # producer's wall clock
    base_done: int
    base_at: float
    figures: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    @property
    def rate(self) -> float | None:
        """Units per second since the first report (so start-up time does not count)."""
        if self.at <= self.base_at or self.done <= self.base_done:
            return None
        return (self.done - self.base_done) / (self.at - self.base_at)

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return None if rate is None or self.finished else (self.total - self.done) / rate


@dataclasses.dataclass(frozen=True)
class Note:
    """A message the console must print as it is (e.g. a collapse alarm), never merged or dropped."""

    text: str
    at: float


class Board:
    """The actor body: the latest snapshot of each task and every note, handed to the console once."""

    def __init__(self) -> None:
        self._latest: dict[str, Snapshot] = {}
        self._notes: list[Note] = []

    def put(self, snapshot: Snapshot) -> None:
        self._latest[snapshot.task] = snapshot

    def put_note(self, note: Note) -> None:
        self._notes.append(note)

    def drain(self) -> list[Snapshot | Note]:
        out: list[Snapshot | Note] = [*self._latest.values(), *self._notes]
        self._latest.clear()
        self._notes.clear()
        return out


def open_board() -> Any:
    """Create (or find) the board; call on the driver, which then owns it (it dies with the driver)."""
    import ray

    return ray.remote(num_cpus=0)(Board).options(name=BOARD, namespace=NAMESPACE, get_if_exists=True).remote()


def _find_board() -> Any | None:
    try:
        import ray

        return ray.get_actor(BOARD, namespace=NAMESPACE) if ray.is_initialized() else None
    except ValueError:  # no console is listening
        return None


class Reporter:
    """Reports one task's progress (``done`` of ``total`` ``unit``) to the board, throttled."""

    def __init__(self, task: str, total: int, unit: str, every_s: float = 1.0,
                 clock: Callable[[], float] = time.time):
        self.task, self.total, self.unit, self.every_s, self.clock = task, int(total), unit, every_s, clock
        self._board = _find_board()
        self._base: tuple[int, float] | None = None
        self._last_sent = float("-inf")

    @staticmethod
    def note(text: str) -> None:
        """Hand ``text`` to the console (printed on its own line); a no-op without a console."""
        board = _find_board()
        if board is None:
            return
        try:
            board.put_note.remote(Note(text, time.time()))
        except Exception:  # noqa: BLE001 - like progress, a note must never break the work
            log.debug("progress board unreachable; note dropped", exc_info=True)

    def update(self, done: int, **figures: float) -> None:
        """Called as often as convenient (every step): sends only every ``every_s`` and at the end."""
        if self._board is None:
            return
        now = self.clock()
        if self._base is None:
            self._base = (int(done), now)
        elif now - self._last_sent < self.every_s and done < self.total:
            return
        self._last_sent = now
        snapshot = Snapshot(self.task, int(done), self.total, self.unit, now, *self._base,
                            {k: float(v) for k, v in figures.items()})
        try:
            self._board.put.remote(snapshot)
        except Exception:  # noqa: BLE001 - progress must never break the work it reports on
            log.debug("progress board unreachable; reporting stops", exc_info=True)
            self._board = None
