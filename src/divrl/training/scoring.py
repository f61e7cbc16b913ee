"""Scoring a batch's groups: in order, skip-and-count for non-finite rewards, one agreement of every rank on errors;
in the calling thread, or in the background (:class:`GroupScoring`: a remote reward's requests in flight together,
pipelined scoring while the rollout goes on). Plain torch, no Lightning."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from divrl.data.stream import ConditionSample
from divrl.objectives.base import Scores
from divrl.rewards.base import Group, NonFiniteReward, Reward, RewardOutput

__all__ = ["agreed", "score_groups", "collect_scores", "GroupScoring"]

log = logging.getLogger("divrl.training.environment")  # the training log's name, as before the move


def agreed(fn: Callable[[], object], agree: Callable[[bool], bool], what: str):
    """``fn()``, with one agreement of every rank on whether it raised (a collective: no rank is left waiting in the
    next one); when it raised anywhere, every rank raises: its own error, or a ``RuntimeError`` pointing to it."""
    try:
        result, error = fn(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
        result, error = None, err
    if not agree(error is None):
        raise error or RuntimeError(
            f"{what} failed on another rank (that rank's log has the error); stopping every rank"
        )
    return result


def score_groups(
    reward: Reward,
    samples: Sequence[ConditionSample],
    images: Tensor,
    group_size: int,
    device: torch.device,
    agree: Callable[[bool], bool],
    on_skip: Callable[[], None] = lambda: None,
) -> Scores:
    """Score each condition's ``group_size`` images with ``reward`` (``reward.concurrency`` groups at once: a remote
    reward's requests in flight together), then :func:`collect_scores`, with one agreement of every rank on errors."""

    def score() -> Scores:
        with GroupScoring(reward, background=False) as scoring:
            for i, sample in enumerate(samples):
                scoring.submit(sample, images[i * group_size : (i + 1) * group_size])
            results = scoring.results()
        return collect_scores(reward, samples, results, group_size, device, on_skip)

    return agreed(score, agree, "the reward")


def collect_scores(
    reward: Reward,
    samples: Sequence[ConditionSample],
    results: Sequence[RewardOutput | Exception],
    group_size: int,
    device: torch.device,
    on_skip: Callable[[], None] = lambda: None,
) -> Scores:
    """The :class:`Scores` of each group's result, in order. A group whose reward is not finite
    (:class:`~divrl.rewards.NonFiniteReward`) is skipped (``on_skip``) and logged: its row is 0 and not kept. Any
    other exception is a configuration error: it is logged with the identity and raised."""
    rows, keep, outputs = [], [], []
    for sample, out in zip(samples, results):
        if isinstance(out, NonFiniteReward):
            log.warning("skipping group %r (%r): %s", sample.id, sample.prompt, out)
            on_skip()
            rows.append(torch.zeros(group_size))
            keep.append(False)
            outputs.append(None)
            continue
        if isinstance(out, Exception):
            log.error(
                "%s failed on identity %r (%r): %s: %s",
                type(reward).__name__,
                sample.id,
                sample.prompt,
                type(out).__name__,
                out,
            )
            raise out
        rows.append(out.reward)
        keep.append(True)
        outputs.append(out)
    return Scores(torch.stack(rows).to(device), torch.tensor(keep, device=device), outputs)


class GroupScoring:
    """Groups scored in the background as they are submitted: on ``reward.concurrency`` threads (a remote reward's
    requests in flight), or one thread for a local reward. :meth:`results` waits for all of them and gives, in
    submission order, each group's :class:`RewardOutput` or the exception it raised. The threads score with the
    submitting thread's grad mode, autocast and CUDA device, so a group scores the same as in that thread; on a GPU
    they score on a CUDA stream of their own (after the images are ready on the submitting thread's stream), so a
    local reward's kernels can run beside the rollout's instead of queueing behind them (not yet run on a GPU).

    Used as a context manager: leaving it cancels what has not started; it waits for the groups being scored, except
    when it is left by an error (a failed rollout, Ctrl-C), which then propagates at once. With concurrency 1 and
    nothing to overlap (:func:`score_groups`), scoring runs in the calling thread.
    """

    def __init__(self, reward: Reward, background: bool = True):
        self.reward = reward
        self.workers = max(1, int(getattr(reward, "concurrency", 1)))
        self.background = background or self.workers > 1
        self.futures: list = []
        self.stopped = False  # inline scoring after a configuration error: the remaining groups are not scored
        self.executor = None
        self.state = _ThreadState()
        self.stream = torch.cuda.Stream(self.state.cuda) if self.background and self.state.cuda is not None else None

    def __enter__(self) -> GroupScoring:
        from concurrent.futures import ThreadPoolExecutor

        if self.background:
            self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="divrl-reward")
        return self

    def __exit__(self, kind, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=kind is None, cancel_futures=True)

    def submit(self, sample: ConditionSample, images: Tensor) -> None:
        if self.executor is not None:
            ready = None
            if self.stream is not None:  # the images are written on this thread's stream: the scoring waits for them
                ready = torch.cuda.Event()
                ready.record()
                images.record_stream(self.stream)  # and their memory is not reused before the scoring stream is done
            self.futures.append(self.executor.submit(self._score, Group(sample, images), ready))
            return
        from concurrent.futures import Future

        done = Future()  # in the calling thread
        done.set_result(self.futures[-1].result() if self.stopped else self.reward_or_error(Group(sample, images)))
        self.stopped = not isinstance(done.result(), (RewardOutput, NonFiniteReward))
        self.futures.append(done)

    def reward_or_error(self, group: Group) -> RewardOutput | Exception:
        try:
            return self.reward(group)
        except Exception as err:  # noqa: BLE001 - handed back in order by results(), raised there
            return err

    def _score(self, group: Group, ready=None) -> RewardOutput | Exception:
        try:
            with self.state.entered():
                if ready is None:
                    return self.reward(group)
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(ready)
                    return self.reward(group)  # its outputs come back on the CPU: synchronised
        except Exception as err:  # noqa: BLE001 - handed back in order by results(), raised there on every rank
            return err

    def results(self) -> list[RewardOutput | Exception]:
        return [future.result() for future in self.futures]


class _ThreadState:
    """The grad mode, inference mode, autocast and CUDA device of the thread that built it, re-entered in other threads
    (each is per thread in torch)."""

    def __init__(self):
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.autocast = [
            (kind, torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda") if torch.is_autocast_enabled(kind)
        ]
        self.cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def entered(self):
        """The state, in the calling thread, for the ``with`` block (one stack per call: threads do not share it)."""
        with contextlib.ExitStack() as stack:
            if self.cuda is not None:
                torch.cuda.set_device(self.cuda)
            stack.enter_context(torch.inference_mode(self.inference))
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for kind, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            yield
