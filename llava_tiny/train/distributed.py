"""What goes wrong only with many processes: a rank that dies, a rank that hangs, a slow step.

- A rank dies (killed, out of memory): `PeerWatchdog` notices within seconds (a peer on this host
  whose process is gone, or any peer whose heartbeat in the rendezvous store stops), logs which rank
  died and the last complete checkpoint, and ends this process too: the job exits non-zero in well
  under a minute instead of waiting out the collective timeout. Rerunning the same command resumes.
- A rank hangs: every collective is bounded by `--ddp_timeout` (passed to the process group; 600 s by
  default here, not HF's 1800). `StepWatchdog` prints the Python stack of every thread of every rank
  shortly before that timeout, each line prefixed `[rank R]`, and ends a rank still stuck outside any collective.
- A step much slower than the median is logged with its step number (`StepWatchdog`).
"""
from __future__ import annotations

import logging
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_KEY = "llava_tiny/peers"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def end_process_group() -> None:
    """After a run ends well: wait for every rank, then close the process group. Left to interpreter exit,
    gloo's worker threads are torn down after Python is gone and the process can abort (SIGABRT, "terminate
    called without an active exception": pytorch/pytorch#190489), failing a job that finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def release_shared_memory_names() -> None:
    """DeepSpeed's CPU all-reduce (its `shm.cpp`) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (69 MB a rank) and never removes it: every CPU run left its ranks' buffers in memory, 14 GB of a 24 GB
    machine after one test session. Its init returns once this rank has mapped every rank's buffer; after a
    barrier every rank has, so the names can go now: the memory lives while a rank maps it and is freed when
    the last one exits, however it exits (killed ranks included)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(os.getuid(), os.environ.get("MASTER_ADDR"),
                                                         os.environ.get("MASTER_PORT"), dist.get_rank())
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not DeepSpeed's CPU backend, or not one host
        pass


