"""Math answer verification with the `math-verify` package (L1): 1.0 when the response's final answer
equals the reference answer, 0.0 otherwise.

Owns final-answer extraction for GSM8K ("#### 42", also in reference solutions) and LaTeX (\\boxed{})
answers, and running math-verify safely off the main thread. math-verify bounds each parse / compare
with signal.alarm, which only works in the main thread; elsewhere this module turns that timeout off
and bounds the work by parsing only the tail of each response (`max_response_chars`) instead.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Optional

from megatron_gift.rewards.base import RewardError, check_inputs, describe_prompt

_GSM8K_FINAL = re.compile(r"####\s*([^\n]*)")


def gsm8k_final(text: str) -> Optional[str]:
    """The text after the last '####' marker with thousands separators removed, or None without one."""
    found = _GSM8K_FINAL.findall(text)
    if not found or not found[-1].strip():
        return None
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", found[-1].strip())


class _DropTimeoutOffWarning(logging.Filter):
    """math-verify warns when its timeout is off; here that is deliberate (worker threads), so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutOffWarning())


def signal_timeout(seconds: int) -> Optional[int]:
    """`seconds` in the main thread; None (math-verify's timeout off) elsewhere, where signal.alarm raises."""
    return seconds if threading.current_thread() is threading.main_thread() else None


class MathVerifyReward:
    """fn(prompts, responses, metadata) -> [1.0 | 0.0]: math-verify equivalence against metadata[answer_key].

    answer_key          metadata field with the reference answer ("42", "#### 42", a GSM8K solution ending
                        in "#### 42", "\\frac{1}{2}", "$\\boxed{x}$").
    correct / incorrect the two reward values.
    max_response_chars  only the last this many characters are parsed (final answers come last); this
                        bounds parse time where math-verify's timeout cannot run (worker threads).
    timeout_seconds     math-verify's per-call timeout in the main thread (and in pool processes).
    num_workers         0: score in the calling thread. N > 0: a pool of N spawned processes scores large
                        batches in parallel (each worker runs in its own main thread, so timeouts stay on);
                        spawning needs the launching script to have an `if __name__ == "__main__":` guard.
    """

    def __init__(self, answer_key: str = "answer", correct: float = 1.0, incorrect: float = 0.0,
                 max_response_chars: int = 4096, timeout_seconds: int = 5, num_workers: int = 0) -> None:
        import math_verify  # noqa: F401  -- fail at build time, not at the first batch, if it is missing

        if max_response_chars <= 0 or timeout_seconds <= 0 or num_workers < 0:
            raise ValueError("math_verify reward: max_response_chars and timeout_seconds must be positive, "
                             "num_workers >= 0")
        self.answer_key = answer_key
        self.correct, self.incorrect = float(correct), float(incorrect)
        self.max_response_chars = max_response_chars
        self.timeout_seconds = timeout_seconds
        self.num_workers = num_workers
        self._pool = None

    def options(self) -> dict[str, Any]:
        """Constructor arguments of an equivalent single-process scorer (sent to pool workers)."""
        return {"answer_key": self.answer_key, "correct": self.correct, "incorrect": self.incorrect,
                "max_response_chars": self.max_response_chars, "timeout_seconds": self.timeout_seconds}

    def _parse(self, text: str) -> list:
        from math_verify import parse

        return parse(text, parsing_timeout=signal_timeout(self.timeout_seconds))

    def parse_gold(self, answer: str) -> list:
        """The reference answer parsed; a GSM8K solution is reduced to its '####' value first."""
        final = gsm8k_final(answer)
        text = final if final is not None else answer
        parsed = self._parse(text)
        if not parsed:  # bare LaTeX like "\frac{1}{2}" parses once it is in math mode
            parsed = self._parse(f"${text}$")
        return parsed

    def parse_response(self, response: str) -> list:
        tail = response[-self.max_response_chars:]
        final = gsm8k_final(tail)
        return self._parse(final) if final is not None else self._parse(tail)

    def score_one(self, gold: list, response: str) -> float:
        from math_verify import verify

        predicted = self.parse_response(response)
        if not predicted:
            return self.incorrect
        same = verify(gold, predicted, timeout_seconds=signal_timeout(self.timeout_seconds))
        return self.correct if same else self.incorrect

    def score_pairs(self, answers: list[str], responses: list[str]) -> list[Optional[float]]:
        """Scores of (reference, response) pairs in this process; None where the reference does not parse."""
        gold_cache: dict[str, list] = {}  # the N responses of a group share one reference answer
        out: list[Optional[float]] = []
        for answer, response in zip(answers, responses):
            if answer not in gold_cache:
                gold_cache[answer] = self.parse_gold(answer)
            out.append(self.score_one(gold_cache[answer], response) if gold_cache[answer] else None)
        return out

    def _score_in_pool(self, answers: list[str], responses: list[str]) -> list[Optional[float]]:
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the trainer process holds threads (and CUDA) that a fork would copy half-alive.
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
        step = -(-len(answers) // (4 * self.num_workers))  # a few chunks per worker balance uneven costs
        from concurrent.futures.process import BrokenProcessPool

        try:
            futures = [self._pool.submit(_pool_score, self.options(), answers[i:i + step], responses[i:i + step])
                       for i in range(0, len(answers), step)]
            return [score for f in futures for score in f.result()]
        except BrokenProcessPool as exc:
            self._pool = None
            raise RewardError("math_verify reward: its worker processes died (num_workers > 0 spawns processes; "
                              "the launching script needs an `if __name__ == '__main__':` guard, and workers "
                              "need memory)") from exc

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        check_inputs(prompts, responses, metadata)
        answers = []
        for i, meta in enumerate(metadata):
            answer = meta.get(self.answer_key) if isinstance(meta, dict) else None
            if answer is None or not str(answer).strip():
                raise RewardError(f"math_verify reward: no '{self.answer_key}' in the metadata of "
                                  f"{describe_prompt(i, prompts, metadata)}")
            answers.append(str(answer))
        use_pool = self.num_workers > 0 and len(answers) >= 2 * self.num_workers
        scores = self._score_in_pool(answers, responses) if use_pool else self.score_pairs(answers, responses)
        for i, score in enumerate(scores):
            if score is None:
                raise RewardError(f"math_verify reward: cannot parse the reference answer {answers[i][:60]!r} of "
                                  f"{describe_prompt(i, prompts, metadata)}")
        return scores


_WORKER_SCORERS: dict[tuple, MathVerifyReward] = {}


def _pool_score(options: dict[str, Any], answers: list[str], responses: list[str]) -> list[Optional[float]]:
    """Runs in a pool process: one scorer per option set, kept between calls."""
    key = tuple(sorted(options.items()))
    if key not in _WORKER_SCORERS:
        _WORKER_SCORERS[key] = MathVerifyReward(**options)
    return _WORKER_SCORERS[key].score_pairs(answers, responses)


def build_math_verify(**kwargs: Any) -> MathVerifyReward:
    return MathVerifyReward(**kwargs)
