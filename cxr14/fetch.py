"""Resumable HTTP downloads to a `.part` file, shared by the download stage (NIH's archives) and the
weights stage (torchvision's ImageNet weights).

`resume` brings `NAME.part` to its full size: an HTTP Range request continues a part left by an earlier
try or run; connection errors, stalls and server errors (5xx) are retried with exponential backoff, and a
try that made progress does not count against the retries (see `resume` for what is progress); 4xx, a web
page instead of the file and a wrong length are not retried. What a file must hold to be complete (an MD5,
a hash prefix, a readable archive) is the caller's check, made before the part is renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import queue
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from cxr14.params import StageError

POLL_SECONDS = 0.2  # how often a transfer looks at Ctrl-C while the socket is silent (not a setting: promptness)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class DownloadError(StageError):
    pass


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def digest(path: Path, algorithm: str) -> str:
    hashed = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hashed.update(block)
    return hashed.hexdigest()


def disk_error(path: Path, error: OSError, size: int | None) -> DownloadError:
    needed = f"it needs {size - file_size(path):,} more bytes" if size else "its size is not known yet"
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes are free there"
    except OSError:
        free = "the free space is unknown"
    return DownloadError(f"cannot write {path}: {error.strerror or error}; {needed}, {free}. "
                         "Free some space (or make the folder writable) and run again: what is there is kept")


class _Stream:
    """An HTTP response read on a daemon thread and handed over through a queue: the response first,
    then blocks of bytes, then None. A read blocked on a silent socket cannot be interrupted, so the
    transfer waits on the queue in steps of POLL_SECONDS and sees Ctrl-C (`stop`) within that; the
    stall limit stays `timeout` (data.download.timeout_seconds)."""

    def __init__(self, request: urllib.request.Request, timeout: float):
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._closed = threading.Event()
        threading.Thread(target=self._read, args=(request, timeout), daemon=True).start()

    def _read(self, request, timeout) -> None:
        try:
            # the socket's own limit a little later than next()'s, so the error names the setting
            with urllib.request.urlopen(request, timeout=timeout + 1) as response:
                if self._put(response):
                    while (block := response.read1(1 << 16)) and self._put(block):
                        pass
                    self._put(None)
        except Exception as error:  # handed to the transfer, which sorts it out
            self._put(error)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def next(self, stop: threading.Event | None, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt("download interrupted")
            try:
                item = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no data for {timeout:g} s (data.download.timeout_seconds)") from None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def close(self) -> None:
        self._closed.set()


def _total_of(response, have: int) -> int | None:
    """The whole file's size as the response gives it: Content-Range's total, or Content-Length."""
    if response.status == 206:
        match = re.fullmatch(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", "").strip())
        return int(match.group(1)) if match else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _check_response(response, stream: _Stream, url: str, part: Path, have: int, size: int | None, stop,
                    timeout: float, what: str) -> int | None:
    """Refuse, before writing a byte, a response that is not the rest of the file; name the real cause.
    Return the whole file's size (`size`, or what the response says when `size` is None)."""
    name = part.name.removesuffix(".part")
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    length = response.headers.get("Content-Length", "")
    length = int(length) if length.isdigit() else None
    whole = response.status != 206
    if kind.startswith("text/"):  # a quota, login or error page sent with status 200
        sent, limit = 0, 1 << 20
        while sent <= limit and (block := stream.next(stop, timeout)) is not None:
            sent += len(block)
        amount = f"{sent:,}" if sent <= limit else f"more than {limit:,}"
        expected = f"{(size if whole else size - have):,} bytes of {what}" if size else what
        raise DownloadError(f"{name}: the server sent {amount} bytes of {kind}, expected {expected}: a web page "
                            f"(quota, login or error?), not {what}; nothing was written ({url})")
    if size is None:
        size = _total_of(response, have)
    expected = None if size is None else (size if whole else size - have)
    if length is not None and expected is not None and length != expected:
        raise DownloadError(f"{name}: the server sent {length:,} bytes ({kind or 'no content type'}), expected "
                            f"{expected:,} bytes: its file differs from the table (bytes column); nothing was written "
                            f"({url})")
    if have and whole:
        raise DownloadError(
            f"{url}: the server ignored the Range request (HTTP {response.status}), so {part} "
            f"({have:,} bytes) cannot be resumed; delete it to start over, or use a mirror that supports resuming")
    if have:
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {have}-"):
            raise DownloadError(f"{url}: asked for bytes from {have}, the server sent {content_range!r}")
    return size


def _own_copy(part: Path) -> None:
    """Make `part` a file of its own before appending to it: a verified archive taken back to .part for a
    new check is also DVC's cache object (a hard link), which an append would change."""
    if part.exists() and part.stat().st_nlink > 1:
        private = part.with_name(part.name + ".copy")
        shutil.copyfile(part, private)
        os.replace(private, part)


