"""Retrying transient store errors with capped exponential backoff and jitter."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tokenmill.store.errors import StoreError, TransientStoreError

T = TypeVar("T")
log = logging.getLogger("tokenmill.store")

#: Turns any exception raised by a backend call into the StoreError to raise or retry.
Classifier = Callable[[BaseException, str, str], StoreError]


class CallerError(Exception):
    """Carries an exception that is not the store's (raised by caller code running inside a
    store operation) through call_with_retry, which re-raises it at once, untouched."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient error is retried.

    The n-th retry waits a random time in [d/2, d], d = min(max_delay_s, base_delay_s * 2**(n-1)),
    so many workers hitting one throttled bucket spread out instead of retrying in step.
    """

    max_attempts: int = 8
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("retry delays must not be negative")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RetryPolicy:
        """Defaults overridden by TOKENMILL_STORE_RETRY_ATTEMPTS, _BASE_S and _MAX_S."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            max_attempts=int(env.get("TOKENMILL_STORE_RETRY_ATTEMPTS", default.max_attempts)),
            base_delay_s=float(env.get("TOKENMILL_STORE_RETRY_BASE_S", default.base_delay_s)),
            max_delay_s=float(env.get("TOKENMILL_STORE_RETRY_MAX_S", default.max_delay_s)),
        )

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))
        return (rng or random).uniform(cap / 2, cap)


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    classify: Classifier,
    uri: str,
    operation: str,
    sleep: Callable[[float], None] = time.sleep,
    chain: bool = True,
) -> T:
    """Run `fn`, retrying while `classify` calls its failure transient.

    `fn` must be idempotent: a retried request may have taken effect the first time
    (a lost response), so every step of a commit is safe to repeat. With `chain` False
    the client library's exception is not attached as the cause: its text comes from
    the server and is not ours to vouch for, so `classify` must put what matters, made
    safe, into the StoreError's own message.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except CallerError:
            raise
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else classify(exc, uri, operation)
            if not isinstance(error, TransientStoreError) or attempt >= policy.max_attempts:
                if isinstance(error, TransientStoreError):
                    error = TransientStoreError(f"{error} (gave up after {attempt} attempts)", uri)
                if error is exc:
                    raise
                raise error from (exc if chain else None)
            wait = policy.delay(attempt)
            log.warning(
                "%s %s failed (%s); retry %d of %d in %.2fs",
                operation,
                uri,
                error,
                attempt,
                policy.max_attempts - 1,
                wait,
            )
            sleep(wait)
            attempt += 1