def _process_gone(pid: int) -> bool:
    """True when `pid` (on this host) has exited, or is a zombie its launcher has not reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class PeerDiedError(RuntimeError):
    """Another rank of the job died; the message names it and the last complete checkpoint."""


class PeerWatchdog:
    """While training, each rank beats once a second in the job's rendezvous store (MASTER_ADDR:
    MASTER_PORT) and watches the others. A peer is dead when its process on this host is gone, or when
    its heartbeat has not moved for `grace` seconds (another host; the store itself gone means rank 0,
    its host, is gone). Then this rank logs it and, if its main thread has not ended by itself within
    `exit_after` seconds (a collective on a dead peer can wait for --ddp_timeout), exits with 1."""

    def __init__(self, last_checkpoint: Callable[[], str | None], grace: float = 20.0, exit_after: float = 10.0):
        self.last_checkpoint, self.grace, self.exit_after = last_checkpoint, grace, exit_after
        self.dead: str | None = None  # the message, once a peer is found dead
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if not _distributed() or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return self
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        try:
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(seconds=10), wait_for_workers=False)
            self.store.set(f"{_KEY}/where/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
            self.store.add(f"{_KEY}/beat/{self.rank}", 1)
        except Exception as err:  # noqa: BLE001 - a launcher whose store we cannot reach: train unwatched
            logger.warning("rank %d: no peer watchdog (the rendezvous store at %s:%s: %s); a dead rank is then "
                           "noticed only by --ddp_timeout", self.rank, os.environ["MASTER_ADDR"],
                           os.environ["MASTER_PORT"], err)
            return self
        self._thread = threading.Thread(target=self._watch, name="llava-tiny-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None:
            try:  # a peer that finished is not dead: say so before going quiet
                self.store.set(f"{_KEY}/done/{self.rank}", "1")
            except Exception:  # noqa: BLE001 - the store's host (rank 0) may already have finished
                pass

    def raise_if_a_peer_died(self, err: BaseException) -> None:
        """Called with the exception that ended training: if a peer died, say so (after a failed collective,
        waiting for the verdict a little: it is often noticed before the dead process)."""
        if self._thread is None:
            return
        # A dead peer on this host is found within a second or two; one on another host after `grace`. A
        # collective that timed out (a hung peer, still alive) gets no verdict: do not wait for one then.
        text = str(err).lower()
        lost_peer = isinstance(err, dist.DistError) or any(w in text for w in ("connection", "peer", "gloo", "nccl"))
        wait = 0 if not lost_peer else 3 if ("timed out" in text or "timeout" in text) else self.grace + 2
        deadline = time.monotonic() + wait
        while self.dead is None and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.dead:
            raise PeerDiedError(self.dead) from err

    def _watch(self) -> None:
        host = socket.gethostname()
        peers = [r for r in range(self.world) if r != self.rank]
        where, last_beat, changed, unreachable_since = {}, {}, {}, None
        while not self._stop.wait(1.0):
            now = time.monotonic()
            try:
                self.store.add(f"{_KEY}/beat/{self.rank}", 1)
                done = {r for r in peers if self.store.check([f"{_KEY}/done/{r}"])}
                for r in peers:
                    if r not in where and self.store.check([f"{_KEY}/where/{r}"]):
                        where[r] = self.store.get(f"{_KEY}/where/{r}").decode().split()
                watched = [r for r in peers if r not in done and self.store.check([f"{_KEY}/beat/{r}"])]
                beats = self.store.multi_get([f"{_KEY}/beat/{r}" for r in watched]) if watched else []
                unreachable_since = None
            except Exception as err:  # noqa: BLE001 - the store lives in rank 0's process
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.grace:
                    self._found(0, f"the rendezvous store it hosts ({os.environ['MASTER_ADDR']}:"
                                   f"{os.environ['MASTER_PORT']}) stopped answering ({err})")
                    return
                continue
            for r, beat in zip(watched, beats):
                if last_beat.get(r) != beat:
                    last_beat[r], changed[r] = beat, now
                peer_host, peer_pid = where.get(r, (None, "0"))
                if peer_host == host and _process_gone(int(peer_pid)):
                    self._found(r, f"its process {peer_pid} on {host} is gone")
                    return
                if now - changed[r] > self.grace:
                    self._found(r, f"no heartbeat for {now - changed[r]:.0f} s")
                    return

    def _found(self, rank: int, how: str) -> None:
        checkpoint = self.last_checkpoint()
        self.dead = (f"rank {rank} died ({how}); rank {self.rank} stops too, as the job cannot go on without it. "
                     f"The last complete checkpoint is {checkpoint or 'none (no checkpoint was saved yet)'}; "
                     "rerun the same command to resume from it")
        logger.error(self.dead)
        # The main thread usually fails on its own at once (gloo: connection closed); a collective that
        # does not notice would wait for --ddp_timeout.
        if not self._stop.wait(self.exit_after):
            logging.shutdown()
            os._exit(1)


def print_stacks(rank: int) -> None:
    """The Python stack of every thread of this process on stderr, each line prefixed `[rank R]` and written
    with a write of its own: every rank prints at the same moment into one log, and faulthandler's many
    small writes interleave there character by character (unreadable, as seen in CI)."""
    sys.stderr.flush()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        lines.append(f"Thread {names.get(ident, ident)} (most recent call last):")
        lines += "".join(traceback.format_stack(frame)).rstrip("\n").splitlines()
    for line in lines:  # one line per write: whole, whatever the other ranks write meanwhile
        os.write(2, f"[rank {rank}] {line}\n".encode(errors="replace"))


class StepWatchdog(TrainerCallback):
    """A thread that watches training progress (steps, eval batches, saves) while the `with` block runs
    (so it never outlives the run, however the run ends).

    - No progress for 90% of `timeout` (--ddp_timeout): print the Python stack of every thread, once,
      so that every rank's stack is on screen before the collective timeout ends the job.
    - Still none `exit_after` seconds past `timeout`: log it and exit with 1. Nothing else would end a
      rank stuck outside any collective, nor one in DeepSpeed's CPU shared-memory allreduce (no timeout).
    - A step more than `slow_factor` x the median step time (and at least `min_excess` s over it) is
      logged with its number (rank 0; the other ranks wait for the same step).
    """

    def __init__(self, timeout: float, rank: int, slow_factor: float = 4.0, min_excess: float = 1.0,
                 exit_after: float = 10.0):
        self.timeout, self.rank, self.exit_after = timeout, rank, exit_after
        self.slow_factor, self.min_excess = slow_factor, min_excess
        self.step_times: deque[float] = deque(maxlen=200)
        self._progress = self._step_start = time.monotonic()
        self._step, self._first_step = 0, True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _progressed(self, *args, **kwargs):
        self._progress = time.monotonic()

    on_prediction_step = on_save = on_evaluate = on_log = _progressed

    def __enter__(self):
        self._progressed()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="llava-tiny-step-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    on_train_begin = _progressed

    def on_step_begin(self, args, state, control, **kwargs):
        self._step, self._step_start = state.global_step + 1, time.monotonic()
        self._progress = self._step_start

    def on_step_end(self, args, state, control, **kwargs):
        took = time.monotonic() - self._step_start
        self._progressed()
        if self._first_step:  # the first step includes warm-up (allocations, compilation): not a sample
            self._first_step = False
            return
        if len(self.step_times) >= 2 and self.rank == 0:
            median = statistics.median(self.step_times)
            if took > self.slow_factor * median and took - median > self.min_excess:
                logger.warning("step %d took %.1f s, %.0fx the median step (%.2f s): a straggler rank, slow storage "
                               "or a stalled data loader", state.global_step, took, took / median, median)
        self.step_times.append(took)

    def _watch(self) -> None:
        dumped = False
        while not self._stop.wait(1.0):
            idle = time.monotonic() - self._progress
            if idle > 0.9 * self.timeout and not dumped:
                dumped = True
                logger.error("rank %d: no progress for %.0f s in step %d (--ddp_timeout %d s); the Python stack of "
                             "every thread of this rank follows", self.rank, idle, self._step, self.timeout)
                print_stacks(self.rank)
            if idle > self.timeout + self.exit_after:
                logger.error("rank %d: still stuck in step %d after --ddp_timeout (%d s): exiting", self.rank,
                             self._step, self.timeout)
                logging.shutdown()
                os._exit(1)
