"""The one task runner: a function over many items, on a dask cluster or a local thread pool.

Restore blocks, pyramid chunks, percentile samples and training patch reads all run through
:func:`run_tasks`::

    items ──► submit (all at once, or at most ``in_flight`` tasks at a time)
                 │   client: client.map / client.submit(pure=False, key=..., resources=...)
                 │   no client: a thread pool (made here, or the caller's)
                 ▼
              completed (in item order, or as they finish: in batches, the finished ones'
                         results fetched in one gather)
                 ├─ ok     ──► yield the result (or an Outcome)
                 └─ error  ──► resubmit up to ``retries`` times, then yield an Outcome with the
                               error (``outcomes=True``) or raise it

With ``count_rescheduled`` (client only) finished tasks are held back in groups of up to 32
until the scheduler has said how many times each was rescheduled because its worker died,
then released. Closing the generator releases what is still in flight (the scheduler drops it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Outcome", "run_tasks"]

#: Finished tasks whose rescheduled counts are asked of the scheduler in one call.
ACCOUNT_EVERY = 32


@dataclass
class Outcome:
    """What became of one item: its result or its last error, and how it got there.

    Attributes
    ----------
    item : tuple
        The arguments the task ran with.
    result : object
        The task's return value (None when it failed).
    error : BaseException or None
        The last attempt's exception.
    attempts : int
        Submissions of this item (1 + retries used).
    rescheduled : int
        Times the scheduler re-ran it because its worker died (``count_rescheduled`` only).
    finished : float
        ``time.perf_counter()`` when the runner saw it finish (results may be released later).
    """

    item: tuple
    result: Any = None
    error: BaseException | None = None
    attempts: int = 1
    rescheduled: int = 0
    finished: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


class _Backend:
    """Submit/wait on a dask client or a thread pool with one interface."""

    def __init__(self, fn: Callable, client, pool, key: Callable[[tuple], str] | None,
                 resources: dict | Callable[[tuple], dict | None] | None, ordered: bool):
        self.fn, self.client, self.key, self.resources = fn, client, key, resources
        self.own = client is None and pool is None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) if self.own else pool
        self.ac = None  # unordered client runs only: it holds finished futures until taken
        if client is not None and not ordered:
            from distributed import as_completed

            self.ac = as_completed()

    def _resources(self, item: tuple) -> dict | None:
        return self.resources(item) if callable(self.resources) else self.resources

    def submit(self, item: tuple, attempt: int):
        if self.client is None:
            return self.pool.submit(self.fn, *item)
        kwargs: dict[str, Any] = {"pure": False, "resources": self._resources(item)}
        if self.key is not None:
            kwargs["key"] = self.key(item) + (f"-retry{attempt - 1}" if attempt > 1 else "")
        fut = self.client.submit(self.fn, *item, **kwargs)
        if self.ac is not None:
            self.ac.add(fut)
        return fut

    def submit_all(self, items: list[tuple]) -> list:
        """Every item at once (one ``client.map`` call: far cheaper than one submit each)."""
        if self.client is None or not items:
            return [self.submit(item, 1) for item in items]
        kwargs: dict[str, Any] = {"pure": False}
        if self.key is not None:
            kwargs["key"] = [self.key(item) for item in items]
        groups: dict[tuple | None, list[int]] = {}
        for i, item in enumerate(items):  # one map per distinct resource request
            r = self._resources(item)
            groups.setdefault(tuple(sorted(r.items())) if r else None, []).append(i)
        futures: list = [None] * len(items)
        for res, idx in groups.items():
            kw = dict(kwargs, resources=dict(res) if res else None)
            if "key" in kw:
                kw["key"] = [kwargs["key"][i] for i in idx]
            fs = self.client.map(self.fn, *zip(*[items[i] for i in idx]), **kw)
            for i, f in zip(idx, fs):
                futures[i] = f
        if self.ac is not None:
            self.ac.update(futures)
        return futures

    def next_done(self, running: dict) -> list:
        """Block until some of ``running`` are done; return every one done by then (a batch)."""
        if self.ac is not None:
            while True:
                batch = [f for f in self.ac.next_batch(block=True) if f in running]
                if batch:
                    return batch
        done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
        return [f for f in running if f in done]

    @staticmethod
    def outcome(fut) -> tuple[Any, BaseException | None]:
        """Wait for ``fut``: (result, None) or (None, its error). One round trip to the cluster."""
        try:
            return fut.result(), None
        except (Exception, asyncio.CancelledError) as err:  # a cancelled task (e.g. the scheduler restarted)
            return None, err

    def outcomes(self, batch: list) -> list[tuple[Any, BaseException | None]]:
        """:meth:`outcome` of every future of a batch; the finished ones' results in one gather
        (one round trip for the batch instead of one per future: what lets the client keep up)."""
        finished = [f for f in batch if self.client is not None and f.status == "finished"]
        gathered: dict = {}
        if len(finished) > 1:
            try:
                gathered = dict(zip(finished, self.client.gather(finished)))
            except Exception:  # noqa: BLE001 - e.g. a worker lost meanwhile: each future on its own
                gathered = {}
        return [(gathered[f], None) if f in gathered else self.outcome(f) for f in batch]

    def cancel(self, futures: list) -> None:
        """Drop the tasks still in flight. Never blocks on the cluster: this runs in the
        generator's ``finally``, which garbage collection may reach from inside another call of
        the same client (a blocking ``Client.cancel`` there waits on the loop that waits on it:
        a deadlock seen in CI). Releasing a future is what its finaliser does (a callback on the
        client's loop); the scheduler forgets a task no future holds, so queued ones never run."""
        if self.client is not None:
            for fut in futures:
                fut.release()
        else:
            for fut in futures:
                fut.cancel()
        if self.own:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _rescheduled(client, keys: list[str]) -> dict[str, int]:
    """How often the scheduler re-ran each task because its worker died (0 when unknown)."""

    def count(dask_scheduler, keys):  # defined here: sent by value, the scheduler needs no bigcare
        tasks = dask_scheduler.tasks
        return {k: int(tasks[k].suspicious) for k in keys if k in tasks}

    try:
        return dict(client.run_on_scheduler(count, keys=keys))
    except Exception:  # a scheduler that refuses run_on_scheduler: the count is unknown
        return {}


def run_tasks(fn: Callable, items: Iterable[tuple], *, client=None, pool: concurrent.futures.Executor | None = None,
              in_flight: int | None = 8, ordered: bool = True, retries: int = 0,
              key: Callable[[tuple], str] | None = None,
              resources: dict | Callable[[tuple], dict | None] | None = None,
              outcomes: bool = False, count_rescheduled: bool = False,
              progress: bool = False, desc: str = "tasks", unit: str = "task", total: int | None = None) -> Iterator:
    """Run ``fn(*item)`` for every item; yield results (or :class:`Outcome` objects).

    Parameters
    ----------
    fn : callable
        The task; must be picklable for a cluster.
    items : iterable of tuple
        Positional arguments of each task (small: coordinates and specs, never voxels).
    client : distributed.Client, optional
        Run on this cluster; else on ``pool`` (a thread pool made for the call when not given).
    in_flight : int or None
        Tasks in flight at most; None submits every item at once (one ``client.map``).
    ordered : bool
        Yield in item order; else as tasks finish. Only ordered runs guarantee that task ``k +
        in_flight`` is submitted after the consumer asked for result ``k + 1`` (what
        :class:`~bigcare.tasks.slots.ResultSlots` relies on).
    retries : int
        Resubmissions of an item whose task raised, before its error counts.
    key : callable, optional
        Task key of an item (client only); a retry gets ``-retryN`` appended.
    resources : dict or callable, optional
        Worker resources per task (e.g. ``{"GPU": 1}``), or a function of the item.
    outcomes : bool
        Yield an :class:`Outcome` per item, failures included; else yield results and raise
        the first error that exhausted its retries.
    count_rescheduled : bool
        Fill :attr:`Outcome.rescheduled` from the scheduler (client only).
    progress, desc, unit : bool, str, str
        A tqdm progress bar over the items.
    total : int, optional
        Number of items, for the progress bar when ``items`` is an iterator (default: its length).
    """
    from tqdm.auto import tqdm

    backend = _Backend(fn, client, pool, key, resources, ordered)
    todo: Iterator[tuple] = iter(items)
    running: dict = {}  # future -> [item, attempt]
    order: collections.deque = collections.deque()  # futures in item order (ordered mode)
    held: list[tuple[Outcome, Any]] = []  # finished, waiting for their rescheduled counts
    count_rescheduled = count_rescheduled and client is not None
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress)
    n_failed = 0
    limit = in_flight if in_flight is not None else (None if client is not None else 4 * (os.cpu_count() or 1))

    def fill() -> None:
        if limit is None:
            batch = list(todo)
            for item, fut in zip(batch, backend.submit_all(batch)):
                running[fut] = [item, 1]
                if ordered:
                    order.append(fut)
            return
        # the free places of the window in one go (one client.map, not one submit each)
        batch = list(itertools.islice(todo, max(0, limit - len(running))))
        for item, fut in zip(batch, backend.submit_all(batch)):
            running[fut] = [item, 1]
            if ordered:
                order.append(fut)

    def release(entries: list[tuple[Outcome, Any]]) -> Iterator:
        if count_rescheduled and entries:
            counts = _rescheduled(client, [f.key for _, f in entries])
            for out, f in entries:
                out.rescheduled = counts.get(f.key, 0)
        for out, f in entries:
            if client is not None:
                f.release()
            if outcomes:
                yield out
            elif out.error is not None:
                raise out.error
            else:
                yield out.result

    try:
        while True:
            # submit only now that the consumer has asked for the next result: a task's
            # successor may reuse what the consumer got (ResultSlots hands out slots in a ring)
            fill()
            if not running:
                break
            batch = [order[0]] if ordered else backend.next_done(running)
            for fut, (result, err) in zip(batch, backend.outcomes(batch)):
                item, attempt = running.pop(fut)
                if ordered:
                    order.popleft()
                if err is not None and attempt <= retries:
                    retry = backend.submit(item, attempt + 1)
                    running[retry] = [item, attempt + 1]
                    if ordered:
                        order.appendleft(retry)
                    if client is not None:
                        fut.release()
                    continue
                out = Outcome(item, result, err, attempt, finished=time.perf_counter())
                del result
                if err is None:
                    bar.update(1)
                else:  # a failed item is not done: the bar says how many failed instead
                    n_failed += 1
                    bar.set_postfix(failed=n_failed)
                if count_rescheduled:
                    held.append((out, fut))
                    if len(held) >= ACCOUNT_EVERY or not running:
                        ready, held[:] = list(held), []
                        yield from release(ready)
                else:
                    yield from release([(out, fut)])
                del fut
            del batch
        if held:
            batch, held[:] = list(held), []
            yield from release(batch)
    finally:
        bar.close()
        backend.cancel(list(running))

