"""The session pump's bookkeeping (transcriber/session.py): where a new owner resumes
reading, and when the audio of a final reached Redis."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError

from transcriber.session import READ_LOG_ENTRIES, ReadLog, with_retry


def test_a_new_owner_resumes_after_the_last_entry_the_commit_point_covers() -> None:
    log = ReadLog("5-0")
    assert log.resume_point(0) == "5-0"  # nothing read yet: where this owner started
    for i, end in enumerate((1600, 3200, 4800), start=6):
        log.read(f"{i}-0", end, i * 1000)
    assert log.resume_point(3000) == "6-0"  # the entry ending at 3200 is not all done
    assert log.resume_point(3200) == "7-0"
    assert log.resume_point(3200) == "7-0"  # asked again: the same
    assert log.resume_point(10_000) == "8-0"


def test_a_final_is_timed_from_the_entry_that_brought_its_last_word() -> None:
    log = ReadLog("0-0")
    log.read("1-0", 1600, 1000)
    log.read("2-0", 3200, 2000)
    assert log.appended_at(1600) == 1000
    assert log.appended_at(2000) == 2000
    assert log.appended_at(5000) is None
    log.resume_point(1600)  # committed: its entries are forgotten
    assert log.appended_at(0) == 2000


def test_the_log_stays_bounded_through_a_long_session() -> None:
    log = ReadLog("0-0")
    for i in range(READ_LOG_ENTRIES + 100):
        log.read(f"{i}-0", (i + 1) * 160, i)
    assert log.appended_at(0) == 100  # the oldest went
    # entries that fell out are skipped: the resume point is the oldest one kept (a new
    # owner re-reads a little more, never less)
    assert log.resume_point(101 * 160) == "100-0"


def test_a_write_is_retried_through_an_outage_until_it_lands() -> None:
    calls = 0

    async def write() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RedisConnectionError("Connection refused")
        return 7

    assert asyncio.run(with_retry("s", "commit", write)) == 7
    assert calls == 3