def _transfer(url: str, part: Path, have: int, size: int | None, timeout: float, report,
              stop: threading.Event | None, what: str) -> int | None:
    """One request: append what the server sends to `part`. Return the file's size (None: not told)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    stream = _Stream(request, timeout)
    try:
        size = _check_response(stream.next(stop, timeout), stream, url, part, have, size, stop, timeout, what)
        try:
            _own_copy(part)
            handle = open(part, "ab")
        except OSError as error:
            raise disk_error(part, error, size) from None
        with handle:
            while (block := stream.next(stop, timeout)) is not None:
                if size is not None and have + len(block) > size:
                    raise DownloadError(f"{part.name.removesuffix('.part')}: the server sent more than the "
                                        f"{size:,} bytes it should ({url}); {part} is kept with the first {have:,}")
                try:
                    handle.write(block)
                    handle.flush()
                except OSError as error:
                    raise disk_error(part, error, size) from None
                have += len(block)
                report(have)
    finally:
        stream.close()
    if size is not None and have < size:
        raise ConnectionError(f"connection closed after {have:,} of {size:,} bytes")
    return have if size is None else size


def _complete_already(error: urllib.error.HTTPError, have: int) -> bool:
    """HTTP 416 to `Range: bytes=have-` with `Content-Range: bytes */have`: the part holds the whole file."""
    total = (error.headers or {}).get("Content-Range", "") if error.code == 416 else ""
    return have > 0 and total.strip() == f"bytes */{have}"


def resume(url: str, part: Path, size: int | None, *, retries: int, backoff: float, timeout: float,
           report=lambda done: None, stop: threading.Event | None = None, what: str = "the file",
           hint: str = "check the URL") -> int:
    """Bring `part` to the whole file from `url` (see the module's docstring) and return its size.

    `size` None: the server's Content-Length / Content-Range says it (a server that says nothing is read
    to its end). `report` is called with the bytes on disk; setting `stop` ends the transfer (Ctrl-C).
    `what` names the file in errors; `hint` says what to do about a 4xx.

    Retries (data.download.retries, in a row): a failed try counts unless it made progress, and it gives up
    when more than `retries` tries in a row have counted. Progress is bytes, with one exception: a try that
    ended in a stall (no data for `timeout` seconds) made progress only if its data had come for at least
    `timeout` seconds before the stall, that is, it spent at least as long transferring as waiting. So a
    connection cut now and then (a try that brought bytes and broke off) never uses up the retries, nor
    does a rare stall in a long transfer; but a mirror that goes silent a little way into every response
    is given up after retries + 1 such tries, each under 2 * timeout seconds (plus the backoff pauses).
    """
    name = part.name.removesuffix(".part")
    attempt, stalled_with_bytes = 0, 0
    last_byte = [0.0]  # when the current try last wrote bytes

    def noted(done: int) -> None:
        last_byte[0] = time.monotonic()
        report(done)

    while size is None or (have := file_size(part)) < size:
        have = file_size(part)
        report(have)
        started = last_byte[0] = time.monotonic()
        stalled = False
        try:
            size = _transfer(url, part, have, size, timeout, noted, stop, what)
            continue
        except urllib.error.HTTPError as error:
            if size is None and _complete_already(error, have):
                size = have
                break
            if error.code < 500:
                raise DownloadError(f"{name}: {url}: HTTP {error.code} {error.reason} ({hint})") from None
            failure = f"HTTP {error.code} {error.reason}"
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            failure = str(error) or type(error).__name__
            stalled = isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)
        brought = file_size(part) > have
        if brought and not (stalled and last_byte[0] - started < timeout):
            attempt, stalled_with_bytes = 0, 0
        else:
            attempt, stalled_with_bytes = attempt + 1, stalled_with_bytes + brought
        if attempt > retries:
            tries = "1 try" if retries == 0 else f"{retries + 1} tries in a row"
            why = (f"; {'it' if retries == 0 else f'{stalled_with_bytes} of them'} went silent for {timeout:g} s "
                   f"after less than {timeout:g} s of data: a mirror that stalls partway through each response "
                   "(try again later, or another mirror)") if stalled_with_bytes else ""
            raise DownloadError(f"{name}: {url}: gave up after {tries} without progress ({failure}){why}; "
                                f"{part} ({file_size(part):,} bytes) is kept for resuming")
        pause = backoff * 2 ** max(attempt - 1, 0)
        if stop is None:
            time.sleep(pause)
        elif stop.wait(pause):  # Ctrl-C during the pause too
            raise KeyboardInterrupt(f"download of {url} interrupted; {part} is kept for resuming")
    if (have := file_size(part)) > size:
        raise DownloadError(f"{part} holds {have:,} bytes, more than the {size:,} that {name} has: "
                            "it is kept; delete it, or fix the table's bytes, and run again")
    report(size)
    return size
